"""Segmentation data: ADE20K folder / zip layouts, bad masks, reduce_zero_label, mmseg's crop rule and rescale,
the training batches and the test path, the digits scenes."""
import os
import shutil

import numpy as np
import pytest

from tinymim_jax.data import segmentation as seg
from tinymim_jax.data._tf import tf


def encode(array, fmt):
  x = tf.constant(array)
  return (tf.io.encode_png(x) if fmt == 'png' else tf.io.encode_jpeg(x)).numpy()


def write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory):
  """ADEChallengeData2016 with 4 good training pairs and 3 bad ones, 2 validation pairs; and its zip."""
  root = tmp_path_factory.mktemp('ade')
  base = root / 'ADEChallengeData2016'
  rng = np.random.RandomState(0)
  masks = {}
  for split, n in (('training', 4), ('validation', 2)):
    for i in range(n):
      h, w = 30 + 5 * i, 50 - 4 * i
      name = f'ADE_{split[:5]}_{i:08d}'
      mask = rng.randint(0, 151, (h, w, 1)).astype(np.uint8)
      mask[: h // 2, : w // 2] = 7  # a large region: the crop rule has something to reject
      write(str(base / 'images' / split / f'{name}.jpg'), encode(rng.randint(0, 255, (h, w, 3), np.uint8), 'jpg'))
      write(str(base / 'annotations' / split / f'{name}.png'), encode(mask, 'png'))
      masks[(split, i)] = mask[..., 0]
  img = encode(np.zeros((20, 20, 3), np.uint8), 'jpg')
  for name, mask in (('bad_size', encode(np.ones((21, 20, 1), np.uint8), 'png')),
                     ('bad_range', encode(np.full((20, 20, 1), 200, np.uint8), 'png')),
                     ('bad_bytes', b'not a png')):
    write(str(base / 'images' / 'training' / f'{name}.jpg'), img)
    write(str(base / 'annotations' / 'training' / f'{name}.png'), mask)
  shutil.make_archive(str(root / 'ADEChallengeData2016'), 'zip', str(root), 'ADEChallengeData2016')
  return str(root), masks


def test_ade20k_folder_zip_and_bad_masks(ade_root):
  root, masks = ade_root
  for path in (root, os.path.join(root, 'ADEChallengeData2016'), os.path.join(root, 'ADEChallengeData2016.zip')):
    src = seg.ade20k(path, 'train')
    assert len(src) == 7 and src.num_classes == 150
    loaded = [src.load(i) for i in range(len(src))]
    assert src.skipped == 3 and sum(x is None for x in loaded) == 3
    good = [x for x in loaded if x is not None]
    for i, (image, label) in enumerate(good):
      assert image.shape[:2] == label.shape and image.dtype == np.uint8
      np.testing.assert_array_equal(label, seg.reduce_zero_label(masks[('training', i)]))
  strict = seg.ade20k(root, 'training', on_bad='error')
  messages = []
  for i in range(len(strict)):
    try:
      strict.load(i)
    except seg.BadMaskError as e:
      messages.append(str(e))
  assert len(messages) == 3
  assert any('bad_size.png: mask is 21x20, its image' in m for m in messages)
  assert any('bad_range.png: labels [200] outside the 150 classes' in m for m in messages)
  assert any('bad_bytes.png: unreadable mask' in m for m in messages)
  with pytest.raises(FileNotFoundError, match='labels/training: no such folder'):
    seg.folder(os.path.join(root, 'ADEChallengeData2016'), split='training', masks='labels', num_classes=3)


def test_reduce_zero_label():
  raw = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
  np.testing.assert_array_equal(seg.reduce_zero_label(raw), [[255, 0, 1], [149, 255, 6]])


def mmseg_crop_choice(label, offsets, crop, ratio=0.75, ignore=255):
  """mmseg RandomCrop.__call__'s loop over the drawn boxes (offsets[k] is the k-th get_crop_bbox draw)."""
  box = offsets[0]
  for k in range(10):
    window = label[box[0]:box[0] + crop, box[1]:box[1] + crop]
    labels, cnt = np.unique(window, return_counts=True)
    cnt = cnt[labels != ignore]
    if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < ratio:
      break
    box = offsets[k + 1]
  return box


def test_crop_rule_matches_mmseg():
  rng = np.random.RandomState(1)
  for trial in range(20):
    label = np.full((40, 40), 3, np.int32)
    label[rng.randint(0, 30):, rng.randint(0, 30):] = rng.randint(0, 5)
    label[rng.rand(40, 40) < 0.1] = 255
    if trial % 4 == 0:
      label[:] = 2  # a single class: every draw is rejected, the 11th box is kept
    offsets = rng.randint(0, 25, (11, 2)).astype(np.int32)
    got = seg.choose_crop(tf.constant(label), tf.constant(offsets), 16).numpy()
    np.testing.assert_array_equal(got, mmseg_crop_choice(label, offsets, 16), err_msg=str(trial))


@pytest.mark.parametrize('h,w', [(30, 50), (500, 375), (512, 2048), (1000, 100)])
def test_rescaled_size_matches_mmcv(h, w):
  scale = (2048, 512)
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))  # mmcv rescale_size
  expect = (int(h * factor + 0.5), int(w * factor + 0.5))
  assert tuple(int(x) for x in seg.rescaled_size(h, w, tf.constant(scale))) == expect


