"""Image folders: real photos and odd files; undecodable ones are skipped and counted, never fatal."""
import io
import os

import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_sample_image

from tinymim_jax import data

import data_testlib

BAD = ('train/photo/truncated.jpg', 'train/photo/garbage.jpg')


def _jpeg(image, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, 'JPEG', quality=90, **kwargs)
  return buffer.getvalue()


@pytest.fixture(scope='module')
def messy_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('messy')
  china, flower = (Image.fromarray(load_sample_image(n)) for n in ('china.jpg', 'flower.jpg'))
  photo = _jpeg(flower)
  files = {
      'train/photo/china.jpg': _jpeg(china),
      'train/photo/flower.JPEG': photo,
      'train/photo/gray.jpg': _jpeg(china.convert('L')),
      'train/photo/cmyk.jpg': _jpeg(flower.convert('CMYK')),
      'train/photo/png_named.jpg': data_testlib.encode(load_sample_image('china.jpg')[:200, :300], 'PNG'),
      BAD[0]: photo[:len(photo) // 3],
      BAD[1]: os.urandom(3000),
      'train/photo/notes.txt': b'not an image, not listed',
  }
  for k in range(8):  # Generated images of a second class.
    files[f'train/solid/{k}.jpg'] = data_testlib.encode(data_testlib.solid(k, 30 + k, 40))
  files['val/photo/gray.jpg'] = files['train/photo/gray.jpg']
  files['val/photo/cmyk.jpg'] = files['train/photo/cmyk.jpg']
  files['val/photo/truncated.jpg'] = files[BAD[0]]
  files['val/solid/0.jpg'] = files['train/solid/0.jpg']
  data_testlib.write_files(root, files)
  return data_testlib.folder_cfg(root, image_size=24)


def test_folder_info(messy_folder):
  info = data.dataset_info(messy_folder)
  assert (info.num_classes, info.num_train, info.num_eval) == (2, 15, 4)


def test_train_skips_and_counts_undecodable_files(messy_folder):
  it = data.make_train_iterator(messy_folder, mode='distill', global_batch_size=5, seed=0, process_index=0,
                                process_count=1)
  assert it.steps_per_epoch == 3
  labels = []
  for _ in range(3):  # One epoch: all 15 files.
    batch = next(it)
    assert batch['teacher'].shape == (5, 24, 24, 3)
    assert (np.abs(batch['teacher']).reshape(5, -1).max(-1) > 0).all()  # No blank rows.
    labels += list(batch['label'])
  assert it.skipped == 2  # Their rows hold copies of decodable rows of the same batch.
  assert labels.count(0) >= 5 and labels.count(1) >= 8
  for _ in range(3):
    next(it)
  assert it.skipped == 4  # Counted again in the second epoch.


def test_eval_masks_undecodable_files(messy_folder):
  it = data.make_eval_iterator(messy_folder, split='val', global_batch_size=8, process_index=0, process_count=1)
  (batch,) = list(it)
  assert it.skipped == 1
  # Sorted val files: photo/cmyk, photo/gray, photo/truncated, solid/0, then padding.
  np.testing.assert_array_equal(batch['mask'], [True, True, False, True] + [False] * 4)
  np.testing.assert_array_equal(batch['label'][:4], [0, 0, 0, 1])
  mean, std = (np.array(v) for v in messy_folder.student_norm)
  gray = batch['image'][1] * std + mean
  assert np.abs(gray - gray.mean(-1, keepdims=True)).max() < 0.02  # Grayscale comes out as R = G = B.
  cmyk = batch['image'][0] * std + mean
  assert np.abs(cmyk - cmyk.mean(-1, keepdims=True)).max() > 0.1  # CMYK comes out in colour.


def test_folder_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'train')):
    data.dataset_info(data_testlib.folder_cfg(tmp_path))
  data_testlib.write_files(tmp_path, {'train/a/x.jpg': data_testlib.encode(data_testlib.solid(0))})
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'val')):
    data.make_eval_iterator(data_testlib.folder_cfg(tmp_path), split='val', global_batch_size=2,
                            process_index=0, process_count=1)
  cfg = data.default_config()
  cfg.name = 'folder'
  with pytest.raises(ValueError, match='data.folder'):
    data.dataset_info(cfg)
