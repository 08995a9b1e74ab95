"""Semantic segmentation data: ADE20K (the ADEChallengeData2016 folder or zip, TFDS scene_parse150), generic
folders of image / mask pairs, the digits scenes (a small real dense task), and mmseg's transforms.

Sources give (image uint8 (H, W, 3), label uint8 (H, W)) pairs, labels already reduced:

  src = ade20k('/data/ADEChallengeData2016.zip', 'training')     # or the unzipped folder
  src = folder('/data/mine', split='train', num_classes=21)         # images/<split>/*, annotations/<split>/*.png
  ds = train_dataset(src, batch_size=16, crop=512, seed=0)          # {'image' float32, 'label' int32}
  for example in eval_examples(src_val): ...                         # {'image' resized, 'label' original size}

ADE20K labels: 0 is "other objects" and is ignored, 1..150 become 0..149 (mmseg's reduce_zero_label). A mask
that cannot be decoded, whose size differs from its image's, or holding a label outside the classes (after the
reduction; 255 = ignore is always allowed) is named by path and skipped (on_bad='skip', counted in
`source.skipped`) or refused (on_bad='error': BadMaskError).

Transforms (mmseg configs/_base_/datasets/ade20k.py; docs/method.md section 10), per example with stateless seeds:
random rescale to ratio 0.5-2.0 of (2048, 512) keeping the aspect ratio, random crop (re-drawn up to 10 times
while one class covers 75% or more of the crop's labelled pixels), horizontal flip 0.5, photometric
distortion, ImageNet normalisation, padding to the crop with 0 (image) and 255 (label). Test: the image
resized to fit (2048, 512) keeping the ratio, the label untouched (metrics at the annotation's size).
"""
import dataclasses
import os
import zipfile
from typing import Callable, Sequence

from absl import logging
import numpy as np

from tinymim_jax.data import transforms
from tinymim_jax.data._tf import tf, tfds

IGNORE_INDEX = 255
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # mmseg img_norm_cfg, in [0, 255]
IMAGENET_STD = (58.395, 57.12, 57.375)
ADE20K_SPLITS = {'train': 'training', 'training': 'training', 'val': 'validation', 'validation': 'validation'}
ADE20K_CLASSES = 150


class BadMaskError(ValueError):
  """A segmentation mask that cannot be used; the message names the file and the problem."""


def reduce_zero_label(label):
  """mmseg LoadAnnotations(reduce_zero_label=True): 0 -> 255 (ignored), k -> k - 1 (uint8 arrays)."""
  label = np.asarray(label)
  out = label.astype(np.int32) - 1
  out[label == 0] = IGNORE_INDEX
  out[out == IGNORE_INDEX - 1] = IGNORE_INDEX
  return out.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Sources.
@dataclasses.dataclass
class PairSource:
  """Image / mask pairs read by name. `read(name)` -> bytes; pairs [(image name, mask name)]."""
  name: str
  pairs: list
  read: Callable
  num_classes: int
  reduce_zero_label: bool
  on_bad: str = 'skip'
  skipped: int = 0

  def __len__(self):
    return len(self.pairs)

  def load(self, i):
    """(image uint8 (H, W, 3), label uint8 (H, W)) of pair i; None when skipped (on_bad='skip').
    Raises BadMaskError (on_bad='error') naming the file and the problem."""
    image_name, mask_name = self.pairs[i]
    try:
      return check_pair(self.read(image_name), self.read(mask_name), mask_name, num_classes=self.num_classes,
                        reduce_zero=self.reduce_zero_label, image_name=image_name)
    except BadMaskError as e:
      if self.on_bad == 'error':
        raise
      self.skipped += 1
      logging.warning('%s: skipped (%s)', self.name, e)
      return None


def _decode(raw, channels, name, what):
  try:
    x = tf.io.decode_image(raw, channels=channels, expand_animations=False).numpy()
  except (tf.errors.InvalidArgumentError, ValueError):
    raise BadMaskError(f'{name}: unreadable {what} (not a complete PNG, JPEG, BMP, GIF or WebP file)') from None
  return x


