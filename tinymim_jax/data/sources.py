"""Where examples come from: scikit-learn digits, Fashion-MNIST, an image folder, or TFDS imagenet2012.

A source hands out one process's share of a split as a `Split`: `epoch(seed, skip)` lists the share in
the order of one epoch (a permutation fixed by `seed`, or storage order for seed None), starting at
position `skip`, as small descriptors with their position 'pos'; `load(descriptor)` turns one into
{'raw': encoded bytes or a uint8 image, 'label': int32, 'key': str}; `key(descriptor)` names the example
(its path) without reading it, for the message about a skipped one. Loading runs inside the decode step, so
that an unreadable file is counted as skipped rather than stopping the run; a split whose examples are decoded
arrays in memory (digits, Fashion-MNIST) says so (`in_memory`): nothing of it can fail to load, and the pipeline
maps it without the per-example guard (half of a small image's input cost).

Shares follow tfds.even_splits(drop_remainder=False): the first (n mod processes) processes hold one
example more.
"""
import dataclasses
import functools
import gzip
import os
from typing import Callable

from absl import logging
import numpy as np

from tinymim_jax.data import transforms
from tinymim_jax.data._tf import tf, tfds

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
# Where the Debian package dataset-fashion-mnist installs the four standard idx files.
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
                       'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}


@dataclasses.dataclass
class Split:
  name: str  # For messages, e.g. "digits 'train'".
  num_examples: int  # In the whole split.
  num_local: int  # Held by this process.
  epoch: Callable
  load: Callable
  key: Callable  # descriptor -> tf.string: the example's path / name.
  in_memory: bool = False  # load() slices decoded uint8 arrays held in memory: it cannot fail.

  def shares(self, process_count):
    """(fewest, most) examples any process holds."""
    return self.num_examples // process_count, -(-self.num_examples // process_count)


@dataclasses.dataclass
class Source:
  name: str
  num_classes: int
  num_train: int
  num_eval: int
  split: Callable  # split(name in {'train', 'eval'}, process_index, process_count) -> Split.


def get(c):
  return {'digits': _digits, 'fashion_mnist': _fashion_mnist, 'folder': _folder,
          'imagenet2012': _imagenet}[c.name](c)


def class_balanced_subset(labels, fraction, seed=0):
  """Sorted indices of a class-balanced subset of `labels` (int array (n,)): for each class c, the first
  max(1, round(fraction x n_c)) of its indices in a random order fixed by `seed`. fraction 1 -> all indices."""
  labels = np.asarray(labels)
  if fraction >= 1:
    return np.arange(len(labels))
  order = np.random.default_rng(seed).permutation(len(labels))
  keep = []
  for c in np.unique(labels):
    members = order[labels[order] == c]
    keep.append(members[:max(1, int(round(fraction * len(members))))])
  return np.sort(np.concatenate(keep))


