"""The embedded default dataset: scikit-learn digits, through every mode."""
import types

import numpy as np
import pytest
from sklearn import datasets, model_selection

from tinymim_jax import data


def _cfg(**overrides):
  cfg = data.default_config()
  cfg.image_size = 16
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def test_digits_is_the_default_and_its_split():
  assert data.default_config().name == 'digits'
  info = data.dataset_info(_cfg())
  assert (info.num_classes, info.num_train, info.num_eval, info.image_size) == (10, 1437, 360, 16)
  info = data.dataset_info(_cfg(digits_test_fraction=0.5))
  assert (info.num_train, info.num_eval) == (898, 899)


@pytest.mark.parametrize('mode,keys', [('distill', ('teacher', 'student')), ('mae_pretrain', ('image',)),
                                       ('finetune', ('image',))])
def test_every_mode(mode, keys):
  it = data.make_train_iterator(_cfg(), mode=mode, global_batch_size=32, seed=0, process_index=0,
                                process_count=1)
  assert (it.steps_per_epoch, it.num_classes) == (1437 // 32, 10)
  for _ in range(2):
    batch = next(it)
    assert sorted(batch) == sorted(keys + ('label',))
    for k in keys:
      assert batch[k].shape == (32, 16, 16, 3) and batch[k].dtype == np.float32
      assert np.isfinite(batch[k]).all() and batch[k].std() > 0.1
    assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
    assert 0 <= batch['label'].min() and batch['label'].max() < 10
  assert it.skipped == 0 and it.step == 2


def test_eval_covers_the_test_split_once():
  labels = datasets.load_digits().target
  _, test = model_selection.train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                                             random_state=0)
  it = data.make_eval_iterator(_cfg(), split='test', global_batch_size=64, process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == len(it) == 6
  mask = np.concatenate([b['mask'] for b in batches])
  got = np.concatenate([b['label'] for b in batches])[mask]
  assert mask.sum() == 360 and not mask[360:].any()
  np.testing.assert_array_equal(np.bincount(got, minlength=10), np.bincount(labels[test], minlength=10))
  assert all(b['image'].shape == (64, 16, 16, 3) for b in batches)


def test_uncached_digits_match_cached():
  kwargs = dict(split='test', global_batch_size=40, process_index=0, process_count=1)
  cached = next(data.make_eval_iterator(_cfg(), **kwargs))
  uncached = next(data.make_eval_iterator(_cfg(cache=False), **kwargs))
  np.testing.assert_array_equal(cached['label'], uncached['label'])
  np.testing.assert_allclose(cached['image'], uncached['image'], atol=1e-5)


def test_config_may_be_any_attribute_object():
  info = data.dataset_info(types.SimpleNamespace(image_size=8, digits_test_fraction=0.25))
  assert (info.num_train, info.num_eval, info.image_size) == (1347, 450, 8)
