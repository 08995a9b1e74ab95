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


def test_skipped_files_are_named_by_path(messy_folder, caplog):
  it = data.make_train_iterator(messy_folder, mode='distill', global_batch_size=5, seed=0, process_index=0,
                                process_count=1)
  with caplog.at_level('WARNING'):
    for _ in range(3):
      next(it)
    list(data.make_eval_iterator(messy_folder, split='val', global_batch_size=8, process_index=0, process_count=1))
  for path in BAD + ('val/photo/truncated.jpg',):
    assert os.path.join(messy_folder.folder, path) in caplog.text, caplog.text
  assert 'position' not in caplog.text


def test_an_empty_class_folder_is_not_a_class(tmp_path, caplog):
  files = {f'train/{c}/{k}.png': data_testlib.encode(data_testlib.solid(i), 'PNG')
           for i, c in enumerate('ab') for k in range(3)}
  files['train/empty/notes.txt'] = b'no images here'
  files['val/a/0.png'] = files['train/a/0.png']
  data_testlib.write_files(tmp_path, files)
  os.makedirs(tmp_path / 'val' / 'empty')
  with caplog.at_level('WARNING'):
    info = data.dataset_info(data_testlib.folder_cfg(tmp_path))
  assert (info.num_classes, info.num_train, info.num_eval) == (2, 6, 1)
  assert f'{tmp_path}/train/empty has no images' in caplog.text and 'not counted as a class' in caplog.text


def test_an_image_above_the_pixel_limit_is_skipped_and_counted(tmp_path, caplog):
  files = {f'train/{c}/{k}.png': data_testlib.encode(data_testlib.solid(i), 'PNG')
           for i, c in enumerate('ab') for k in range(3)}
  files['train/a/huge.png'] = data_testlib.black_png(16000, 16000)  # 0.7 MB on disk, 768 MB decoded
  files['val/a/huge.png'] = files['train/a/huge.png']
  files['val/b/0.png'] = files['train/b/0.png']
  data_testlib.write_files(tmp_path, files)
  cfg = data_testlib.folder_cfg(tmp_path)
  assert cfg.max_image_pixels == 89_478_485  # PIL's limit
  it = data.make_train_iterator(cfg, mode='finetune', global_batch_size=7, seed=0, process_index=0, process_count=1)
  with caplog.at_level('WARNING'):
    batch = next(it)  # one epoch: all 7 files
  assert it.skipped == 1 and batch['image'].shape == (7, 16, 16, 3)
  assert os.path.join(str(tmp_path), 'train/a/huge.png') in caplog.text
  ev = data.make_eval_iterator(cfg, split='val', global_batch_size=2, process_index=0, process_count=1)
  (batch,) = list(ev)
  assert ev.skipped == 1 and batch['mask'].tolist() == [False, True]
