"""PyTorch (timm / MAE / TinyMIM) checkpoints <-> tinymim-jax models.

The only module of the project that knows PyTorch parameter names. Name mapping (docs/method.md section 7):

  ours (nnx state path)                      PyTorch name                       layout change
  [encoder.]patch_embed.kernel (p,p,3,D)      patch_embed.proj.weight (D,3,p,p)  conv transpose
  [encoder.]cls_token / pos_embed             cls_token / pos_embed              -
  [encoder.]blocks.i.<lin>.kernel (in,out)    blocks.i.<lin>.weight (out,in)     transpose
  <norm>.scale                                <norm>.weight                      -
  norm | fc_norm | head                       norm | fc_norm | head              -
  mask_token, decoder_* (MAE)                 mask_token, decoder_*              as above

MAE keeps the encoder keys at the top level of its state dict, so our `encoder.` prefix is dropped.

Loading is all-or-nothing: every key of the file is either loaded or reported as skipped with a reason,
and any missing / unexpected / mis-shaped key raises one WeightMismatchError listing all of them before
anything is written to the model. `.pth` files are read with torch's weights-only unpickler (torch >= 2.6).

Command line: python -m tinymim_jax.convert {import,export,inspect} --help (tinymim_jax/convert/cli.py).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import pickle
import re
from typing import Any, Mapping, Sequence

import numpy as np

# Globals a weights-only torch.load may build besides tensors and plain containers. Released and
# training checkpoints of MAE and TinyMIM (misc.save_model) hold {'model', 'optimizer', 'epoch', 'scaler',
# 'args'}; 'args' is the argparse.Namespace of the run, whose fields are argparse-parsed str / int / float /
# bool / None / lists plus the ints, bools and strs that init_distributed_mode adds. The optimizer and
# GradScaler states are tensors and Python scalars, which torch allows anyway. Nothing else is needed, so
# nothing else (numpy scalars, pathlib paths, arbitrary callables) is allowed.
SAFE_GLOBALS = (argparse.Namespace,)

# Top-level entries that hold the weights of a training checkpoint: MAE / TinyMIM save 'model', timm's
# train.py saves 'state_dict'.
_WEIGHT_ENTRIES = ("model", "state_dict")

# torch < 2.6 has a published bypass of torch.load(weights_only=True) (CVE-2025-32434): refuse to unpickle there.
TORCH_FLOOR = (2, 6)

_DECODER_RE = re.compile(r"^(mask_token$|decoder_)")


class ConvertError(ValueError):
  """A checkpoint could not be read or does not fit the model."""


class WeightMismatchError(ConvertError):
  """Missing, unexpected or mis-shaped keys; the message lists all of them."""


class UnsafeCheckpointError(ConvertError):
  """A .pth pickle references a global outside SAFE_GLOBALS (it is never executed), or the installed torch's
  weights-only unpickler has a known bypass."""


@dataclasses.dataclass
class LoadReport:
  """What load_pytorch_weights did. All names are PyTorch names."""
  source: str
  layout: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> reason
  missing_kept_init: list[str] = dataclasses.field(default_factory=list)
  resampled: dict[str, tuple[tuple[int, int], tuple[int, int]]] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)

  def __str__(self):
    lines = [f"loaded {len(self.loaded)} tensors from {self.source} [{self.layout}]"]
    for name, (old, new) in self.resampled.items():
      lines.append(f"  resampled {name}: grid {old[0]}x{old[1]} -> {new[0]}x{new[1]} (bicubic, prefix kept)")
    by_reason = collections.defaultdict(list)
    for key, reason in self.skipped.items():
      by_reason[reason].append(key)
    for reason, keys in by_reason.items():
      lines.append(f"  skipped {len(keys)} ({reason}): {_short_list(keys)}")
    if self.missing_kept_init:
      lines.append(f"  not in file, kept at init ({len(self.missing_kept_init)}): "
                   f"{_short_list(self.missing_kept_init)}")
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)


def _short_list(keys, n=8):
  keys = list(keys)
  return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# --------------------------------------------------------------------------------------------------------
# Reading files.
# --------------------------------------------------------------------------------------------------------
def _to_numpy(value):
  """A torch tensor / np array / scalar -> np.ndarray (floating point as float32), else None."""
  if isinstance(value, np.ndarray):
    return value.astype(np.float32) if value.dtype.kind == "f" else value
  if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
    t = value.detach().cpu()
    if t.is_floating_point():
      t = t.float()  # numpy has no bfloat16; our parameters are float32 anyway
    return t.numpy()
  return None


def _check_torch_version(torch):
  m = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
  if m is None or (int(m[1]), int(m[2])) < TORCH_FLOOR:
    floor = ".".join(map(str, TORCH_FLOOR))
    raise UnsafeCheckpointError(
        f"refusing to unpickle with torch {torch.__version__}: torch < {floor} has a published bypass of "
        f"torch.load(weights_only=True) (CVE-2025-32434), so a .pth file could run code. Install torch>={floor} "
        f"(pip install 'tinymim-jax[torch]'), or use a .safetensors file (no torch needed).")


def _torch_load(path: str):
  import torch  # lazy: only .pth files need torch

  _check_torch_version(torch)
  try:
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:
      refused = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # not a zip checkpoint: fall back to what torch's message names
      refused = []
    refused = refused or re.findall(r"GLOBAL ([\w.]+)", str(e))
    raise UnsafeCheckpointError(
        f"refusing to load {path}: its pickle references global(s) {refused or '(unknown)'} that a weight "
        f"file does not need (allowed besides tensors and plain containers: {sorted(allowed)}). Nothing "
        f"from the file was executed. If you trust it, re-save only its weights, e.g. "
        f"torch.save({{'model': ckpt['model']}}, 'clean.pth').") from None


def read_pytorch_weights(source) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
  """Reads a checkpoint -> (weights {name: np.ndarray}, skipped top-level entries {name: reason}, label).

  source: a path (.safetensors via safetensors.numpy; anything else via torch's weights-only loader) or an
  in-memory mapping. A mapping with a 'model' (MAE / TinyMIM) or 'state_dict' (timm train.py) entry is a
  training checkpoint: its other entries (optimizer, epoch, scaler, args, ...) are reported, not loaded.
  A 'module.' prefix (DistributedDataParallel) on every key is removed.
  """
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    label = os.path.basename(path)
    if not os.path.isfile(path):
      raise ConvertError(f"no such checkpoint file: {path}")
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file  # no torch needed
      obj = load_file(path)
    else:
      obj = _torch_load(path)
  elif isinstance(source, Mapping):
    obj, label = source, "<state dict>"
  else:
    raise TypeError(f"source must be a file path or a state dict mapping, got {type(source).__name__}")
  if not isinstance(obj, Mapping):
    raise ConvertError(f"{label} holds a {type(obj).__name__}, not a state dict")

  extras: dict[str, str] = {}
  entry = next((k for k in _WEIGHT_ENTRIES if isinstance(obj.get(k), Mapping)), None)
  if entry is not None:
    for k in obj:
      if k != entry:
        extras[str(k)] = f"checkpoint entry beside '{entry}' (training state, not weights)"
    obj = obj[entry]

  weights = {}
  for k, v in obj.items():
    arr = _to_numpy(v)
    if arr is None:
      extras[str(k)] = f"not a tensor ({type(v).__name__})"
    else:
      weights[str(k)] = arr
  if weights and all(k.startswith("module.") for k in weights):
    weights = {k[len("module."):]: v for k, v in weights.items()}
  return weights, extras, label


def detect_layout(names, extras: Mapping[str, str] = ()) -> str:
  """A human-readable guess of which kind of checkpoint these keys come from."""
  names = set(names)
  if any(_DECODER_RE.match(k) for k in names):
    kind = "MAE pretrain (encoder + decoder)"
  elif "fc_norm.weight" in names:
    kind = "fine-tuned, global-avg pool (MAE fine-tune / timm global_pool='avg': fc_norm + head)"
  elif "norm.weight" in names and "head.weight" in names:
    kind = "timm, CLS pool + head (global_pool='token')"
  elif "norm.weight" in names:
    kind = "ViT encoder, pretrain layout (TinyMIM / MAE encoder / timm num_classes=0)"
  else:
    kind = "unknown"
  extras = set(extras)
  if {"optimizer", "args"} & extras:
    kind = f"training checkpoint: {kind}"
  return kind


# --------------------------------------------------------------------------------------------------------
# Name and layout mapping.
# --------------------------------------------------------------------------------------------------------
def _flat_state(model) -> dict[tuple, Any]:
  from flax import nnx, traverse_util

  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))


def _torch_name(path: tuple) -> str:
  parts = [str(p) for p in path]
  if parts[0] == "encoder":  # MAE: encoder keys sit at the top level of the PyTorch state dict
    parts = parts[1:]
  *mod, leaf = parts
  if mod == ["patch_embed"]:
    mod = ["patch_embed", "proj"]
  if leaf in ("kernel", "scale"):
    leaf = "weight"
  return ".".join(mod + [leaf])


def _to_torch_layout(path: tuple, x: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and x.ndim == 2:
    return x.T  # Linear: (in, out) -> (out, in)
  if path[-1] == "kernel" and x.ndim == 4:
    return x.transpose(3, 2, 0, 1)  # Conv: (p, p, 3, D) -> (D, 3, p, p)
  return x


def _from_torch_layout(path: tuple, x: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and x.ndim == 2:
    return x.T
  if path[-1] == "kernel" and x.ndim == 4:
    return x.transpose(2, 3, 1, 0)  # (D, 3, p, p) -> (p, p, 3, D)
  return x


def _torch_shape(path: tuple, shape: tuple) -> tuple:
  if path[-1] == "kernel" and len(shape) == 2:
    return shape[::-1]
  if path[-1] == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


# PyTorch's state_dict order (a module's own parameters, then its children in definition order) for timm's
# VisionTransformer and MAE's MaskedAutoencoderViT; one ranking serves every level of the name.
_ORDER = {n: i for i, n in enumerate([
    "cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed", "blocks", "norm", "fc_norm",
    "head", "decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "norm1", "attn", "norm2", "mlp",
    "qkv", "proj", "fc1", "fc2", "weight", "bias"])}


def _sort_key(name: str):
  return tuple((int(p), "") if p.isdigit() else (_ORDER.get(p, len(_ORDER)), p) for p in name.split("."))


def _mapping(model) -> dict[str, tuple[tuple, Any]]:
  """{PyTorch name: (our state path, our value)} in timm order."""
  flat = _flat_state(model)
  out = {_torch_name(path): (path, value) for path, value in flat.items()}
  if len(out) != len(flat):
    raise AssertionError("two model parameters map to one PyTorch name")
  return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


# --------------------------------------------------------------------------------------------------------
# Positional table resampling.
# --------------------------------------------------------------------------------------------------------
def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of torch's bicubic resize along one axis (align_corners=False, no antialias).

  aten's upsample_bicubic2d: cubic convolution with A = -0.75 at the source coordinate
  scale * (dst + 0.5) - 0.5, scale = n_in / n_out (not clamped at 0), the four taps clamped to the border.
  aten does this arithmetic in float32 with fused multiply-adds (x86-64 builds), and the float32 rounding
  of the coordinate alone moves the result by ~n_in * 1e-7; so we follow it: `fma` rounds x * y + z once,
  via float64 where the product of two float32 values is exact.
  """
  f = np.float32

  def fma(x, y, z):
    return (np.float64(x) * np.float64(y) + np.float64(z)).astype(f)

  a = f(-0.75)
  src = fma(f(n_in) / f(n_out), np.arange(n_out, dtype=f) + f(0.5), f(-0.5))
  i0 = np.floor(src)
  t = src - i0

  def near(x):  # |x| <= 1: ((A + 2) x - (A + 3)) x^2 + 1
    return fma(fma(a + f(2), x, -(a + f(3))) * x, x, f(1))

  def far(x):  # 1 < |x| < 2: ((A x - 5A) x + 8A) x - 4A
    return fma(fma(fma(a, x, -f(5) * a), x, f(8) * a), x, -f(4) * a)

  w = np.stack([far(t + f(1)), near(t), near(f(1) - t), far(f(2) - t)], axis=1).astype(np.float64)
  taps = np.clip(i0[:, None].astype(np.int64) + np.arange(-1, 3)[None], 0, n_in - 1)
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.repeat(np.arange(n_out), 4), taps.reshape(-1)), w.reshape(-1))
  return m


