"""Weighted k-NN: against a direct numpy implementation, separable data, errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from tinymim_jax import knn


def _knn_numpy(train, train_labels, test, k, temperature, num_classes):
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  sim = test.astype(np.float64) @ train.astype(np.float64).T
  idx = np.argsort(-sim, axis=1)[:, :k]
  votes = np.zeros((len(test), num_classes))
  for i in range(len(test)):
    for j in idx[i]:
      votes[i, train_labels[j]] += np.exp(sim[i, j] / temperature)
  return votes.argmax(1)


def _clusters(rng, n, centers, spread):
  labels = rng.integers(0, len(centers), size=n)
  return (centers[labels] + spread * rng.normal(size=centers[labels].shape)).astype(np.float32), labels


@pytest.mark.parametrize("k,batch", [(5, 64), (20, 1024), (1, 37)])
def test_matches_numpy(k, batch):
  rng = np.random.default_rng(0)
  # Overlapping clusters, so that votes actually disagree and accuracy is well below 1.
  centers = rng.normal(size=(7, 16))
  train, ytr = _clusters(rng, 400, centers, 1.0)
  test, yte = _clusters(rng, 150, centers, 1.0)
  test = (test * 3).astype(np.float32)  # unnormalised scale must not matter
  want = _knn_numpy(train, ytr, test, k, 0.07, 7)
  got = knn.knn_predict(train, ytr, jnp.asarray(test), k=k, temperature=0.07, batch=batch)
  assert got.shape == (150,) and got.dtype == np.int32
  np.testing.assert_array_equal(got, want)
  acc = knn.knn_top1(jnp.asarray(train), ytr, test, yte, k=k, batch=batch)
  assert acc == pytest.approx(np.mean(want == yte))
  assert 0.2 < acc < 1.0


def test_separable_is_perfect():
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(10, 32))
  train, ytr = _clusters(rng, 300, centers, 0.05)
  test, yte = _clusters(rng, 100, centers, 0.05)
  assert knn.knn_top1(train, ytr, test, yte, k=20, num_classes=10, batch=32) == 1.0


def test_k_too_large():
  x = np.ones((5, 4), np.float32)
  with pytest.raises(ValueError, match=r"k=20 .* 5 train examples"):
    knn.knn_top1(x, np.zeros(5, int), x, np.zeros(5, int), k=20)


def test_bad_shapes_and_labels():
  x = np.ones((5, 4), np.float32)
  with pytest.raises(ValueError, match="same d"):
    knn.knn_predict(x, np.zeros(5, int), np.ones((2, 3), np.float32), k=1)
  with pytest.raises(ValueError, match="train_labels"):
    knn.knn_predict(x, np.zeros(4, int), x, k=1)
  with pytest.raises(ValueError, match="labels must lie"):
    knn.knn_predict(x, np.arange(5), x, k=1, num_classes=3)
