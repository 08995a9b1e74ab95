"""A fake imagenet2012, prepared by TFDS 4.9.10 from tars laid out like the official ones, offline."""
import numpy as np
import pytest

from tinymim_jax import data

import data_testlib


def _colors(images, norm):
  mean, std = (np.array(v) for v in norm)
  return np.round(((images * std + mean) * 255).mean((1, 2)))


def _check_colors(images, labels, norm):
  for got, label in zip(_colors(images, norm), labels):
    assert np.abs(got - data_testlib.color_of(label)).max() <= 4, label


def test_info(imagenet_cfg):
  info = data.dataset_info(imagenet_cfg)
  assert (info.num_classes, info.num_train, info.num_eval) == (1000, 12, 6)


def test_val_labels_come_from_tfds_label_files(imagenet_cfg):
  it = data.make_eval_iterator(imagenet_cfg, split='val', global_batch_size=4, process_index=0,
                               process_count=1)
  batches = list(it)
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])[mask]
  images = np.concatenate([b['image'] for b in batches])[mask]
  assert sorted(labels) == sorted(data_testlib.SYNSET_INDEX[s] for s in data_testlib.VAL_SYNSETS)
  _check_colors(images, labels, imagenet_cfg.student_norm)


def test_train_labels_and_process_split(imagenet_cfg):
  cfg = imagenet_cfg.copy_and_resolve_references()
  cfg.color_jitter = 0.0
  per_epoch = []
  for index in range(2):
    it = data.make_train_iterator(cfg, mode='distill', global_batch_size=4, seed=3, process_index=index,
                                  process_count=2)
    assert it.steps_per_epoch == 3
    for _ in range(3):
      batch = next(it)
      _check_colors(batch['teacher'], batch['label'], cfg.teacher_norm)
      per_epoch += list(batch['label'])
  want = sorted(data_testlib.SYNSET_INDEX[s] for s in data_testlib.TRAIN_SYNSETS for _ in range(4))
  assert sorted(per_epoch) == want


def test_eval_split_across_processes(imagenet_cfg):
  labels = []
  for index in range(4):  # 6 examples over 4 processes: shares of 2, 2, 1, 1.
    it = data.make_eval_iterator(imagenet_cfg, split='test', global_batch_size=4, process_index=index,
                                 process_count=4)
    batches = list(it)
    assert len(batches) == 2
    labels += [l for b in batches for l in b['label'][b['mask']]]
  assert sorted(labels) == sorted(data_testlib.SYNSET_INDEX[s] for s in data_testlib.VAL_SYNSETS)


def test_resume_with_shard_order_and_shuffle_buffer(imagenet_cfg):
  kwargs = dict(mode='mae_pretrain', global_batch_size=2, seed=11, process_index=0, process_count=1)
  full = data.make_train_iterator(imagenet_cfg, **kwargs)
  assert full.steps_per_epoch == 6
  batches = [next(full) for _ in range(10)]
  resumed = data.make_train_iterator(imagenet_cfg, start_step=4, **kwargs)
  for want in batches[4:10]:  # Mid-epoch 0, across the boundary, into epoch 1.
    got = next(resumed)
    assert np.array_equal(got['image'], want['image']) and np.array_equal(got['label'], want['label'])


def test_missing_imagenet_says_what_to_put_where(tmp_path):
  cfg = data.default_config()
  cfg.name = 'imagenet2012'
  cfg.data_dir = str(tmp_path / 'tfds')
  cfg.manual_dir = str(tmp_path / 'manual')
  with pytest.raises(FileNotFoundError) as error:
    data.dataset_info(cfg)
  message = str(error.value)
  for needed in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar', str(tmp_path / 'manual'),
                 str(tmp_path / 'tfds')):
    assert needed in message


def test_prepare_cli_reports_the_splits(imagenet_cfg, capsys):
  from tinymim_jax.data import prepare
  prepare.main([f'--data_dir={imagenet_cfg.data_dir}', f'--manual_dir={imagenet_cfg.manual_dir}'])
  assert 'train 12, validation 6' in capsys.readouterr().out