def _share(n, process_index, process_count):
  """[start, end) of this process's share, as tfds.even_splits(n=process_count)."""
  bounds = [k * (n // process_count) + min(k, n % process_count) for k in range(process_count + 1)]
  return bounds[process_index], bounds[process_index + 1]


def _indexed_split(name, num_examples, process_index, process_count, load_index, key_index, in_memory=False):
  """A split whose examples are addressed by index: exact shuffles, and skipping costs nothing."""
  start, end = _share(num_examples, process_index, process_count)

  def epoch(seed, skip):
    index = tf.range(start, end, dtype=tf.int64)
    if seed is not None:
      index = tf.gather(index, transforms.permutation(end - start, seed))
    pos = tf.range(end - start, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices({'index': index[skip:], 'pos': pos[skip:]})

  return Split(name, num_examples, end - start, epoch, lambda d: load_index(d['index']),
               lambda d: key_index(d['index']), in_memory=in_memory)


# ---------------------------------------------------------------------------------------------------------
# scikit-learn digits: 1,797 real 8x8 digits, 10 classes, a stratified train/test split fixed by a seed.


def _digits(c):
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)  # Values 0..16 -> [0, 1].
  labels = digits.target.astype(np.int32)
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=c.digits_test_fraction, stratify=labels,
      random_state=c.digits_split_seed)
  train = train[class_balanced_subset(labels[train], c.train_fraction, c.train_subset_seed)]
  size = c.image_size
  # The 8x8 digits are always in memory; caching also keeps them upsampled, worth it only when small.
  cache = c.cache if c.cache is not None else len(labels) * size * size * 3 < 64 << 20

  def upsample(x):  # (..., 8, 8) in [0, 1] -> (..., size, size, 3) uint8.
    x = tf.image.resize(tf.convert_to_tensor(x)[..., None], [size, size], method='bicubic')
    x = tf.round(tf.clip_by_value(x * 255.0, 0.0, 255.0))
    return tf.cast(tf.repeat(x, 3, axis=-1), tf.uint8)

  def split(name, process_index, process_count):
    members = train if name == 'train' else test
    split_images = images[members]
    if cache:  # Upsample once.
      split_images = upsample(split_images).numpy()
    split_labels = tf.constant(labels[members])
    split_images = tf.constant(split_images)
    members_t = tf.constant(members)

    def key(i):
      return tf.strings.join(['digits[', tf.strings.as_string(members_t[i]), ']'])

    def load(i):
      image = split_images[i] if cache else upsample(split_images[i])
      return {'raw': image, 'label': split_labels[i], 'key': key(i)}

    split_name = f"digits '{'train' if name == 'train' else 'test'}'"
    return _indexed_split(split_name, len(members), process_index, process_count, load, key, in_memory=True)

  return Source('digits', 10, len(train), len(test), split)


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST (Xiao et al. 2017): 70,000 28x28 grey photos of clothing, 10 classes, the standard 60k train /
# 10k test split. Read from the four idx .gz files (data.idx_dir, else the Debian package's directory when
# present), or from TFDS fashion_mnist when prepared in data.data_dir. Held in memory (55 MB) as grey uint8.

_IDX_MAGIC = {'images': 0x803, 'labels': 0x801}  # 0x08 = unsigned bytes; last byte = number of dims.
_IDX_DIMS = {'images': 3, 'labels': 1}


def read_idx(path, kind):
  """A gzip'd idx file (LeCun et al.'s MNIST format) as a uint8 array.

  kind 'images' -> (n, rows, cols) (magic 0x00000803), 'labels' -> (n,) (magic 0x00000801). Raises
  FileNotFoundError if `path` is missing, ValueError naming the file for a bad gzip stream, a wrong magic
  number or dimensions, or a data size that differs from the one the header declares.
  """
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'{path}: no such file.')
  try:
    with tf.io.gfile.GFile(path, 'rb') as f, gzip.GzipFile(fileobj=f) as g:
      buf = g.read()
  except (OSError, EOFError) as e:
    raise ValueError(f'{path}: not a readable gzip file ({e}).') from e
  ndim = _IDX_DIMS[kind]
  header = 4 + 4 * ndim
  if len(buf) < header:
    raise ValueError(f'{path}: {len(buf)} bytes, shorter than an idx {kind} header ({header} bytes).')
  magic = int.from_bytes(buf[:4], 'big')
  if magic != _IDX_MAGIC[kind]:
    raise ValueError(f'{path}: idx magic number {magic:#010x}, expected {_IDX_MAGIC[kind]:#010x} (unsigned '
                     f'bytes, {ndim} dims) for an idx {kind} file.')
  dims = tuple(int(d) for d in np.frombuffer(buf, '>u4', ndim, offset=4))
  if kind == 'images' and min(dims[1:]) < 1:
    raise ValueError(f'{path}: the header gives images of {dims[1]}x{dims[2]} pixels.')
  size = int(np.prod(dims))
  if len(buf) - header != size:
    raise ValueError(f'{path}: the header declares {" x ".join(map(str, dims))} = {size} bytes of data, '
                     f'the file holds {len(buf) - header}.')
  return np.frombuffer(buf, np.uint8, size, offset=header).reshape(dims)


