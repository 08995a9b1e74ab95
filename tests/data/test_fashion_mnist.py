"""Fashion-MNIST from the four idx .gz files (small ones written here) or from a prepared TFDS directory."""
import gzip
import os

import numpy as np
import pytest

from tests.helpers import fake_fmnist
from tinymim_jax import data
from tinymim_jax.data import sources

NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _cfg(directory, **overrides):
  cfg = data.default_config()
  cfg.name = 'fashion_mnist'
  cfg.idx_dir = str(directory)
  cfg.image_size = 28
  cfg.crop_pct = 1.0
  cfg.student_norm = cfg.teacher_norm = NORM
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


@pytest.fixture(scope='module')
def fake(tmp_path_factory):
  root = tmp_path_factory.mktemp('fmnist')
  return str(root), fake_fmnist.make(str(root), n_train=40, n_test=23)


def test_sizes_and_eval_pixels_are_the_files(fake):
  root, arrays = fake
  info = data.dataset_info(_cfg(root))
  assert (info.name, info.num_classes, info.num_train, info.num_eval) == ('fashion_mnist', 10, 40, 23)
  it = data.make_eval_iterator(_cfg(root), split='test', global_batch_size=16, process_index=0, process_count=1)
  batches = list(it)
  mask = np.concatenate([b['mask'] for b in batches])
  images = np.concatenate([b['image'] for b in batches])[mask]
  labels = np.concatenate([b['label'] for b in batches])[mask]
  assert mask.sum() == 23 and images.shape == (23, 28, 28, 3)
  pixels = images * 0.25 * 255 + 0.5 * 255  # Undo the normalisation.
  for c in range(3):  # Grey enters as 3 equal channels, in file order at the native size.
    np.testing.assert_allclose(pixels[..., c], arrays['test'][0], atol=1e-3)
  np.testing.assert_array_equal(labels, arrays['test'][1])


@pytest.mark.parametrize('mode,keys', [('distill', ('teacher', 'student')), ('mae_pretrain', ('image',)),
                                       ('finetune', ('image',))])
def test_every_mode_at_32_px(fake, mode, keys):
  cfg = _cfg(fake[0], image_size=32, randaug='', reprob=0.0)
  it = data.make_train_iterator(cfg, mode=mode, global_batch_size=8, seed=0, process_index=0, process_count=1)
  assert (it.steps_per_epoch, it.num_classes) == (5, 10)
  batch = next(it)
  assert sorted(batch) == sorted(keys + ('label',))
  for k in keys:
    x = batch[k]
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.float32 and x.std() > 0.1
    np.testing.assert_allclose(x[..., 0], x[..., 2], atol=1e-5)  # Still grey after crop, flip, jitter.
  assert set(batch['label']) <= set(range(10))


def test_default_directory_is_the_debian_package(monkeypatch, fake):
  monkeypatch.setattr(sources, 'FASHION_MNIST_DIR', fake[0])
  cfg = _cfg(fake[0])
  cfg.idx_dir = None
  assert data.dataset_info(cfg).num_train == 40


def test_missing_files_say_how_to_get_them(tmp_path):
  fake_fmnist.make(str(tmp_path), n_train=10, n_test=10)
  os.remove(tmp_path / 't10k-labels-idx1-ubyte.gz')
  with pytest.raises(FileNotFoundError, match=r"data.idx_dir .* lacks \['t10k-labels-idx1-ubyte.gz'\].*"
                                              r'apt-get install dataset-fashion-mnist'):
    data.dataset_info(_cfg(tmp_path))


