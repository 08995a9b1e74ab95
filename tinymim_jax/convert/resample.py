"""Positional-table resampling to another patch grid, numerically torch's bicubic F.interpolate, in numpy."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tinymim_jax.convert.errors import ConvertError


def _bicubic_matrix(n_in: int, n_out: int, scale_factor: float | None = None) -> np.ndarray:
  """(n_out, n_in) weights of torch's bicubic resize along one axis (align_corners=False, no antialias).

  aten's upsample_bicubic2d: cubic convolution with A = -0.75 at the source coordinate
  scale * (dst + 0.5) - 0.5, scale = n_in / n_out (not clamped at 0), the four taps clamped to the border; with
  F.interpolate(scale_factor=s) (DINOv2) scale = float32(1 / s) instead (aten's area_pixel_compute_scale).
  aten does this arithmetic in float32 with fused multiply-adds (x86-64 builds), and the float32 rounding
  of the coordinate alone moves the result by ~n_in * 1e-7; so we follow it: `fma` rounds x * y + z once,
  via float64 where the product of two float32 values is exact.
  """
  f = np.float32

  def fma(x, y, z):
    return (np.float64(x) * np.float64(y) + np.float64(z)).astype(f)

  a = f(-0.75)
  scale = f(n_in) / f(n_out) if scale_factor is None else f(1.0 / scale_factor)
  src = fma(scale, np.arange(n_out, dtype=f) + f(0.5), f(-0.5))
  i0 = np.floor(src)
  t = src - i0

  def near(x):  # |x| <= 1: ((A + 2) x - (A + 3)) x^2 + 1
    return fma(fma(a + f(2), x, -(a + f(3))) * x, x, f(1))

  def far(x):  # 1 < |x| < 2: ((A x - 5A) x + 8A) x - 4A
    return fma(fma(fma(a, x, -f(5) * a), x, f(8) * a), x, -f(4) * a)

  w = np.stack([far(t + f(1)), near(t), near(f(1) - t), far(f(2) - t)], axis=1).astype(np.float64)
  taps = np.clip(i0[:, None].astype(np.int64) + np.arange(-1, 3)[None], 0, n_in - 1)
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.repeat(np.arange(n_out), 4), taps.reshape(-1)), w.reshape(-1))
  return m


def _bicubic_aa_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of torch's antialiased bicubic resize (F.interpolate(mode='bicubic', antialias=True,
  align_corners=False); aten's _upsample_bicubic2d_aa, PIL's filter): Keys' cubic with A = -0.5, its support
  widened by the scale when shrinking, each row normalised to sum 1. In float64 (aten: the input's dtype)."""
  scale = n_in / n_out
  support = 2.0 * scale if scale >= 1.0 else 2.0
  inv = 1.0 / scale if scale >= 1.0 else 1.0

  def cubic(x):
    x, a = np.abs(x), -0.5
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))

  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    w = cubic((np.arange(lo, hi) - center + 0.5) * inv)
    m[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
  return m


# How a positional table is resampled, by the family that defines the method (docs/method.md 7.8):
#   'mae'    MAE's interpolate_pos_embed: F.interpolate(size=new, mode='bicubic', align_corners=False)
#   'dinov2' DINOv2's interpolate_pos_encoding: F.interpolate(scale_factor=(new + 0.1) / old, mode='bicubic'),
#            no antialias (dinov2/models/vision_transformer.py, interpolate_offset=0.1)
#   'timm'   timm's checkpoint_filter_fn -> resample_abs_pos_embed: F.interpolate(size=new, mode='bicubic',
#            antialias=True)
RESAMPLE_METHODS = ("mae", "dinov2", "timm")


def _matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  if method == "mae":
    return _bicubic_matrix(n_in, n_out)
  if method == "dinov2":
    return _bicubic_matrix(n_in, n_out, scale_factor=(n_out + 0.1) / n_in)
  if method == "timm":
    return _bicubic_aa_matrix(n_in, n_out)
  raise ConvertError(f"unknown positional-table resampling {method!r}; use one of {', '.join(RESAMPLE_METHODS)}")


def resample_pos_embed(pos: np.ndarray, new_grid: int | Sequence[int], num_prefix_tokens: int = 1,
                       old_grid: int | Sequence[int] | None = None, method: str = "mae") -> np.ndarray:
  """Resamples a (1, prefix + H*W, D) table to a new grid; prefix tokens (CLS, ...) are kept as they are.

  Bicubic over the (row, col) grid, numerically the torch F.interpolate call of `method` (RESAMPLE_METHODS:
  MAE's, DINOv2's, timm's) in numpy, so no torch is needed. The taps are summed in float64; returned in the
  input dtype. Raises ConvertError for a table that is not the old grid, or an unknown method.
  """
  pos = np.asarray(pos)
  n = pos.shape[1] - num_prefix_tokens
  if old_grid is None:
    old_grid = math.isqrt(n)
  oh, ow = (old_grid, old_grid) if isinstance(old_grid, int) else tuple(old_grid)
  nh, nw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
  if oh * ow != n:
    raise ConvertError(f"positional table with {n} patch rows is not a {oh}x{ow} grid")
  grid = pos[0, num_prefix_tokens:].astype(np.float64).reshape(oh, ow, -1)
  grid = np.einsum("yh,hwd,xw->yxd", _matrix(oh, nh, method), grid, _matrix(ow, nw, method))
  out = np.concatenate([pos[0, :num_prefix_tokens].astype(np.float64), grid.reshape(nh * nw, -1)])
  return out[None].astype(pos.dtype)


def square_grid(n: int):
  g = math.isqrt(max(n, 0))
  return g if g * g == n and g > 0 else None


def resample_grids(have: tuple, want: tuple, prefix: int):
  """((old, old), (new, new)) when a (1, prefix + old^2, D) table can be resampled to `want`, else None."""
  if len(have) != 3 or len(want) != 3 or have[0] != 1 or have[2] != want[2]:
    return None
  old, new = square_grid(have[1] - prefix), square_grid(want[1] - prefix)
  return ((old, old), (new, new)) if old and new else None