def check_pair(image_raw, mask_raw, mask_name, *, num_classes, reduce_zero, image_name='image'):
  """Decodes and checks one pair: (image uint8 (H, W, 3), label uint8 (H, W), reduced if `reduce_zero`).

  Raises BadMaskError naming the file for an unreadable image or mask, a mask of another size than its
  image, a mask with more than one channel holding different values, or labels outside 0..num_classes-1
  (after the reduction; 255 = ignore allowed).
  """
  image = _decode(image_raw, 3, image_name, 'image')
  mask = _decode(mask_raw, 0, mask_name, 'mask')
  if mask.ndim == 3 and mask.shape[-1] > 1 and not np.all(mask == mask[..., :1]):
    raise BadMaskError(f'{mask_name}: a colour mask ({mask.shape[-1]} channels); expected one channel of class '
                       f'indices (a palette or greyscale PNG)')
  mask = mask[..., 0] if mask.ndim == 3 else mask
  if mask.shape != image.shape[:2]:
    raise BadMaskError(f'{mask_name}: mask is {mask.shape[0]}x{mask.shape[1]}, its image {image_name} is '
                       f'{image.shape[0]}x{image.shape[1]}')
  label = reduce_zero_label(mask) if reduce_zero else mask.astype(np.uint8)
  bad = (label >= num_classes) & (label != IGNORE_INDEX)
  if bad.any():
    raw_bad = np.unique(mask[bad])[:5].tolist()
    raise BadMaskError(f'{mask_name}: labels {raw_bad} outside the {num_classes} classes'
                       f'{" (1.." + str(num_classes) + " before reduce_zero_label)" if reduce_zero else ""}')
  return image, label


def _pairs(image_names, mask_names, where):
  masks = {os.path.splitext(os.path.basename(m))[0]: m for m in mask_names}
  pairs, missing = [], []
  for name in sorted(image_names):
    stem = os.path.splitext(os.path.basename(name))[0]
    (pairs.append((name, masks[stem])) if stem in masks else missing.append(name))
  if missing:
    logging.warning('%s: %d images without a mask, e.g. %s', where, len(missing), missing[0])
  if not pairs:
    raise FileNotFoundError(f'{where}: no image / mask pairs (images and masks are paired by file name stem)')
  return pairs


def folder(root, *, split=None, images='images', masks='annotations', num_classes, reduce_zero=False,
           on_bad='skip'):
  """Pairs <root>/<images>[/<split>]/x.{jpg,png,..} with <root>/<masks>[/<split>]/x.png (or a .zip of that
  tree). Labels 0..num_classes-1, 255 ignored (reduce_zero: 0 ignored, 1..num_classes shifted down)."""
  if on_bad not in ('skip', 'error'):
    raise ValueError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
  sub = lambda d: f'{d}/{split}' if split else d
  if zipfile.is_zipfile(root) if os.path.isfile(root) else False:
    zf = zipfile.ZipFile(root)
    names = [n for n in zf.namelist() if not n.endswith('/')]
    base = next((n[:n.index(sub(images) + '/')] for n in names if f'{sub(images)}/' in n), None)
    if base is None:
      raise FileNotFoundError(f'{root}: no {sub(images)}/ folder inside the zip')
    in_dir = lambda d: [n for n in names if n.startswith(base + sub(d) + '/')]
    # Names as <zip path>/<member>: what a message about a bad pair shows.
    pairs = [tuple(f'{root}/{n}' for n in pair) for pair in _pairs(in_dir(images), in_dir(masks), root)]

    def read(name):  # a handle per read: a zipfile.ZipFile is not safe across threads
      with zipfile.ZipFile(root) as z:
        return z.read(name[len(root) + 1:])
  else:
    dirs = [os.path.join(root, sub(d)) for d in (images, masks)]
    for d in dirs:
      if not os.path.isdir(d):
        raise FileNotFoundError(f'{d}: no such folder (expected {images}/ and {masks}/ under {root}'
                                f'{", each with a " + split + "/ folder" if split else ""})')
    listed = [[os.path.join(d, f) for f in os.listdir(d)] for d in dirs]
    pairs = _pairs(listed[0], listed[1], root)

    def read(name):
      with open(name, 'rb') as f:
        return f.read()
  return PairSource(f'{root} [{split}]' if split else root, pairs, read, num_classes, reduce_zero, on_bad)