def resample_pos_embed(pos: np.ndarray, new_grid: int | Sequence[int], num_prefix_tokens: int = 1,
                       old_grid: int | Sequence[int] | None = None) -> np.ndarray:
  """Resamples a (1, prefix + H*W, D) table to a new grid; prefix tokens (CLS, ...) are kept as they are.

  Bicubic over the (row, col) grid, numerically torch F.interpolate(mode='bicubic', align_corners=False,
  antialias=False) -- what MAE's interpolate_pos_embed and timm's resample_abs_pos_embed(antialias=False)
  do -- in numpy, so no torch is needed. The taps are summed in float64; returned in the input dtype.
  """
  pos = np.asarray(pos)
  n = pos.shape[1] - num_prefix_tokens
  if old_grid is None:
    old_grid = math.isqrt(n)
  oh, ow = (old_grid, old_grid) if isinstance(old_grid, int) else tuple(old_grid)
  nh, nw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
  if oh * ow != n:
    raise ConvertError(f"positional table with {n} patch rows is not a {oh}x{ow} grid")
  grid = pos[0, num_prefix_tokens:].astype(np.float64).reshape(oh, ow, -1)
  grid = np.einsum("yh,hwd,xw->yxd", _bicubic_matrix(oh, nh), grid, _bicubic_matrix(ow, nw))
  out = np.concatenate([pos[0, :num_prefix_tokens].astype(np.float64), grid.reshape(nh * nw, -1)])
  return out[None].astype(pos.dtype)


