"""Shared pieces of the converter tests: tiny models, random weights, torch-side references."""

import functools

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx

from tests.helpers import torch_ref
from tinymim_jax import convert, create_model

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
MAE_DECODER = dict(embed_dim=32, depth=1, num_heads=4)


def tiny(**overrides):
  return create_model("vit_tiny_patch16", **{**TINY, **overrides})





def random_weights(model, seed=0):
  """The model's export with every entry redrawn (same names and shapes)."""
  rs = np.random.RandomState(seed)
  return {k: (v + rs.normal(0, 0.05, v.shape)).astype(np.float32)
          for k, v in convert.export_pytorch_weights(model).items()}


def as_torch(weights):
  return {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}


def assert_same(a, b):
  """Two state dicts hold the same names (in any order: order is checked where it is meant) and equal arrays."""
  assert set(a) == set(b), f"only in the first: {sorted(set(a) - set(b))}; only in the second: {sorted(set(b) - set(a))}"
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def images(size=32, batch=2, seed=0):
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def assert_close(ours, ref, tol=1e-5):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  assert np.max(np.abs(ours - ref)) <= tol * max(1.0, np.max(np.abs(ref)))


@functools.partial(nnx.jit, static_argnames=("depth",))
def forward(model, x, depth=None):
  return model(x, depth=depth)


def timm_vit(shape=TINY, pooling="cls", num_classes=0, seed=0):
  return torch_ref.timm_vit(shape, pooling, num_classes, seed)


def torch_resample(pos, new, prefix=1):
  pos = torch.from_numpy(pos)
  old = int(round((pos.shape[1] - prefix) ** 0.5))
  grid = pos[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
  return torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1).numpy()