def ade20k(path, split, *, on_bad='skip'):
  """ADE20K as the official ADEChallengeData2016 release: the folder (or its parent), or the zip.

  split: 'training' / 'validation' (or 'train' / 'val'). 150 classes, reduce_zero_label as the authors.
  """
  if split not in ADE20K_SPLITS:
    raise ValueError(f"ADE20K split must be one of {sorted(ADE20K_SPLITS)}, got {split!r}")
  if os.path.isdir(os.path.join(path, 'ADEChallengeData2016')):
    path = os.path.join(path, 'ADEChallengeData2016')
  return folder(path, split=ADE20K_SPLITS[split], num_classes=ADE20K_CLASSES, reduce_zero=True, on_bad=on_bad)


def scene_parse150(data_dir, split):
  """TFDS scene_parse150 (ADE20K's scene parsing set) where prepared in data_dir (never downloaded):
  yields (image uint8 (H, W, 3), label uint8 (H, W)) with labels from the annotation's first channel,
  reduced as ADE20K's. split: 'train' / 'test' (TFDS names; its 'test' is ADE20K's validation)."""
  ds = tfds.load('scene_parse150', split=split, data_dir=data_dir, download=False)
  for ex in tfds.as_numpy(ds):
    annotation = ex['annotation']
    yield ex['image'], reduce_zero_label(annotation[..., 0] if annotation.ndim == 3 else annotation)


def digits_scenes(num, *, size=64, max_digits=3, digit_size=(16, 28), seed=0, split='train'):
  """A small real dense task: scikit-learn's 8x8 digit photos placed on a size x size canvas.

  Each scene holds 1..max_digits digits (drawn from the train or test third of the digits, a fixed split),
  each upsampled to a random size in `digit_size` and pasted at a random place (later ones on top); a pixel
  whose digit intensity is >= 0.25 is labelled with that digit's class + 1, every other pixel 0 (background).
  Deterministic in (num, size, seed, split). Returns (images uint8 (num, size, size, 3), labels uint8
  (num, size, size)); 11 classes.
  """
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  train, test = model_selection.train_test_split(np.arange(len(digits.target)), test_size=1 / 3,
                                                 stratify=digits.target, random_state=0)
  members = train if split == 'train' else test
  rng = np.random.RandomState([seed, 0 if split == 'train' else 1])
  images = np.zeros((num, size, size), np.float32)
  labels = np.zeros((num, size, size), np.uint8)
  for n in range(num):
    for _ in range(rng.randint(1, max_digits + 1)):
      i = members[rng.randint(len(members))]
      s = rng.randint(digit_size[0], digit_size[1] + 1)
      glyph = tf.image.resize(digits.images[i][..., None] / 16.0, [s, s], method='bilinear').numpy()[..., 0]
      y, x = rng.randint(0, size - s + 1, 2)
      on = glyph >= 0.25
      images[n, y:y + s, x:x + s] = np.where(on, glyph, images[n, y:y + s, x:x + s])
      labels[n, y:y + s, x:x + s][on] = digits.target[i] + 1
  images = np.repeat(np.round(np.clip(images, 0, 1) * 255)[..., None], 3, axis=-1).astype(np.uint8)
  return images, labels


# ---------------------------------------------------------------------------------------------------------
# Transforms (TF, per example; images float32 in [0, 255] until normalised, labels int32).
def rescaled_size(height, width, scale):
  """mmcv rescale_size(keep_ratio): the largest size within scale = (long, short) edges, rounded (int(x + .5))."""
  long_edge, short_edge = tf.cast(tf.reduce_max(scale), tf.float32), tf.cast(tf.reduce_min(scale), tf.float32)
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  factor = tf.minimum(long_edge / tf.maximum(h, w), short_edge / tf.minimum(h, w))
  return tf.cast(tf.floor(h * factor + 0.5), tf.int32), tf.cast(tf.floor(w * factor + 0.5), tf.int32)


def resize_pair(image, label, size):
  """Image bilinear, label nearest (mmseg Resize: cv2 INTER_LINEAR / INTER_NEAREST), to size (h, w)."""
  image = tf.image.resize(image, size, method='bilinear')
  if label is not None:
    label = tf.image.resize(label[..., None], size, method='nearest')[..., 0]
  return image, label