def _fashion_mnist_missing(why):
  return FileNotFoundError(
      f"data.name='fashion_mnist': {why}. Get the four standard idx files with `apt-get install "
      f"dataset-fashion-mnist` (Debian/Ubuntu; they land in {FASHION_MNIST_DIR}, the default) or from "
      'github.com/zalandoresearch/fashion-mnist into a directory named by data.idx_dir, or run '
      f"`tfds build fashion_mnist --data_dir=DIR` on a machine with a network and set data.data_dir=DIR.")


@functools.lru_cache(maxsize=4)
def _read_fashion_mnist_idx(directory):
  arrays = {}
  for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
    images_path, labels_path = (os.path.join(directory, f) for f in (images_file, labels_file))
    images, labels = read_idx(images_path, 'images'), read_idx(labels_path, 'labels')
    if len(images) != len(labels):
      raise ValueError(f'{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels.')
    if len(labels) and labels.max() > 9:
      raise ValueError(f'{labels_path}: label {labels.max()} is outside the 10 Fashion-MNIST classes 0..9.')
    arrays[split] = (images, labels.astype(np.int32))
  if arrays['train'][0].shape[1:] != arrays['test'][0].shape[1:]:
    raise ValueError(f'{directory}: train images are {arrays["train"][0].shape[1:]} pixels, test images '
                     f'{arrays["test"][0].shape[1:]}.')
  return arrays


@functools.lru_cache(maxsize=4)
def _read_fashion_mnist_tfds(data_dir):
  builder = tfds.builder('fashion_mnist', data_dir=data_dir)
  arrays = {}
  for split in ('train', 'test'):
    ex = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    arrays[split] = (ex['image'][..., 0], ex['label'].astype(np.int32))
  return arrays


def fashion_mnist_arrays(c):
  """{'train': (images, labels), 'test': (...)}: grey uint8 (n, 28, 28) and int32 (n,); read once per place.

  From the idx files in data.idx_dir; with idx_dir None, from FASHION_MNIST_DIR when it exists, else from
  TFDS fashion_mnist prepared in data.data_dir (never downloaded). FileNotFoundError says how to get them.
  """
  directory = c.idx_dir or (FASHION_MNIST_DIR if tf.io.gfile.isdir(FASHION_MNIST_DIR) else None)
  if directory:
    missing = [f for files in FASHION_MNIST_FILES.values() for f in files
               if not tf.io.gfile.exists(os.path.join(directory, f))]
    if missing:
      field = 'data.idx_dir' if c.idx_dir else 'the default directory'
      raise _fashion_mnist_missing(f'{field} {directory} lacks {missing}')
    return _read_fashion_mnist_idx(directory)
  if not tfds.builder('fashion_mnist', data_dir=c.data_dir).is_prepared():
    raise _fashion_mnist_missing(
        f'data.idx_dir is not set, {FASHION_MNIST_DIR} does not exist, and TFDS fashion_mnist is not '
        f'prepared in data.data_dir={c.data_dir!r}')
  return _read_fashion_mnist_tfds(c.data_dir)


def _fashion_mnist(c):
  arrays = dict(fashion_mnist_arrays(c))
  originals = {'test': np.arange(len(arrays['test'][1]))}  # An example's index in its idx file (for its key).
  originals['train'] = class_balanced_subset(arrays['train'][1], c.train_fraction, c.train_subset_seed)
  if c.train_fraction < 1:
    images, labels = arrays['train']
    arrays['train'] = (images[originals['train']], labels[originals['train']])

  def split(name, process_index, process_count):
    split_name = 'train' if name == 'train' else 'test'
    images, labels = arrays[split_name]
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    originals_t = tf.constant(originals[split_name])

    def key(i):
      return tf.strings.join([f'fashion_mnist[{split_name} ', tf.strings.as_string(originals_t[i]), ']'])

    def load(i):  # Grey -> 3 equal channels.
      image = tf.repeat(images_t[i][..., None], 3, axis=-1)
      return {'raw': image, 'label': labels_t[i], 'key': key(i)}

    return _indexed_split(f"fashion_mnist '{split_name}'", len(labels), process_index, process_count, load, key,
                          in_memory=True)

  return Source('fashion_mnist', 10, len(arrays['train'][1]), len(arrays['test'][1]), split)


