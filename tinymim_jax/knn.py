"""Weighted k-NN classification of frozen features (Wu et al. 2018, as used by DINO for evaluation).

Features are L2-normalised; each test example takes its k most cosine-similar train examples, and each
neighbour votes for its label with weight exp(sim / T); the prediction is the label with the largest
total vote. Test examples go through in fixed-size chunks (one jit, the last chunk padded) so memory is
O(batch x n_train) and there is a single compilation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _normalize(x):
  # eps keeps the zero rows of a padded chunk finite (they are dropped afterwards anyway).
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


_normalize_jit = jax.jit(_normalize)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _predict_chunk(train_n, train_labels, test, temperature, *, k, num_classes):
  # HIGHEST: GPUs/TPUs default to tf32/bf16 matmuls, which reorder near-tied neighbours.
  sim = jnp.dot(_normalize(test), train_n.T, precision=jax.lax.Precision.HIGHEST)  # (b, n_train)
  top_sim, top_idx = jax.lax.top_k(sim, k)                                           # (b, k)
  weights = jnp.exp(top_sim / temperature)
  votes = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=weights.dtype)   # (b, k, C)
  return jnp.argmax(jnp.einsum("bkc,bk->bc", votes, weights), axis=-1)


def _check_inputs(train_feats, train_labels, test_feats, k):
  if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
    raise ValueError(f"features must be (n, d) with the same d: train {train_feats.shape}, "
                     f"test {test_feats.shape}")
  if train_labels.shape != (train_feats.shape[0],):
    raise ValueError(f"train_labels {train_labels.shape} do not match train_feats {train_feats.shape}")
  n_train = train_feats.shape[0]
  if not 1 <= k <= n_train:
    raise ValueError(f"k={k} neighbours requested but there are {n_train} train examples "
                     f"(need 1 <= k <= {n_train})")


def knn_predict(train_feats, train_labels, test_feats, *, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None, batch: int = 1024) -> np.ndarray:
  """Predicted labels (int32 numpy, one per test example) of the weighted k-NN classifier.

  Features: float numpy or jax arrays, (n, d). Labels: ints in [0, num_classes); num_classes defaults to
  max(train_labels) + 1.
  """
  train_feats = jnp.asarray(train_feats, jnp.float32)
  test_feats = jnp.asarray(test_feats, jnp.float32)
  train_labels = np.asarray(train_labels).astype(np.int32)
  _check_inputs(train_feats, train_labels, test_feats, k)
  if num_classes is None:
    num_classes = int(train_labels.max()) + 1
  if train_labels.min() < 0 or train_labels.max() >= num_classes:
    raise ValueError(f"train labels must lie in [0, {num_classes})")
  n_test = test_feats.shape[0]
  if n_test == 0:
    return np.zeros((0,), np.int32)

  train_n = _normalize_jit(train_feats)
  labels = jnp.asarray(train_labels)
  b = min(batch, n_test)  # a small test set is one exact chunk rather than mostly padding
  preds = []
  for start in range(0, n_test, b):
    chunk = test_feats[start:start + b]
    n = chunk.shape[0]
    if n < b:
      chunk = jnp.pad(chunk, ((0, b - n), (0, 0)))
    out = _predict_chunk(train_n, labels, chunk, jnp.float32(temperature), k=k, num_classes=num_classes)
    preds.append(np.asarray(out[:n]))
  return np.concatenate(preds).astype(np.int32)


def knn_top1(train_feats, train_labels, test_feats, test_labels, *, k: int = 20, temperature: float = 0.07,
             num_classes: int | None = None, batch: int = 1024) -> float:
  """Top-1 accuracy in [0, 1] of the weighted k-NN classifier (see knn_predict)."""
  test_labels = np.asarray(test_labels).astype(np.int32)
  if test_labels.shape != (np.shape(test_feats)[0],):
    raise ValueError(f"test_labels {test_labels.shape} do not match test_feats {np.shape(test_feats)}")
  if num_classes is None:
    num_classes = int(max(np.max(train_labels), test_labels.max(initial=0))) + 1
  preds = knn_predict(train_feats, train_labels, test_feats, k=k, temperature=temperature,
                      num_classes=num_classes, batch=batch)
  return float(np.mean(preds == test_labels)) if len(test_labels) else 0.0
