"""Per-process splitting and exact resumption."""
import numpy as np
import pytest

from tinymim_jax import data
from tinymim_jax.data import config, sources
from tinymim_jax.data._tf import tf

import data_testlib


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches, expected):
  assert len(batches) == len(expected)
  for got, want in zip(batches, expected):
    assert sorted(got) == sorted(want)
    for k in want:
      assert np.array_equal(got[k], want[k]), k


def test_digits_shares_cover_every_example_once_per_epoch():
  c = config.resolve({'image_size': 8})
  source = sources.get(c)
  for count in (1, 2, 3):
    for epoch in range(2):
      seen = []
      for index in range(count):
        split = source.split('train', index, count)
        seed = tf.constant([7, epoch], tf.int64)
        seen += list(split.epoch(seed, 0).batch(2000).get_single_element()['index'].numpy())
      assert sorted(seen) == list(range(1437))


@pytest.fixture(scope='module')
def identity_folder(tmp_path_factory):
  """24 classes of one image each: a label names its example."""
  root = tmp_path_factory.mktemp('identity')
  lib = data_testlib
  lib.write_files(root, {f'train/c{k:02d}/img.jpg': lib.encode(lib.solid(k, 20, 24)) for k in range(24)})
  lib.write_files(root, {f'val/c{k:02d}/img.png': lib.encode(lib.solid(k, 20, 24), 'PNG')
                         for k in range(0, 24, 2)})
  return data_testlib.folder_cfg(root, image_size=8)


def test_train_processes_cover_every_example_once_per_epoch(identity_folder):
  for count in (1, 2):
    epochs = [[], []]
    for index in range(count):
      it = data.make_train_iterator(identity_folder, mode='mae_pretrain', global_batch_size=4, seed=1,
                                    process_index=index, process_count=count)
      assert it.steps_per_epoch == 6
      for step in range(12):
        epochs[step // 6] += list(next(it)['label'])
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))
    assert epochs[0] != epochs[1]  # Reshuffled every epoch.


def test_eval_processes_cover_every_example_once(identity_folder):
  for count in (1, 2, 3):
    labels, lengths = [], set()
    for index in range(count):
      it = data.make_eval_iterator(identity_folder, split='val', global_batch_size=3 * count,
                                   process_index=index, process_count=count)
      batches = list(it)
      lengths.add(len(batches))
      labels += [l for b in batches for l in b['label'][b['mask']]]
    assert len(lengths) == 1  # Every process runs the same number of eval steps.
    assert sorted(labels) == list(range(0, 24, 2))


def test_digits_eval_split_across_processes():
  cfg = data.default_config()
  cfg.image_size = 8
  labels, counts = [], []
  for index in range(3):
    it = data.make_eval_iterator(cfg, split='val', global_batch_size=48, process_index=index, process_count=3)
    batches = list(it)
    counts.append(len(batches))
    labels += [l for b in batches for l in b['label'][b['mask']]]
  assert len(set(counts)) == 1 and len(labels) == 360


def test_resume_reproduces_the_uninterrupted_run():
  cfg = data.default_config()
  cfg.image_size = 16
  cfg.digits_test_fraction = 0.8  # 359 train examples: short epochs.
  kwargs = dict(mode='finetune', global_batch_size=64, seed=5, process_index=1, process_count=2)
  it = data.make_train_iterator(cfg, **kwargs)
  spe = it.steps_per_epoch
  assert spe == 5
  full = _take(it, spe + 5)
  for start in (spe - 1, spe + 2):  # Mid-epoch 0 and on across the boundary; mid-epoch 1.
    resumed = data.make_train_iterator(cfg, start_step=start, **kwargs)
    _assert_same(_take(resumed, 3), full[start:start + 3])
    assert resumed.step == start + 3


def test_bad_arguments_are_named():
  cfg = data.default_config()
  with pytest.raises(ValueError, match='mode'):
    data.make_train_iterator(cfg, mode='pretrain', global_batch_size=8, seed=0, process_index=0,
                             process_count=1)
  with pytest.raises(ValueError, match='global_batch_size'):
    data.make_train_iterator(cfg, mode='mae_pretrain', global_batch_size=9, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match='fewer than one local batch'):
    data.make_train_iterator(cfg, mode='mae_pretrain', global_batch_size=4096, seed=0, process_index=0,
                             process_count=1)
  with pytest.raises(ValueError, match='split'):
    data.make_eval_iterator(cfg, split='validation', global_batch_size=8, process_index=0, process_count=1)
  cfg.crop_pct = 1.5
  with pytest.raises(ValueError, match='crop_pct'):
    data.dataset_info(cfg)
  with pytest.raises(ValueError, match='colour_jitter'):
    data.dataset_info({'colour_jitter': 0.4})