def _square_grid(n: int):
  g = math.isqrt(max(n, 0))
  return g if g * g == n and g > 0 else None


def _resample_grids(have: tuple, want: tuple, prefix: int):
  """((old, old), (new, new)) when a (1, prefix + old^2, D) table can be resampled to `want`, else None."""
  if len(have) != 3 or len(want) != 3 or have[0] != 1 or have[2] != want[2]:
    return None
  old, new = _square_grid(have[1] - prefix), _square_grid(want[1] - prefix)
  return ((old, old), (new, new)) if old and new else None


# --------------------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------------------
def _describe_model(model) -> str:
  cfg = model.config[0] if isinstance(model.config, tuple) else model.config
  what = type(model).__name__
  return (f"{what}(img {cfg.img_size}, patch {cfg.patch_size}, D {cfg.embed_dim}, depth {cfg.depth}, "
          f"pooling {cfg.pooling!r}, num_classes {cfg.num_classes})")


def _first_match(patterns, name):
  return next((p for p in patterns if re.search(p, name)), None)


def load_pytorch_weights(model, source, *, skip: Sequence[str] = (), allow_missing: Sequence[str] = (),
                         strict: bool = True) -> LoadReport:
  """Loads a PyTorch checkpoint into a ViT or MAE model, all or nothing.

  Args:
    model: a tinymim_jax ViT or MAE (nnx.Module); updated in place only if the whole load succeeds. It
      may be abstract (nnx.eval_shape(lambda: create_model(...))): that skips the random init of a big
      teacher, and then every parameter must come from the file.
    source: a .pth / .pt / .bin / .safetensors path or an in-memory state dict (name -> tensor / array),
      optionally a training checkpoint {'model': ..., 'optimizer': ..., 'args': ...}.
    skip: regexes (re.search on PyTorch names) of file keys to ignore; reported as skipped.
    allow_missing: regexes of model parameters the file may lack; they keep their init and are reported.
      E.g. ('^fc_norm\\.', '^head\\.') to start fine-tuning from a pretrain file; then the file's final
      `norm` has no place in the 'avg' layout and is reported as skipped.
    strict: False turns missing keys into kept-init ones and unexpected keys into skipped ones (both still
      reported). Shape mismatches always raise.

  Returns a LoadReport. Raises WeightMismatchError listing every problem, UnsafeCheckpointError for a
  pickle that is not plain weights.
  """
  weights, extras, label = read_pytorch_weights(source)
  return _load(model, weights, extras, label, skip=skip, allow_missing=allow_missing, strict=strict)


