"""mIoU / mAcc / aAcc as mmseg defines them (mmseg/core/evaluation/metrics.py, 0.11): per-class intersection,
union, label and prediction areas summed over the whole set, then the ratios; a class whose union (IoU) or
label area (Acc) is zero over the set gives NaN and is left out of the mean."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def intersect_and_union(pred, labels, num_classes: int, *, ignore_index: int = 255, valid=None):
  """Per-class pixel areas of one batch: (4, num_classes) int32 rows [intersect, union, pred_label, label].

  pred, labels (B, H, W) int; valid (B,) bool or None (padded samples of a last batch count nothing). Pixels
  labelled ignore_index (or outside 0..num_classes-1, which mmseg's histogram drops) are excluded from every
  area, the prediction's included. Under jit over a sharded batch the sums are over the global batch.
  Sum the rows over batches in int64 on the host (a whole val set overflows int32).
  """
  labels = labels.astype(jnp.int32)
  pred = pred.astype(jnp.int32)
  keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  if valid is not None:
    keep &= valid[:, None, None]
  keep = keep.reshape(-1)
  labels, pred = labels.reshape(-1), pred.reshape(-1)

  def hist(x, w):
    return jnp.zeros((num_classes,), jnp.int32).at[jnp.clip(x, 0, num_classes - 1)].add(w.astype(jnp.int32))

  area_label = hist(labels, keep)
  area_pred = hist(pred, keep & (pred >= 0) & (pred < num_classes))
  area_intersect = hist(labels, keep & (pred == labels))
  return jnp.stack([area_intersect, area_pred + area_label - area_intersect, area_pred, area_label])


def area_metrics(areas, class_names=None) -> dict:
  """mmseg's total_area_to_metrics on summed areas ((4, C) as intersect_and_union's rows).

  Returns {'mIoU', 'mAcc', 'aAcc'} (fractions in [0, 1], NaN if nothing was labelled) and the per-class
  'IoU' / 'Acc' float64 arrays (NaN for a class absent from both prediction and label, resp. from the label).
  """
  intersect, union, _, label = np.asarray(areas, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = intersect / union
    acc = intersect / label
    a_acc = intersect.sum() / label.sum()
  out = {"aAcc": float(a_acc), "mIoU": _nanmean(iou), "mAcc": _nanmean(acc), "IoU": iou, "Acc": acc}
  if class_names is not None:
    out["classes"] = list(class_names)
  return out


def _nanmean(x):
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float("nan")