def random_rescale(image, label, seed, *, scale=(2048, 512), ratio_range=(0.5, 2.0)):
  """mmseg Resize(img_scale, ratio_range): scale x ratio (ratio uniform in ratio_range), keeping the aspect."""
  ratio = transforms.uniform([], seed, *ratio_range)
  h, w = rescaled_size(tf.shape(image)[0], tf.shape(image)[1],
                       tf.cast(tf.constant(scale, tf.float32) * ratio + 0.5, tf.int32))
  return resize_pair(image, label, tf.stack([h, w]))


def crop_offsets(height, width, crop, seed, tries=11):
  """(tries, 2) int32 candidate (top, left) offsets, each uniform in [0, max(size - crop, 0)]."""
  u = transforms.uniform([tries, 2], seed)
  margin = tf.cast(tf.maximum(tf.stack([height, width]) - crop, 0), tf.float32)
  return tf.cast(tf.floor(u * (margin + 1.0)), tf.int32)


def choose_crop(label, offsets, crop, *, cat_max_ratio=0.75, ignore_index=IGNORE_INDEX):
  """mmseg RandomCrop's choice: the first of offsets[0..9] whose crop has more than one labelled class and
  no class covering cat_max_ratio or more of its labelled pixels, else offsets[10] (the last draw)."""
  if cat_max_ratio >= 1.0:
    return offsets[0]

  def accepted(offset):
    window = label[offset[0]:offset[0] + crop, offset[1]:offset[1] + crop]
    counts = tf.math.bincount(tf.reshape(window, [-1]), minlength=256, maxlength=256)
    counts = tf.tensor_scatter_nd_update(counts, [[ignore_index]], [0])
    total = tf.reduce_sum(counts)
    return (tf.math.count_nonzero(counts) > 1) & (
        tf.cast(tf.reduce_max(counts), tf.float32) < cat_max_ratio * tf.cast(total, tf.float32))

  ok = tf.map_fn(accepted, offsets[:-1], fn_output_signature=tf.bool)
  first = tf.argmax(tf.cast(ok, tf.int32))
  return tf.where(tf.reduce_any(ok), offsets[first], offsets[-1])


def random_crop(image, label, crop, seed, *, cat_max_ratio=0.75):
  """mmseg RandomCrop(crop_size, cat_max_ratio): a crop x crop window (smaller where the image is)."""
  offsets = crop_offsets(tf.shape(image)[0], tf.shape(image)[1], crop, seed)
  top, left = tf.unstack(choose_crop(label, offsets, crop, cat_max_ratio=cat_max_ratio))
  return image[top:top + crop, left:left + crop], label[top:top + crop, left:left + crop]


def photometric_distortion(image, seed, *, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
  """mmseg PhotoMetricDistortion: each of brightness (+- delta), contrast (x factor), saturation, hue (+- delta
  of cv2's 180-step circle) applied with probability 1/2, contrast first or last at random, values clipped to
  [0, 255] after each. Saturation and hue act in float HSV (tf.image), not cv2's uint8 HSV (same draws, no
  intermediate uint8 rounding)."""
  s = transforms.split_seed(seed, 9)
  coin = lambda k: transforms.uniform([], s[k]) < 0.5
  clip = lambda x: tf.clip_by_value(x, 0.0, 255.0)

  def contrast(x):
    return tf.cond(coin(3), lambda: clip(x * transforms.uniform([], s[4], *contrast_range)), lambda: x)

  image = tf.cond(coin(0), lambda: clip(image + transforms.uniform([], s[1], -brightness_delta,
                                                                   brightness_delta)), lambda: image)
  contrast_first = coin(2)
  image = tf.cond(contrast_first, lambda: contrast(image), lambda: image)
  image = tf.cond(coin(5), lambda: clip(255.0 * tf.image.adjust_saturation(
      image / 255.0, transforms.uniform([], s[6], *saturation_range))), lambda: image)
  hue = tf.cast(tf.random.stateless_uniform([], s[8], -hue_delta, hue_delta + 1, tf.int32, alg='philox'),
                tf.float32)
  image = tf.cond(coin(7), lambda: clip(255.0 * tf.image.adjust_hue(image / 255.0, hue / 180.0)), lambda: image)
  return tf.cond(contrast_first, lambda: image, lambda: contrast(image))


def normalize(image):
  return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def pad_pair(image, label, size):
  """mmseg Pad(size, pad_val=0, seg_pad_val=255), bottom / right."""
  dh, dw = size - tf.shape(image)[0], size - tf.shape(image)[1]
  image = tf.pad(image, [[0, dh], [0, dw], [0, 0]])
  label = tf.pad(label, [[0, dh], [0, dw]], constant_values=IGNORE_INDEX)
  image.set_shape([size, size, 3])
  label.set_shape([size, size])
  return image, label


def train_transform(image, label, seed, *, crop=512, scale=(2048, 512), ratio_range=(0.5, 2.0),
                    cat_max_ratio=0.75, photometric=True):
  """The authors' training pipeline on one example: uint8 (H, W, 3), (H, W) -> float32 (crop, crop, 3)
  normalised, int32 (crop, crop) with 255 for ignored and padded pixels."""
  s = transforms.split_seed(seed, 4)
  image, label = tf.cast(image, tf.float32), tf.cast(label, tf.int32)
  image, label = random_rescale(image, label, s[0], scale=scale, ratio_range=ratio_range)
  image, label = random_crop(image, label, crop, s[1], cat_max_ratio=cat_max_ratio)
  flip = transforms.uniform([], s[2]) < 0.5
  image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)
  if photometric:
    image = photometric_distortion(image, s[3])
  return pad_pair(normalize(image), label, crop)


