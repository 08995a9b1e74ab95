"""mmseg's slide inference (EncoderDecoder.slide_inference, 0.11): overlapping windows, logits averaged where
windows overlap, then resized to the annotation's size."""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp

from tinymim_jax.models.segmentation import resize


def window_starts(size: int, crop: int, stride: int) -> list[int]:
  """Start offsets of the windows along one axis: ceil((size - crop) / stride) + 1 windows, the last one moved
  back to end at the border (mmseg: y2 = min(y1 + crop, size), y1 = max(y2 - crop, 0))."""
  grids = max(size - crop + stride - 1, 0) // stride + 1
  return [max(min(i * stride + crop, size) - crop, 0) for i in range(grids)]


def slide_inference(forward: Callable, images, *, crop: int | Sequence[int], stride: int | Sequence[int],
                    out_size: Sequence[int] | None = None):
  """Logits of images larger than the model's input, from overlapping crop windows.

  forward: (N, ch, cw, 3) -> (N, h, w, C) logits at any resolution (a Segmenter's 'logits'); each window's
  logits are resized (bilinear, align_corners=False) to the window, as mmseg's encode_decode does.
  images (B, H, W, 3) with static H, W; an image smaller than the crop is zero-padded up to it (zero is the
  mean after normalisation; the padding's logits are cut away). All windows run as one batch of B x windows.
  out_size: the annotation's (H0, W0) to resize the averaged logits to (rescale=True), or None to keep (H, W).
  Returns (B, H0, W0, C) float32 logits.
  """
  ch, cw = (crop, crop) if isinstance(crop, int) else crop
  sh, sw = (stride, stride) if isinstance(stride, int) else stride
  b, h, w, _ = images.shape
  ph, pw = max(h, ch), max(w, cw)
  if (ph, pw) != (h, w):
    images = jnp.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
  boxes = [(y, x) for y in window_starts(ph, ch, sh) for x in window_starts(pw, cw, sw)]
  crops = jnp.concatenate([images[:, y:y + ch, x:x + cw] for y, x in boxes], axis=0)
  logits = resize(forward(crops).astype(jnp.float32), (ch, cw))
  num_classes = logits.shape[-1]
  total = jnp.zeros((b, ph, pw, num_classes), jnp.float32)
  count = jnp.zeros((1, ph, pw, 1), jnp.float32)
  for i, (y, x) in enumerate(boxes):
    total = total.at[:, y:y + ch, x:x + cw].add(logits[i * b:(i + 1) * b])
    count = count.at[:, y:y + ch, x:x + cw].add(1.0)
  out = (total / count)[:, :h, :w]
  return out if out_size is None else resize(out, out_size)
