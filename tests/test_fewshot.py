"""Few-shot least squares: equals a direct numpy ridge solve (both eigen branches) with l2 picked on held-out
train images; draws are nested and disjoint from the held-out set; separable data is solved; errors."""

import numpy as np
import pytest

from tinymim_jax import fewshot


def _data(rng, n, centers, spread):
  y = rng.integers(0, len(centers), size=n)
  return (centers[y] + spread * rng.normal(size=(n, centers.shape[1]))).astype(np.float32), y


def _reference(xtr, ytr, xte, yte, num_classes, shots, draws, val_per_class, l2_regs, seed):
  """big_vision's recipe written out: whiten, bias column 100, {-1, 1} targets, solve (X^T X + l2 I) W = X^T Y."""
  rng = np.random.default_rng(seed)
  acc = {k: [] for k in shots}

  def prep(x, mean, std):
    return np.concatenate([(x - mean) / std, np.full((len(x), 1), 100.0)], axis=1)

  for _ in range(draws):
    picks, val = fewshot.draw(ytr, num_classes, shots, val_per_class, rng)
    for k, idx in picks.items():
      x = xtr[idx].astype(np.float64)
      mean, std = x.mean(0), x.std(0) + 1e-5
      xp = prep(x, mean, std)
      t = np.where(np.arange(num_classes)[None] == ytr[idx][:, None], 1.0, -1.0)
      scores = []
      for l2 in l2_regs:
        w = np.linalg.solve(xp.T @ xp + l2 * np.eye(xp.shape[1]), xp.T @ t)
        scores.append((np.mean((prep(xtr[val], mean, std) @ w).argmax(1) == ytr[val]),
                       np.mean((prep(xte, mean, std) @ w).argmax(1) == yte)))
      best = max(range(len(l2_regs)), key=lambda i: (scores[i][0], -i))
      acc[k].append(scores[best][1])
  return {k: float(np.mean(v)) for k, v in acc.items()}


def test_matches_numpy_ridge_with_l2_chosen_on_held_out_train():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 20))
  xtr, ytr = _data(rng, 400, centers, 1.5)  # overlapping classes: the accuracies are well below 1
  xte, yte = _data(rng, 300, centers, 1.5)
  # 1 and 3 shots x 5 classes (+ bias) < 21 columns: the kernel branch; 25 shots: the primal one.
  shots, l2s = (1, 3, 25), (1e-2, 1.0, 100.0, 1e4)
  got = fewshot.fewshot_top1(xtr, ytr, xte, yte, num_classes=5, shots=shots, draws=3, val_per_class=8,
                             l2_regs=l2s, seed=3)
  want = _reference(xtr, ytr, xte, yte, 5, shots, 3, 8, l2s, seed=3)
  assert got.keys() == want.keys()
  for k in shots:
    assert got[k] == pytest.approx(want[k], abs=1e-12), k
  assert 0.3 < got[1] < got[25] < 1.0


def test_solve_equals_direct_ridge_in_both_branches():
  rng = np.random.default_rng(1)
  for n in (6, 60):  # fewer rows than columns, then more
    x, y = rng.normal(size=(n, 12)), rng.integers(0, 4, size=n)
    ws, mean, std = fewshot.solve(x, y, 4, (0.5, 50.0))
    xp = np.concatenate([(x - mean) / std, np.full((n, 1), 100.0)], axis=1)
    t = 2.0 * np.eye(4)[y] - 1
    for w, l2 in zip(ws, (0.5, 50.0)):
      np.testing.assert_allclose(w, np.linalg.solve(xp.T @ xp + l2 * np.eye(13), xp.T @ t), rtol=1e-8, atol=1e-10)


def test_draws_are_nested_and_never_touch_the_held_out_images():
  labels = np.repeat(np.arange(4), [3, 20, 20, 40])
  picks, val = fewshot.draw(labels, 4, (1, 5, 25), 4, np.random.default_rng(0))
  assert len(val) == 3 + 4 + 4 + 4 and not set(val) & set(picks[25])
  assert set(picks[1]) <= set(picks[5]) <= set(picks[25])
  assert np.bincount(labels[picks[5]], minlength=4).tolist() == [0, 5, 5, 5]  # class 0 is all held out
  assert np.bincount(labels[picks[25]], minlength=4).tolist() == [0, 16, 16, 25]


def test_separable_classes_are_solved_from_one_shot():
  rng = np.random.default_rng(2)
  centers = 10 * rng.normal(size=(10, 32))
  xtr, ytr = _data(rng, 500, centers, 0.1)
  xte, yte = _data(rng, 200, centers, 0.1)
  assert fewshot.fewshot_top1(xtr, ytr, xte, yte, num_classes=10, shots=(1,), draws=2)[1] == 1.0


def test_errors():
  x, y = np.ones((10, 4), np.float32), np.zeros(10, int)
  with pytest.raises(ValueError, match="same d"):
    fewshot.fewshot_top1(x, y, np.ones((3, 5)), np.zeros(3, int), num_classes=2)
  with pytest.raises(ValueError, match="labels must lie"):
    fewshot.fewshot_top1(x, y + 5, x, y, num_classes=2)
  with pytest.raises(ValueError, match="val_per_class"):
    fewshot.fewshot_top1(x, y, x, y, num_classes=1, val_per_class=0)
  with pytest.raises(ValueError, match=r"1-shot not reported: .* have 10 in class\(es\) \[0\]"):
    fewshot.fewshot_top1(x, y, x, y, num_classes=1, shots=(1,), val_per_class=10)
