"""Few-shot linear evaluation of frozen features: closed-form regularised least squares (big_vision).

As big_vision's few-shot evaluator (big_vision/evaluators/fewshot_lsr.py): for k shots per class, the k-shot
train features are whitened (their mean and std + 1e-5), a constant 100 column is appended (an almost
unregularised bias), the labels become one-vs-all targets in {-1, +1}, and

    W = (X^T X + l2 I)^-1 X^T Y        (or X^T (X X^T + l2 I)^-1 Y when there are fewer rows than columns)

is solved through one eigendecomposition, so that every l2 of a grid costs one matrix product. The predicted
class is argmax(x W). Unlike big_vision (a fixed l2 = 1024), l2 is chosen per draw on held-out train images
(`val_per_class` per class, never among the shots), and the test accuracy at that l2 is reported, averaged
over `draws` random draws of the shots. Computed in float64 numpy on the host (the matrices are at most
(shots x classes)^2 or D^2).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BIAS_CONSTANT = 100.0
DEFAULT_L2 = tuple(2.0 ** k for k in range(-6, 17, 2))


def _check(train_feats, train_labels, test_feats, test_labels, num_classes):
  if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
    raise ValueError(f"features must be (n, d) with the same d: train {train_feats.shape}, test {test_feats.shape}")
  if train_labels.shape != (len(train_feats),) or test_labels.shape != (len(test_feats),):
    raise ValueError(f"labels {train_labels.shape} / {test_labels.shape} do not match the features "
                     f"{train_feats.shape} / {test_feats.shape}")
  if len(train_labels) and (train_labels.min() < 0 or train_labels.max() >= num_classes):
    raise ValueError(f"train labels must lie in [0, {num_classes})")


def draw(train_labels, num_classes: int, shots: Sequence[int], val_per_class: int, rng: np.random.Generator):
  """One draw: ({k: indices of k shots per class}, indices of the held-out images), disjoint.

  Each class's indices are permuted; its first `val_per_class` are held out, and the k shots are the next k
  (all that is left if fewer: fewshot_top1 asks for no more than every class has), so the shot sets are nested (as big_vision's) and never meet the held-out set.
  """
  per_class = [rng.permutation(np.flatnonzero(train_labels == c)) for c in range(num_classes)]
  val = np.concatenate([p[:val_per_class] for p in per_class])
  picks = {k: np.concatenate([p[val_per_class:val_per_class + k] for p in per_class]) for k in shots}
  return picks, val


def supported_shots(train_labels, num_classes: int, shots: Sequence[int], val_per_class: int
                    ) -> tuple[tuple[int, ...], str | None]:
  """-> (the shot counts every class has images for: val_per_class held out + k shots, a line naming the class
  counts when some shot counts are left out, else None). A k-shot score from fewer than k shots per class would
  be a smaller metric under k's name."""
  counts = np.bincount(np.asarray(train_labels, np.int64), minlength=num_classes)[:num_classes]
  fewest = int(counts.min()) if len(counts) else 0
  ok = tuple(k for k in shots if fewest >= val_per_class + k)
  if len(ok) == len(tuple(shots)):
    return ok, None
  short = [c for c in range(num_classes) if counts[c] == fewest][:5]
  dropped = [k for k in shots if k not in ok]
  return ok, (f"few-shot {', '.join(f'{k}-shot' for k in dropped)} not reported: k shots need {val_per_class} "
              f"held-out + k train images in every class (eval.fewshot.val_per_class={val_per_class}); the "
              f"{len(train_labels)} train images read have {fewest} in class(es) {short} (per class: min "
              f"{fewest}, median {int(np.median(counts)) if len(counts) else 0}, max {int(counts.max()) if len(counts) else 0})")


def _preprocess(x, mean, std):
  x = (x - mean) / std
  return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def solve(x, y, num_classes: int, l2_regs: Sequence[float]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
  """Ridge weights for each l2 in `l2_regs` -> ([W (D+1, C) per l2], mean, std) of the whitening.

  x: (n, D) features, y: (n,) int labels. Float64.
  """
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0, keepdims=True)
  std = x.std(axis=0, keepdims=True) + 1e-5
  xp = _preprocess(x, mean, std)
  targets = 2.0 * np.eye(num_classes)[y] - 1.0
  n, d = xp.shape
  if n >= d:  # (X^T X + l2 I)^-1 X^T Y = Q diag(1 / (e + l2)) Q^T X^T Y
    eigs, q = np.linalg.eigh(xp.T @ xp)
    lhs, rhs = q, q.T @ (xp.T @ targets)
  else:       # X^T (X X^T + l2 I)^-1 Y = X^T Q diag(1 / (e + l2)) Q^T Y
    eigs, q = np.linalg.eigh(xp @ xp.T)
    lhs, rhs = xp.T @ q, q.T @ targets
  return [(lhs / (eigs + l2)) @ rhs for l2 in l2_regs], mean, std


def _accuracy(w, mean, std, x, y):
  return float(np.mean(np.argmax(_preprocess(np.asarray(x, np.float64), mean, std) @ w, axis=1) == y))


def fewshot_top1(train_feats, train_labels, test_feats, test_labels, *, num_classes: int,
                 shots: Sequence[int] = (1, 5, 10, 25), draws: int = 3, val_per_class: int = 10,
                 l2_regs: Sequence[float] = DEFAULT_L2, seed: int = 0) -> dict[int, float]:
  """{k: mean test top-1 in [0, 1] over `draws` draws of k shots per class} (see the module docstring).

  Features (n, D) float arrays; labels ints in [0, num_classes). Raises ValueError when the train features
  leave no held-out image (val_per_class < 1), when some class has fewer than val_per_class + k train images
  for a k in `shots` (supported_shots names the class counts), or shapes / labels do not match.
  """
  train_feats, test_feats = np.asarray(train_feats), np.asarray(test_feats)
  train_labels, test_labels = np.asarray(train_labels).astype(np.int64), np.asarray(test_labels).astype(np.int64)
  _check(train_feats, train_labels, test_feats, test_labels, num_classes)
  if val_per_class < 1 or draws < 1:
    raise ValueError(f"few-shot needs val_per_class >= 1 held-out images per class to choose l2 and draws >= 1, "
                     f"got {val_per_class}, {draws}")
  ok, problem = supported_shots(train_labels, num_classes, shots, val_per_class)
  if problem is not None:
    raise ValueError(problem)
  rng = np.random.default_rng(seed)
  acc = {k: [] for k in shots}
  for _ in range(draws):
    picks, val = draw(train_labels, num_classes, shots, val_per_class, rng)
    for k, idx in picks.items():
      ws, mean, std = solve(train_feats[idx], train_labels[idx], num_classes, l2_regs)
      val_acc = [_accuracy(w, mean, std, train_feats[val], train_labels[val]) for w in ws]
      best = int(np.argmax(val_acc))  # the first (smallest l2) of ties
      acc[k].append(_accuracy(ws[best], mean, std, test_feats, test_labels))
  return {k: float(np.mean(v)) for k, v in acc.items()}