def _load(model, weights, extras, label, *, skip, allow_missing, strict) -> LoadReport:
  report = LoadReport(source=label, layout=detect_layout(weights, extras))
  report.skipped.update(extras)
  target = _mapping(model)
  is_vit_only = not any(_DECODER_RE.match(k) for k in target)
  prefix = 1  # the CLS token's row of pos_embed is kept as it is when the grid is resampled

  missing, unexpected, mismatched = [], [], []
  for name, (path, value) in target.items():
    if name in weights:
      continue
    pattern = _first_match(allow_missing, name)
    if pattern is not None or not strict:
      report.missing_kept_init.append(name)
    else:
      missing.append(f"{name} {_torch_shape(path, value.shape)}")
  # The pretrained final norm has no counterpart in the 'avg' layout, whose fc_norm starts fresh (MAE's
  # fine-tuning start); only accepted when the caller allowed fc_norm to be missing.
  fresh_fc_norm = any(k.startswith("fc_norm.") for k in report.missing_kept_init)

  new_values = {}
  for name, arr in weights.items():
    skip_pattern = _first_match(skip, name)
    if name not in target:
      if skip_pattern is not None:
        report.skipped[name] = f"matches skip pattern {skip_pattern!r}"
      elif is_vit_only and _DECODER_RE.match(name):
        report.skipped[name] = "MAE decoder (the target is an encoder-only ViT)"
      elif fresh_fc_norm and name.startswith("norm."):
        report.skipped[name] = "pretrain final norm (the 'avg' layout starts a fresh fc_norm)"
      elif not strict:
        report.skipped[name] = "not in the model (strict=False)"
      else:
        unexpected.append(f"{name} {tuple(arr.shape)}")
      continue
    path, value = target[name]
    want = _torch_shape(path, value.shape)
    if skip_pattern is not None:  # a key the model has: skipping it makes it missing
      report.skipped[name] = f"matches skip pattern {skip_pattern!r}"
      if _first_match(allow_missing, name) is not None or not strict:
        report.missing_kept_init.append(name)
      else:
        missing.append(f"{name} {want} (skipped by {skip_pattern!r} but not allowed missing)")
      continue
    if name.endswith("pos_embed") and tuple(arr.shape) != want:
      grids = _resample_grids(arr.shape, want, prefix)
      if grids is not None:
        arr = resample_pos_embed(arr, grids[1][0], prefix)
        report.resampled[name] = grids
    if tuple(arr.shape) != want:
      mismatched.append(f"{name}: file {tuple(arr.shape)}, model expects {want}")
      continue
    new_values[path] = np.asarray(_from_torch_layout(path, arr), dtype=value.dtype)
    report.loaded.append(name)

  if _is_abstract_model(target) and report.missing_kept_init:
    # An nnx.eval_shape model has no init to keep: every parameter has to come from the file.
    missing += [f"{name} {_torch_shape(target[name][0], target[name][1].shape)} (the model is abstract: "
                f"no init to keep)"
                for name in report.missing_kept_init]
  if missing or unexpected or mismatched:
    lines = [f"cannot load {label} [{report.layout}] into {_describe_model(model)}: "
             f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped key(s); "
             f"nothing was written to the model."]
    for title, items in (("missing from the file", missing), ("unexpected in the file", unexpected),
                         ("shape mismatch", mismatched)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines += [f"    {item}" for item in items]
    if any(m.startswith(("fc_norm.", "head.")) for m in missing):
      lines.append("  hint: to start fine-tuning from a pretrain file pass allow_missing=(r'^fc_norm\\.', "
                   "r'^head\\.') (CLI: --allow-missing '^fc_norm\\.' --allow-missing '^head\\.').")
    if any(u.startswith("head.") for u in unexpected):
      lines.append("  hint: to drop a classifier head pass skip=(r'^head\\.',).")
    raise WeightMismatchError("\n".join(lines))

  _check_fixed_tables(model, target, new_values, report)
  _write(model, new_values)
  return report


def _is_abstract(value) -> bool:
  import jax
  return isinstance(value, jax.ShapeDtypeStruct)


def _is_abstract_model(target) -> bool:
  return any(_is_abstract(value) for _, value in target.values())


def _check_fixed_tables(model, target, new_values, report):
  """Notes when a fixed (Constant) table gets values other than the sin-cos table it was built with."""
  from flax import nnx
  from tinymim_jax.models.vit import Constant

  flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, Constant))}
  for name, (path, value) in target.items():
    if path in flat and path in new_values and not _is_abstract(value):
      err = float(np.max(np.abs(new_values[path] - np.asarray(value))))
      if err > 1e-6:
        report.notes.append(f"{name} differs from the model's fixed sin-cos table (max abs {err:.3g}): the "
                            f"file's table is loaded and stays frozen")


