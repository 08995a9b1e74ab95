"""Position encodings of the ViT: MAE's fixed 2-D sin-cos table, DINOv3's rotary tables (applied by
vit.apply_rope), and BEiT's relative position index (the per-block relative position bias of the authors'
segmentation backbone)."""

from __future__ import annotations

import functools

import numpy as np


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> np.ndarray:
  """MAE's fixed 2-D sin-cos table, (1 [+1], grid*grid, dim) float32; CLS row all zeros.

  First dim/2 channels encode the column (x) index, the last dim/2 the row (y) index; each half is
  [sin | cos] over dim/4 frequencies 10000 ** (-k / (dim/4)). Computed in float64, stored as float32.
  """
  if dim % 4:
    raise ValueError(f"sin-cos positional table needs embed_dim divisible by 4, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

  def half(pos):
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  table = np.concatenate([half(xs), half(ys)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table[None].astype(np.float32)


def dinov3_rope(grid: int, head_dim: int, temperature: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
  """DINOv3's 2-D rotary embedding at inference (docs/method.md 1.7): (sin, cos), each (grid*grid, head_dim)
  float32, patches in row-major order (dinov3/layers/rope_position_encoding.py; timm RotaryEmbeddingDinoV3 with
  rotate_half). Raises ValueError for a head dim not divisible by 4.

  Coordinates are the patch centres normalised to [-1, 1] per axis ((i + 0.5) / grid * 2 - 1), [row, col];
  periods temperature ** (2 k / (head_dim / 2)), k < head_dim / 4; angles 2 pi coord / period give head_dim / 2
  values [row freqs | col freqs], repeated twice (the rotate-half layout). float32 throughout, as timm computes.
  """
  if head_dim % 4:
    raise ValueError(f"rotary embedding needs a head dim divisible by 4, got {head_dim}")
  f = np.float32
  t = (np.arange(0.5, grid, dtype=f) / f(grid)).astype(f)
  coords = np.stack(np.meshgrid(t, t, indexing="ij"), axis=-1).reshape(-1, 2)
  coords = (f(2.0) * coords - f(1.0)).astype(f)
  periods = (f(temperature) ** (f(2.0) * np.arange(head_dim // 4, dtype=f) / f(head_dim // 2))).astype(f)
  angles = (f(2 * np.pi) * coords[:, :, None] / periods[None, None, :]).astype(f).reshape(len(coords), -1)
  sin, cos = np.sin(angles), np.cos(angles)
  return np.concatenate([sin, sin], -1), np.concatenate([cos, cos], -1)


# Rows after the (2 grid - 1)^2 offsets in a relative position bias table, by prefix-token count: BEiT's CLS
# (3: CLS -> patch, patch -> CLS, CLS -> CLS) and TinyMIM*-T's CLS + distillation token (6).
REL_POS_EXTRA_ROWS = {1: 3, 2: 6}


@functools.lru_cache(maxsize=None)
def relative_position_index(grid: int, num_prefix_tokens: int = 1) -> np.ndarray:
  """BEiT's (P + grid^2, P + grid^2) int32 index into a relative position bias table, the P prefix tokens first.

  Patch pairs index the (2 grid - 1)^2 relative offsets (dy, dx) row-major. P = 1 (CLS): the last three rows
  of the table are CLS -> patch, patch -> CLS and CLS -> CLS (the authors' Segmentation/TinyMIM backbone/mae.py,
  microsoft/unilm beit/semantic_segmentation/backbone/beit.py). P = 2 (CLS, then the distillation token:
  TinyMIM*-T, Segmentation/TinyMIMstar-T/backbone/mae.py): the last six rows are dist -> any, any -> dist,
  dist -> dist, CLS -> any, any -> CLS, CLS -> CLS, written in that order so that the CLS rows win where they
  overlap (CLS -> dist is the CLS -> any row, dist -> CLS the any -> CLS row).
  Raises ValueError for another P.
  """
  if num_prefix_tokens not in REL_POS_EXTRA_ROWS:
    raise ValueError(f"a relative position bias table covers CLS or CLS + distillation token as prefix, got "
                     f"{num_prefix_tokens} prefix tokens")
  num_distance = (2 * grid - 1) ** 2
  ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  dy = ys[:, None] - ys[None, :] + grid - 1
  dx = xs[:, None] - xs[None, :] + grid - 1
  p = num_prefix_tokens
  index = np.zeros((grid * grid + p,) * 2, np.int32)
  index[p:, p:] = dy * (2 * grid - 1) + dx
  if p == 2:
    index[1, :] = num_distance
    index[:, 1] = num_distance + 1
    index[1, 1] = num_distance + 2
  last = num_distance + REL_POS_EXTRA_ROWS[p]
  index[0, :] = last - 3
  index[:, 0] = last - 2
  index[0, 0] = last - 1
  return index