def test_transform(image, *, scale=(2048, 512)):
  """The test path: uint8 (H, W, 3) -> float32 normalised, resized to fit `scale` keeping the ratio."""
  image = tf.cast(image, tf.float32)
  size = tf.stack(rescaled_size(tf.shape(image)[0], tf.shape(image)[1], tf.constant(scale)))
  return normalize(resize_pair(image, None, size)[0])


# ---------------------------------------------------------------------------------------------------------
# Datasets.
def _examples(source):
  """(image, label) pairs of a PairSource (bad ones skipped), or of an (images, labels) array pair."""
  if isinstance(source, PairSource):
    for i in range(len(source)):
      pair = source.load(i)
      if pair is not None:
        yield pair
  else:
    yield from zip(*source)


def train_dataset(source, *, batch_size, seed, crop=512, scale=(2048, 512), ratio_range=(0.5, 2.0),
                  cat_max_ratio=0.75, photometric=True, repeat=True):
  """Batches {'image' float32 (B, crop, crop, 3), 'label' int32 (B, crop, crop)} of `source` (a PairSource or
  an (images, labels) pair of arrays) through train_transform: a new order each epoch and each example's
  augmentation seeded from (seed, epoch, index) only. Bad pairs of a PairSource are skipped (or raise, as its
  on_bad says)."""
  base = tf.constant([seed, 0], tf.int64)
  if isinstance(source, PairSource):
    n = len(source)

    def load_py(i):
      pair = source.load(int(i))
      if pair is None:
        return np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.uint8), False
      return pair[0], pair[1], True

    def load(i):
      image, label, ok = tf.py_function(load_py, [i], [tf.uint8, tf.uint8, tf.bool])
      image.set_shape([None, None, 3])
      label.set_shape([None, None])
      return i, image, label, ok
  else:
    images, labels = (tf.constant(np.asarray(a)) for a in source)
    n = int(images.shape[0])
    load = lambda i: (i, tf.gather(images, i), tf.gather(labels, i), tf.constant(True))

  def epoch_ds(epoch):
    epoch_seed = transforms.fold_in(base, epoch)
    ds = tf.data.Dataset.from_tensor_slices(transforms.permutation(n, epoch_seed))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).filter(lambda *ex: ex[3])
    return ds.map(lambda i, image, label, _: train_transform(
        image, label, transforms.fold_in(epoch_seed, i), crop=crop, scale=scale, ratio_range=ratio_range,
        cat_max_ratio=cat_max_ratio, photometric=photometric), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)

  epochs = tf.data.Dataset.range(1 << 30 if repeat else 1)
  ds = epochs.flat_map(epoch_ds).batch(batch_size, drop_remainder=True)
  return ds.map(lambda image, label: {'image': image, 'label': label}).prefetch(2)


