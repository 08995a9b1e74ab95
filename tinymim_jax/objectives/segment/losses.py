"""Per-pixel cross-entropy with an ignore label, and the UperNet loss (decode head + 0.4 x auxiliary head)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinymim_jax.models.segmentation import resize


def cross_entropy(logits, labels, *, ignore_index: int = 255, avg_non_ignore: bool = False, valid=None):
  """Mean per-pixel softmax cross-entropy, pixels labelled `ignore_index` contributing nothing.

  logits (B, H, W, C) any float dtype (computed in float32); labels (B, H, W) int; valid (B,) bool or None
  (padded samples of a last batch: excluded from sum and count). Labels outside 0..C-1 other than
  ignore_index are treated as ignored. Returns a float32 scalar.

  avg_non_ignore=False divides by every pixel (ignored ones included): mmseg 0.11's cross_entropy (reduction
  'mean' over F.cross_entropy(reduction='none') with zeros at ignored pixels), which produced the authors'
  numbers; True divides by the non-ignored pixels only (torch's F.cross_entropy mean; mmseg >= 0.23's
  avg_non_ignore=True).
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  pixels = jnp.ones(labels.shape, bool)
  if valid is not None:
    keep &= valid[:, None, None]
    pixels &= valid[:, None, None]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(keep, nll, 0.0))
  count = jnp.sum(keep if avg_non_ignore else pixels)
  return total / jnp.maximum(count, 1).astype(jnp.float32)


def segment_loss(out, labels, *, aux_weight: float = 0.4, ignore_index: int = 255, avg_non_ignore: bool = False,
                 valid=None):
  """UperNet's loss: CE(decode logits) + aux_weight * CE(auxiliary logits), each head's logits first resized
  (bilinear, align_corners=False) to the label's (H, W) as mmseg's BaseDecodeHead.losses does.

  out: {'logits' (B, h, w, C), 'aux_logits' (B, h', w', C)} (Segmenter's output); labels (B, H, W) int.
  Returns (loss float32 scalar, {'loss_decode', 'loss_aux'}).
  """
  size = labels.shape[1:3]
  kw = dict(ignore_index=ignore_index, avg_non_ignore=avg_non_ignore, valid=valid)
  decode = cross_entropy(resize(out["logits"].astype(jnp.float32), size), labels, **kw)
  parts = {"loss_decode": decode}
  loss = decode
  if aux_weight and "aux_logits" in out:
    aux = cross_entropy(resize(out["aux_logits"].astype(jnp.float32), size), labels, **kw)
    parts["loss_aux"] = aux
    loss = loss + aux_weight * aux
  return loss, parts