# ---------------------------------------------------------------------------------------------------------
# Image folder: root/train/<class>/**/*.jpg, root/val/<class>/**/* (val optional); labels are the index of
# the class folder among the sorted train class folders.


def _list_folder(directory):
  """Sorted class names and the sorted (path, class name) pairs below `directory`. A class folder without
  images is not a class (a warning names it)."""
  folders = sorted(d.rstrip('/') for d in tf.io.gfile.listdir(directory)
                   if tf.io.gfile.isdir(os.path.join(directory, d)))
  classes, files = [], []
  for name in folders:
    found = []
    for root, _, filenames in tf.io.gfile.walk(os.path.join(directory, name)):
      found += [(os.path.join(root, f), name) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    if found:
      classes.append(name)
      files += found
    else:
      logging.warning('data.folder: %s has no images (%s); it is not counted as a class.',
                      os.path.join(directory, name), ', '.join(IMAGE_EXTENSIONS))
  return classes, sorted(files)


def _folder(c):
  train_dir = os.path.join(c.folder, 'train')
  if not tf.io.gfile.isdir(train_dir):
    raise FileNotFoundError(f"data.name='folder': no train split at {train_dir}; expected images in "
                            f'{train_dir}/<class>/*.jpg (and optionally {c.folder}/val/<class>/*).')
  classes, train_files = _list_folder(train_dir)
  if not train_files:
    raise FileNotFoundError(f'data.folder: no images ({", ".join(IMAGE_EXTENSIONS)}) in the class folders '
                            f'of {train_dir}.')
  # Like TFDS's prepare-time shuffle: each process's share of the train split then mixes all classes.
  train_files = [train_files[i] for i in np.random.default_rng(0).permutation(len(train_files))]
  if c.train_fraction < 1:
    keep = class_balanced_subset([classes.index(k) for _, k in train_files], c.train_fraction,
                                 c.train_subset_seed)
    train_files = [train_files[i] for i in keep]
  val_dir = os.path.join(c.folder, 'val')
  val_files = []
  if tf.io.gfile.isdir(val_dir):
    val_classes, val_files = _list_folder(val_dir)
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
      raise ValueError(f'data.folder: {val_dir} has class folders {unknown[:5]} that {train_dir} lacks; '
                       'val classes must be a subset of the train classes.')
  class_index = {name: i for i, name in enumerate(classes)}

  def split(name, process_index, process_count):
    if name == 'eval' and not val_files:
      raise FileNotFoundError(f'data.folder: no val split at {val_dir} (expected {val_dir}/<class>/*).')
    files = train_files if name == 'train' else val_files
    paths = tf.constant([p for p, _ in files])
    labels = tf.constant([class_index[k] for _, k in files], tf.int32)
    if c.cache:  # Encoded files held in memory: only for folders that fit.
      contents = tf.constant([tf.io.gfile.GFile(p, 'rb').read() for p, _ in files])
      read = lambda i: contents[i]
    else:
      read = lambda i: tf.io.read_file(paths[i])

    def load(i):
      return {'raw': read(i), 'label': labels[i], 'key': paths[i]}

    split_name = f"folder {c.folder} '{'train' if name == 'train' else 'val'}'"
    return _indexed_split(split_name, len(files), process_index, process_count, load, lambda i: paths[i])

  return Source('folder', len(classes), len(train_files), len(val_files), split)


# ---------------------------------------------------------------------------------------------------------
# TFDS imagenet2012, read from its TFRecord shards directly (file order and shuffling under our control).


def imagenet_builder(c):
  """The prepared TFDS imagenet2012 builder; prepares it from manual_dir's tars if needed. Never downloads.

  In a multi-process job, prepare once beforehand (python -m tinymim_jax.data.prepare).
  """
  builder = tfds.builder('imagenet2012', data_dir=c.data_dir)
  if builder.is_prepared():
    return builder
  where = f'TFDS data_dir {builder.data_dir}'
  missing = [t for t in IMAGENET_TARS
             if not c.manual_dir or not tf.io.gfile.exists(os.path.join(c.manual_dir, t))]
  if missing:
    manual = c.manual_dir or '<data.manual_dir>'
    raise FileNotFoundError(
        f'imagenet2012 is not prepared in {where}, and data.manual_dir={c.manual_dir!r} lacks {missing}. '
        f'Either set data.data_dir to a directory holding a prepared imagenet2012/{builder.version}/, or put '
        f'the two official archives into {manual}/: {manual}/{IMAGENET_TARS[0]} (one inner <wnid>.tar per '
        f'class) and {manual}/{IMAGENET_TARS[1]} (50,000 ILSVRC2012_val_*.JPEG). Class names and '
        'validation labels come from the label files bundled with TFDS; nothing is downloaded.')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=c.manual_dir, try_download_gcs=False))
  return builder


