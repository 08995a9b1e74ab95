"""mixup_cutmix (timm 'batch' mode) and to_global, on the 8 fake CPU devices."""
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np
import pytest

from tinymim_jax import data
from tinymim_jax.data import device

import data_testlib

SHAPE = (6, 12, 10, 3)


@jax.jit
def _mix_and_params(rng, images, labels):  # One compile for both (beta sampling compiles slowly).
  return data.mixup_cutmix(rng, images, labels, num_classes=5), device.mix_params(rng, height=12, width=10)


def _numpy_mixup(images, labels, num_classes, smoothing, params):
  """timm Mixup._mix_batch + mixup_target, written out in numpy from the drawn parameters."""
  images = np.array(images, np.float64)
  flipped = images[::-1]
  lam = float(params['lam'])
  if params['use_cutmix']:
    y0, y1, x0, x1 = (int(v) for v in params['box'])
    out = images.copy()
    out[:, y0:y1, x0:x1] = flipped[:, y0:y1, x0:x1]
    assert np.isclose(lam, 1 - (y1 - y0) * (x1 - x0) / (images.shape[1] * images.shape[2]))
  else:
    out = images * lam + flipped * (1 - lam)
  off = smoothing / num_classes
  on = 1 - smoothing + off
  y = np.full((len(labels), num_classes), off)
  y[np.arange(len(labels)), labels] = on
  return out, y * lam + y[::-1] * (1 - lam)


def _example(seed):
  images = jax.random.normal(jax.random.key(100 + seed), SHAPE)
  return jax.random.key(seed), images, jnp.array([0, 3, 1, 4, 4, 2])


def test_mixup_cutmix_matches_numpy():
  modes = set()
  for seed in range(8):
    rng, images, labels = _example(seed)
    (mixed, targets), params = _mix_and_params(rng, images, labels)
    modes.add(bool(params['use_cutmix']))
    ref_images, ref_targets = _numpy_mixup(images, np.asarray(labels), 5, 0.1, params)
    np.testing.assert_allclose(mixed, ref_images, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, ref_targets, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  assert modes == {True, False}


def test_mixup_cutmix_matches_timm(monkeypatch):
  """timm's own Mixup, fed our random draws through a patched np.random."""
  torch = pytest.importorskip('torch')
  timm_mixup = data_testlib.timm_module('mixup')
  checked = 0
  for seed in range(8):
    rng, images, labels = _example(seed)
    (mixed, targets), params = _mix_and_params(rng, images, labels)
    cut = [int(12 * np.sqrt(1 - float(params['beta']))), int(10 * np.sqrt(1 - float(params['beta'])))]
    if params['use_cutmix'] and (cut[0] % 2 or cut[1] % 2):
      continue  # timm >= 0.9 grows odd boxes by a pixel; we keep timm 0.3.2's box (the reference's).
    draws = iter([0.0, 0.0 if params['use_cutmix'] else 0.99])
    monkeypatch.setattr(np.random, 'rand', lambda: next(draws))
    monkeypatch.setattr(np.random, 'beta', lambda a, b: float(params['beta']))
    center = iter(int(v) for v in params['center'])
    monkeypatch.setattr(np.random, 'randint', lambda lo, hi, size=None: next(center))
    mixup = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1,
                             num_classes=5)
    x = torch.tensor(np.asarray(images).transpose(0, 3, 1, 2).copy())
    x, y = mixup(x, torch.tensor(np.asarray(labels)))
    monkeypatch.undo()
    np.testing.assert_allclose(mixed, x.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, y.numpy(), rtol=1e-5, atol=1e-6)
    checked += 1
  assert checked >= 4


def test_timm_label_smoothing_without_mixing():
  _, targets = data.mixup_cutmix(jax.random.key(0), jnp.zeros((4, 8, 8, 3)), jnp.array([1, 1, 1, 1]),
                                 num_classes=10, mixup_alpha=0.0, cutmix_alpha=0.0)
  np.testing.assert_allclose(targets[0], [0.01] + [0.91] + [0.01] * 8, rtol=1e-6)


def test_to_global_shards_over_8_devices():
  devices = np.array(jax.devices())
  assert len(devices) == 8
  mesh = Mesh(devices.reshape(4, 2), ('data', 'fsdp'))
  batch = {'image': np.arange(16 * 4 * 4 * 3, dtype=np.float32).reshape(16, 4, 4, 3),
           'label': np.arange(16, dtype=np.int32)}
  out = data.to_global(batch, mesh, spec=P(('data', 'fsdp')))
  assert out['image'].shape == (16, 4, 4, 3) and out['label'].shape == (16,)
  assert len(out['image'].addressable_shards) == 8
  assert {s.data.shape for s in out['image'].addressable_shards} == {(2, 4, 4, 3)}
  np.testing.assert_array_equal(out['label'], batch['label'])
  single = data.to_global(batch, Mesh(devices, ('data',)))
  assert single['image'].sharding.spec == P('data')
  np.testing.assert_array_equal(single['image'], batch['image'])
