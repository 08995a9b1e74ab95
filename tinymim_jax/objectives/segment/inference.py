"""mmseg's slide inference (EncoderDecoder.slide_inference, 0.11): overlapping windows, logits averaged where
windows overlap, then resized to the annotation's size. slide_inference runs inside one jit (one compile per
image size); slide_areas is the same computation driven from the host, whose forward compiles once."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tinymim_jax.models.segmentation import resize
from tinymim_jax.objectives.segment.metrics import intersect_and_union


def window_starts(size: int, crop: int, stride: int) -> list[int]:
  """Start offsets of the windows along one axis: ceil((size - crop) / stride) + 1 windows, the last one moved
  back to end at the border (mmseg: y2 = min(y1 + crop, size), y1 = max(y2 - crop, 0))."""
  grids = max(size - crop + stride - 1, 0) // stride + 1
  return [max(min(i * stride + crop, size) - crop, 0) for i in range(grids)]


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
  """A crop or stride given as one int or as (height, width)."""
  return (size, size) if isinstance(size, int) else tuple(size)


def window_boxes(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]):
  """(padded height, padded width, [(y, x) window starts]) of slide_inference for an image of (height, width)."""
  ph, pw = max(height, crop[0]), max(width, crop[1])  # an image smaller than the crop is padded up to it
  ys, xs = window_starts(ph, crop[0], stride[0]), window_starts(pw, crop[1], stride[1])
  return ph, pw, [(y, x) for y in ys for x in xs]


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
  (ch, cw), (sh, sw) = _hw(crop), _hw(stride)
  b, h, w, _ = images.shape
  ph, pw, boxes = window_boxes(h, w, (ch, cw), (sh, sw))
  if (ph, pw) != (h, w):
    images = jnp.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
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


# ---------------------------------------------------------------------------------------------------------
# The same inference with one compiled forward for every image size (a val set's images differ in size, and a
# forward jitted per size would compile once per distinct size: hundreds of times on ADE20K).
@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(total, logits, image, ys, xs, keep):
  """total (B, PH, PW, C) += each window's logits (K, ch, cw, C) at (image[k], ys[k], xs[k]) where keep[k]."""
  ch, cw = logits.shape[1:3]

  def add(k, total):
    at = (image[k], ys[k], xs[k], 0)
    window = jax.lax.dynamic_slice(total, at, (1, ch, cw, total.shape[-1]))
    return jax.lax.dynamic_update_slice(total, window + jnp.where(keep[k], logits[k], 0.0)[None], at)

  return jax.lax.fori_loop(0, logits.shape[0], add, total)


@functools.partial(jax.jit, static_argnames=("height", "width", "num_classes", "ignore_index"))
def _areas(total, count, labels, valid, *, height, width, num_classes, ignore_index):
  logits = resize((total / count)[:, :height, :width], labels.shape[1:3])
  return intersect_and_union(jnp.argmax(logits, axis=-1), labels, num_classes, ignore_index=ignore_index,
                             valid=valid)


def slide_areas(window_logits: Callable, images, labels, *, crop: int | Sequence[int], stride: int | Sequence[int],
                num_classes: int, chunk: int, ignore_index: int = 255, valid=None, put: Callable = jnp.asarray):
  """intersect_and_union of slide_inference's argmax for a batch of images of one size, the forward compiled once.

  window_logits: (chunk, ch, cw, 3) numpy windows -> (chunk, ch, cw, C) float32 jax array, a jitted forward
  (the model's logits resized to the window, as slide_inference does inside) that places the windows itself
  (e.g. sharded over the batch); it always gets `chunk` windows (the last group zero-filled), so it compiles
  once whatever the image size. images (B, H, W, 3) and labels (B, H0, W0) host arrays (numpy);
  valid (B,) bool or None. put(host array) -> the array the jitted accumulation reads (a replicated global
  array under a multi-process mesh). The accumulation and the final resize compile per image size, small
  functions. Returns (4, num_classes) int32 areas, equal to jitting slide_inference + intersect_and_union on the
  batch (tests/segment/test_pieces.py).
  """
  (ch, cw), (sh, sw) = _hw(crop), _hw(stride)
  images = np.asarray(images)
  b, h, w, _ = images.shape
  ph, pw, boxes = window_boxes(h, w, (ch, cw), (sh, sw))
  if (ph, pw) != (h, w):
    images = np.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
  count = np.zeros((1, ph, pw, 1), np.float32)
  for y, x in boxes:
    count[:, y:y + ch, x:x + cw] += 1.0
  # Window-major order (every image's first window, then every image's second, ...), as slide_inference.
  order = [(i, y, x) for y, x in boxes for i in range(b)]
  total = None
  for start in range(0, len(order), chunk):
    part = order[start:start + chunk]
    n = len(part)
    part = part + [part[-1]] * (chunk - n)
    crops = np.stack([images[i, y:y + ch, x:x + cw] for i, y, x in part])
    crops[n:] = 0.0
    logits = window_logits(crops)
    if total is None:
      total = put(np.zeros((b, ph, pw, logits.shape[-1]), np.float32))
    image, ys, xs = (put(np.asarray(col, np.int32)) for col in zip(*part))
    total = _accumulate(total, logits, image, ys, xs, put(np.arange(chunk) < n))
  valid = np.ones((b,), bool) if valid is None else np.asarray(valid, bool)
  return _areas(total, put(count), put(np.asarray(labels, np.int32)), put(valid), height=h, width=w,
                num_classes=num_classes, ignore_index=ignore_index)