def test_no_files_and_no_tfds_says_how_to_get_them(monkeypatch, tmp_path):
  monkeypatch.setattr(sources, 'FASHION_MNIST_DIR', str(tmp_path / 'not_installed'))
  cfg = _cfg(tmp_path, idx_dir=None, data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(FileNotFoundError, match=r'not prepared in data.data_dir=.*apt-get install dataset-fashion'
                                              r'-mnist.*tfds build fashion_mnist'):
    data.dataset_info(cfg)


def _replace(path, payload, compress=True):
  os.remove(path)
  fake_fmnist.write(path, payload, compress)


@pytest.mark.parametrize('file,payload,compress,message', [
    ('train-images-idx3-ubyte.gz', fake_fmnist.idx_bytes(np.zeros((10, 28), np.uint8)), True,
     r'magic number 0x00000802, expected 0x00000803'),
    ('train-labels-idx1-ubyte.gz', fake_fmnist.idx_bytes(np.zeros((10, 28, 28), np.uint8)), True,
     r'magic number 0x00000803, expected 0x00000801'),
    ('train-images-idx3-ubyte.gz', fake_fmnist.idx_bytes(np.zeros((10, 28, 28), np.uint8))[:-5], True,
     r'declares 10 x 28 x 28 = 7840 bytes of data, the file holds 7835'),
    ('t10k-images-idx3-ubyte.gz', b'\x00\x00\x08\x03\x00', True, r'shorter than an idx images header'),
    ('t10k-images-idx3-ubyte.gz', fake_fmnist.idx_bytes(np.zeros((10, 28, 28), np.uint8)), False,
     r'not a readable gzip file'),
    ('t10k-images-idx3-ubyte.gz', fake_fmnist.idx_bytes(np.zeros((9, 28, 28), np.uint8)), True,
     r'holds 9 images but .*t10k-labels-idx1-ubyte.gz 10 labels'),
    ('t10k-labels-idx1-ubyte.gz', fake_fmnist.idx_bytes(np.full(10, 10, np.uint8)), True,
     r'label 10 is outside'),
    ('t10k-images-idx3-ubyte.gz', fake_fmnist.idx_bytes(np.zeros((10, 27, 28), np.uint8)), True,
     r'train images are \(28, 28\) pixels, test images \(27, 28\)'),
])
def test_bad_files_are_errors_that_name_the_file(tmp_path, file, payload, compress, message):
  fake_fmnist.make(str(tmp_path), n_train=10, n_test=10)
  _replace(str(tmp_path / file), payload, compress)
  name = file if 'holds 9 images' not in message and 'train images' not in message else ''
  with pytest.raises(ValueError, match=f'{name}.*{message}' if name else message):
    data.dataset_info(_cfg(tmp_path))


def test_read_idx_is_numpy_of_the_payload(tmp_path):
  x = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7)).astype(np.uint8)
  path = str(tmp_path / 'x.gz')
  fake_fmnist.write(path, fake_fmnist.idx_bytes(x))
  np.testing.assert_array_equal(sources.read_idx(path, 'images'), x)
  with gzip.open(path) as f:  # The header is the standard one: magic 2051, then big-endian dims.
    assert f.read(16) == bytes([0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 5, 0, 0, 0, 7])


def test_prepared_tfds_fashion_mnist(monkeypatch, tmp_path):
  """TFDS's own fashion_mnist builder, prepared offline from local idx files, is read when no files are set."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import mnist
  arrays = fake_fmnist.make(str(tmp_path / 'files'), n_train=12, n_test=10)
  raw = {}
  for split, (images_file, labels_file) in fake_fmnist.FILES.items():
    for key, f in (('data', images_file), ('labels', labels_file)):
      raw[f'{split}_{key}'] = str(tmp_path / 'files' / f[:-3])
      with gzip.open(tmp_path / 'files' / f) as src, open(raw[f'{split}_{key}'], 'wb') as dst:
        dst.write(src.read())
  monkeypatch.setattr(mnist, '_TRAIN_EXAMPLES', 12)
  monkeypatch.setattr(mnist, '_TEST_EXAMPLES', 10)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract', lambda self, urls: raw)
  builder = tfds.builder('fashion_mnist', data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))

  monkeypatch.setattr(sources, 'FASHION_MNIST_DIR', str(tmp_path / 'not_installed'))
  cfg = _cfg(tmp_path, idx_dir=None, data_dir=str(tmp_path / 'tfds'))
  assert (data.dataset_info(cfg).num_train, data.dataset_info(cfg).num_eval) == (12, 10)
  batch = next(data.make_eval_iterator(cfg, split='train', global_batch_size=12, process_index=0,
                                       process_count=1))
  # TFDS shuffles at prepare time: compare as sets of (label, image) pairs.
  got = sorted((int(l), (x[..., 1] * 0.25 * 255 + 127.5).round().astype(np.uint8).tobytes())
               for l, x in zip(batch['label'], batch['image']))
  want = sorted((int(l), x.tobytes()) for l, x in zip(arrays['train'][1], arrays['train'][0]))
  assert got == want


def test_train_fraction_is_a_class_balanced_subset(fake):
  """data.train_fraction: per class the first round(f n_c) of a seeded order (at least one), test split whole;
  the train split's images are the files' (keys name their index in the file)."""
  root, arrays = fake  # 40 train images, 4 per class
  labels = arrays['train'][1]
  keep = sources.class_balanced_subset(labels, 0.5, seed=0)
  assert np.array_equal(np.bincount(labels[keep], minlength=10), np.full(10, 2)) and np.all(np.diff(keep) > 0)
  assert np.array_equal(keep, sources.class_balanced_subset(labels, 0.5, seed=0))
  assert not np.array_equal(keep, sources.class_balanced_subset(labels, 0.5, seed=1))
  assert len(sources.class_balanced_subset(labels, 0.01)) == 10  # one per class at least
  assert np.array_equal(sources.class_balanced_subset(labels, 1.0), np.arange(40))
  info = data.dataset_info(_cfg(root, train_fraction=0.5))
  assert (info.num_train, info.num_eval) == (20, 23)
  it = data.make_eval_iterator(_cfg(root, train_fraction=0.5), split='train', global_batch_size=20,
                               process_index=0, process_count=1)
  batch = next(iter(it))
  pixels = batch['image'][..., 0] * 0.25 * 255 + 0.5 * 255
  np.testing.assert_allclose(pixels, arrays['train'][0][keep], atol=1e-3)
  np.testing.assert_array_equal(batch['label'], labels[keep])
  with pytest.raises(ValueError, match='data.train_fraction=0'):
    data.dataset_info(_cfg(root, train_fraction=0.0))
