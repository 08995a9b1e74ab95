"""The floating dtypes of weight files: their names, casts between them (bfloat16 via ml_dtypes), a summary."""

from __future__ import annotations

import collections
from typing import Mapping

import numpy as np

from tinymim_jax.convert.errors import ConvertError


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def as_dtype(name) -> np.dtype:
  """'float16' / 'bfloat16' (ml_dtypes) / 'float32' / 'float64' (or a dtype) -> np.dtype."""
  if str(name) == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  dt = np.dtype(name)
  if dt.name not in FLOAT_DTYPES:
    raise ConvertError(f"dtype {dt.name!r} is not one of {FLOAT_DTYPES}")
  return dt


def cast_weights(weights: Mapping[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
  """The floating tensors cast to `dtype` (see as_dtype), the others as they are.

  Raises ConvertError naming the tensor when a finite value does not fit (e.g. |x| > 65504 to float16).
  """
  dt = as_dtype(dtype)
  out = {}
  for name, v in weights.items():
    v = np.asarray(v)
    if v.dtype.name in FLOAT_DTYPES and v.dtype != dt:
      with np.errstate(over="ignore"):  # checked right below
        cast = v.astype(dt)
      if not np.array_equal(np.isfinite(cast), np.isfinite(v)):
        big = float(np.max(np.abs(v[np.isfinite(v)].astype(np.float64))))
        raise ConvertError(f"{name}: values up to {big:.6g} overflow {dt.name}; keep the file's dtype or choose a "
                           f"wider one")
      v = cast
    out[name] = v
  return out


def dtype_summary(weights: Mapping[str, np.ndarray]) -> str:
  """'bfloat16', or 'float32 + int64' for a file holding several dtypes."""
  names = collections.Counter(np.asarray(v).dtype.name for v in weights.values())
  return " + ".join(n for n, _ in names.most_common()) or "no tensors"