def test_train_batches_and_test_path(ade_root):
  root, masks = ade_root
  src = seg.ade20k(root, 'training')
  kw = dict(batch_size=2, seed=3, crop=48, scale=(64, 32), ratio_range=(0.5, 2.0))
  a = [b for _, b in zip(range(3), seg.train_dataset(src, **kw).as_numpy_iterator())]
  b = [b for _, b in zip(range(3), seg.train_dataset(src, **kw).as_numpy_iterator())]
  for x, y in zip(a, b):  # deterministic in the seed
    np.testing.assert_array_equal(x['label'], y['label'])
    np.testing.assert_allclose(x['image'], y['image'], atol=1e-4)
  batch = a[0]
  assert batch['image'].shape == (2, 48, 48, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (2, 48, 48) and batch['label'].dtype == np.int32
  labels = np.concatenate([x['label'].reshape(-1) for x in a])
  assert set(np.unique(labels)) <= set(range(150)) | {255}
  assert np.any(labels == 255)  # ignored "other" and the padding (ratio 0.5 of (64, 32) is smaller than 48)
  ex = next(seg.eval_examples(seg.ade20k(root, 'val'), scale=(64, 32)))
  assert ex['label'].shape == masks[('validation', 0)].shape == (30, 50)
  assert ex['image'].shape == (32, 53, 3)  # fits (64, 32) keeping the ratio: short side 32


def test_digits_scenes():
  images, labels = seg.digits_scenes(6, size=48, seed=1)
  again, labels2 = seg.digits_scenes(6, size=48, seed=1)
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(labels, labels2)
  assert images.shape == (6, 48, 48, 3) and labels.shape == (6, 48, 48)
  assert labels.max() <= 10 and (labels > 0).any() and (labels == 0).any()
  bright = images[..., 0] >= 64  # a labelled pixel is a bright digit pixel, background is black
  np.testing.assert_array_equal(labels > 0, bright)
  test_images, _ = seg.digits_scenes(6, size=48, seed=1, split='test')
  assert not np.array_equal(images, test_images)
  ds = seg.train_dataset((images, labels), batch_size=3, seed=0, crop=32, scale=(48, 48), ratio_range=(0.75, 1.25))
  batch = next(ds.as_numpy_iterator())
  assert batch['image'].shape == (3, 32, 32, 3) and set(np.unique(batch['label'])) <= set(range(11)) | {255}