def eval_examples(source, *, scale=(2048, 512), resize_label=False):
  """One pass: {'image' float32 (h, w, 3) resized to fit `scale`, 'label' int32 (H, W) at the annotation's
  size} per example, for segment.slide_inference (out_size = the label's size). resize_label: the label
  resized to the image's (h, w) by nearest neighbour instead (mmseg Resize's label path; a probe's train
  windows, segprobe.py)."""
  for image, label in _examples(source):
    image = test_transform(tf.constant(image), scale=scale)
    if resize_label:
      label = tf.image.resize(tf.constant(label, tf.int32)[..., None], tf.shape(image)[:2], method='nearest')
      label = label[..., 0].numpy()
    yield {'image': image.numpy(), 'label': label.astype(np.int32)}


# ---------------------------------------------------------------------------------------------------------
# From a run's config (config.segment; objectives/segment).
SOURCES = ('ade20k', 'scene_parse150', 'folder', 'digits_scenes')


def make_source(cfg, split, data_dir=None):
  """The `split` ('train' / 'val') of the source config.segment names: a PairSource, an (images, labels) array
  pair (digits scenes) or, for scene_parse150, a list of pairs read from TFDS. -> (source, num_classes).

  cfg.dataset: 'ade20k' (cfg.path: the ADEChallengeData2016 folder, its parent or the zip), 'scene_parse150'
  (TFDS, prepared in data_dir), 'folder' (cfg.path with images/<split>/, annotations/<split>/; cfg.num_classes,
  cfg.reduce_zero_label), 'digits_scenes' (cfg.num_train / cfg.num_val scenes of cfg.scene_size px).
  Raises ValueError for an unknown dataset, FileNotFoundError for a missing folder.
  """
  if split not in ('train', 'val'):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  if cfg.dataset == 'ade20k':
    return ade20k(cfg.path, split, on_bad=cfg.on_bad), ADE20K_CLASSES
  if cfg.dataset == 'scene_parse150':
    return list(scene_parse150(data_dir, 'train' if split == 'train' else 'test')), ADE20K_CLASSES
  if cfg.dataset == 'folder':
    return folder(cfg.path, split=split, num_classes=cfg.num_classes, reduce_zero=cfg.reduce_zero_label,
                  on_bad=cfg.on_bad), cfg.num_classes
  if cfg.dataset == 'digits_scenes':
    num = cfg.num_train if split == 'train' else cfg.num_val
    return digits_scenes(num, size=cfg.scene_size, seed=cfg.data_seed, split=split), 11
  raise ValueError(f"segment.dataset={cfg.dataset!r}: one of {SOURCES}")


def source_size(source):
  """The number of examples of a source (pairs, skipped ones included)."""
  if isinstance(source, PairSource):
    return len(source)
  if isinstance(source, list):
    return len(source)
  return len(source[0])


class TrainIterator:
  """Host-local batches {'image' float32 (B / processes, crop, crop, 3), 'label' int32} of train_dataset, from
  batch `start_step` on (the batches an uninterrupted run sees: every augmentation is seeded by (seed, epoch,
  index)); `.skipped`: bad pairs skipped so far."""

  def __init__(self, source, cfg, *, global_batch_size, seed, start_step=0, process_index=0, process_count=1):
    if isinstance(source, list):  # TFDS pairs of varying sizes: through a PairSource-like reader
      source = _ListSource(source)
    self.source = source
    ds = train_dataset(source, batch_size=global_batch_size, seed=seed, crop=cfg.crop, scale=tuple(cfg.scale),
                       ratio_range=tuple(cfg.ratio_range), cat_max_ratio=cfg.cat_max_ratio,
                       photometric=cfg.photometric)
    self._it = ds.skip(start_step).as_numpy_iterator()
    local = global_batch_size // process_count
    self._rows = slice(process_index * local, (process_index + 1) * local)

  @property
  def skipped(self):
    return getattr(self.source, 'skipped', 0)

  def __iter__(self):
    return self

  def __next__(self):
    return {k: v[self._rows] for k, v in next(self._it).items()}


class _ListSource(PairSource):
  """Decoded pairs held in memory, read through PairSource's interface."""

  def __init__(self, pairs):
    super().__init__('scene_parse150', list(range(len(pairs))), None, ADE20K_CLASSES, False)
    self._data = pairs

  def load(self, i):
    return self._data[i]
