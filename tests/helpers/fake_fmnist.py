"""Small Fashion-MNIST stand-ins in the idx format (LeCun et al.), written by tests: no package needed."""

import gzip
import os

import numpy as np

FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def idx_bytes(array: np.ndarray) -> bytes:
  """uint8 array -> idx bytes: magic 0x0000080N (unsigned bytes, N dims), N big-endian uint32 dims, data."""
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.tobytes()


def write(path: str, payload: bytes, compress: bool = True) -> None:
  with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
    f.write(payload)


def images_for(labels: np.ndarray, size: int = 28, seed: int = 0) -> np.ndarray:
  """Learnable grey images: class c is a bright horizontal bar at row band c, plus noise."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 60, size=(len(labels), size, size)).astype(np.uint8)
  band = max(size // 10, 1)
  for i, c in enumerate(labels):
    x[i, c * band:(c + 1) * band, 2:size - 2] = 220
  return x


def make(directory: str, n_train: int = 40, n_test: int = 20, size: int = 28, seed: int = 0) -> dict:
  """Writes the four gzip'd idx files to `directory`; returns {'train': (images, labels), 'test': ...}."""
  os.makedirs(directory, exist_ok=True)
  out = {}
  for k, (split, n) in enumerate((("train", n_train), ("test", n_test))):
    labels = (np.arange(n) % 10).astype(np.uint8)
    labels = np.random.default_rng(seed + k).permutation(labels)
    images = images_for(labels, size, seed + k)
    images_file, labels_file = FILES[split]
    write(os.path.join(directory, images_file), idx_bytes(images))
    write(os.path.join(directory, labels_file), idx_bytes(labels))
    out[split] = (images, labels)
  return out