def _write(model, new_values: Mapping[tuple, np.ndarray]):
  import jax
  from flax import nnx, traverse_util

  state = nnx.state(model)
  old = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  new = {}
  for path, arr in new_values.items():
    sharding = getattr(old[path], "sharding", None)
    new[path] = jax.device_put(arr, sharding) if sharding is not None else jax.numpy.asarray(arr)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(new))
  nnx.update(model, state)


# --------------------------------------------------------------------------------------------------------
# Export.
# --------------------------------------------------------------------------------------------------------
def export_pytorch_weights(model) -> dict[str, np.ndarray]:
  """{timm / MAE name: float32 C-contiguous array} of a ViT or MAE model, in timm's order.

  A 'cls'-layout ViT loads into timm VisionTransformer(global_pool='token', num_classes=0) (plus a head if
  it has one), an 'avg'-layout ViT into VisionTransformer(global_pool='avg', fc_norm=True), an MAE model
  into MAE's MaskedAutoencoderViT -- all with load_state_dict(strict=True).
  """
  out = {}
  for name, (path, value) in _mapping(model).items():
    # A copy: writable (torch.from_numpy warns on the read-only views of jax arrays) and C-contiguous.
    out[name] = np.array(_to_torch_layout(path, np.asarray(value, dtype=np.float32)), order="C")
  return out


def save_pytorch_weights(model_or_dict, path) -> dict[str, np.ndarray]:
  """Writes timm-named weights: .safetensors (no torch needed) or .pth/.pt ({'model': state_dict})."""
  from flax import nnx

  weights = (export_pytorch_weights(model_or_dict) if isinstance(model_or_dict, nnx.Module)
             else {k: np.ascontiguousarray(v) for k, v in model_or_dict.items()})
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file(weights, path, metadata={"format": "pt"})  # 'pt' lets timm / HF loaders read it as torch
  elif path.endswith((".pth", ".pt")):
    import torch
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}}, path)
  else:
    raise ConvertError(f"unknown weight file type {path!r}: use .safetensors or .pth")
  return weights