def _imagenet(c):
  builder = imagenet_builder(c)
  splits = builder.info.splits
  for name in ('train', 'validation'):
    if name not in splits:
      raise FileNotFoundError(f'imagenet2012 in {builder.data_dir} has no {name!r} split (it has '
                              f'{sorted(splits)}); re-prepare it with both tars in data.manual_dir.')
  features = builder.info.features
  cycle_length = 16  # Shards read at once.

  def split(name, process_index, process_count):
    tfds_split = 'train' if name == 'train' else 'validation'
    share = splits[tfds.even_splits(tfds_split, n=process_count)[process_index]]
    instructions = share.file_instructions
    files = tf.constant([os.fspath(i.filename) for i in instructions])
    skips = tf.constant([i.skip for i in instructions], tf.int64)
    takes = tf.constant([i.take for i in instructions], tf.int64)

    def epoch(seed, skip):
      order = tf.range(len(instructions), dtype=tf.int64)
      if seed is not None:
        order = transforms.permutation(len(instructions), transforms.fold_in(seed, 1))
      shards = tf.data.Dataset.from_tensor_slices(
          (tf.gather(files, order), tf.gather(skips, order), tf.gather(takes, order)))
      records = shards.interleave(
          lambda f, s, t: tf.data.TFRecordDataset(f, buffer_size=1 << 20).skip(s).take(t),
          cycle_length=min(cycle_length, len(instructions)), block_length=1,
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      if seed is not None:
        shuffle_seed = tf.random.stateless_uniform(
            [], transforms.fold_in(seed, 2), None, None, dtype=tf.int64, alg='philox')
        records = records.shuffle(c.shuffle_buffer, seed=shuffle_seed)
      # Skipping reads (but does not decode) the skipped records.
      return records.enumerate().map(lambda i, r: {'record': r, 'pos': i}).skip(skip)

    def load(d):
      ex = features.deserialize_example(d['record'], decoders={'image': tfds.decode.SkipDecoding()})
      return {'raw': ex['image'], 'label': tf.cast(ex['label'], tf.int32), 'key': ex['file_name']}

    def key(d):  # the record's file name, without touching the image
      spec = {'file_name': tf.io.FixedLenFeature([], tf.string, default_value='')}
      return tf.io.parse_single_example(d['record'], spec)['file_name']

    return Split(f"imagenet2012 '{tfds_split}'", splits[tfds_split].num_examples, share.num_examples,
                 epoch, load, key)

  return Source('imagenet2012', features['label'].num_classes, splits['train'].num_examples,
                splits['validation'].num_examples, split)
