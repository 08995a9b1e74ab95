"""Reading and writing weight files: .pth (torch's weights-only unpickler) and .safetensors, a training
checkpoint's EMA / raw copy and a wrapper's key prefix picked the way timm does, dtypes."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pickle
import re
from typing import Mapping

import numpy as np

from tinymim_jax import paths
from tinymim_jax.convert.errors import AmbiguousCheckpointError, ConvertError, HintContext, MissingSourceError, UnreadableFileError, UnsafeCheckpointError, render_fix
from tinymim_jax.convert.dtypes import cast_weights
from tinymim_jax.convert.sidecar import architecture, read_sidecar, sidecar_for, sidecar_path
from tinymim_jax.convert.names import export_pytorch_weights
from tinymim_jax.convert import hub, layouts


# Globals a weights-only torch.load may build besides tensors and plain containers. Released and
# training checkpoints of MAE and TinyMIM (misc.save_model) hold {'model', 'optimizer', 'epoch', 'scaler',
# 'args'}; 'args' is the argparse.Namespace of the run, whose fields are argparse-parsed str / int / float /
# bool / None / lists plus the ints, bools and strs that init_distributed_mode adds. The optimizer and
# GradScaler states are tensors and Python scalars, which torch allows anyway. Nothing else is needed, so
# nothing else (numpy scalars, pathlib paths, arbitrary callables) is allowed.
SAFE_GLOBALS = (argparse.Namespace,)


# Top-level entries that hold the weights of a training checkpoint, in the order timm's load_state_dict prefers
# them (docs/method.md 7.6): the EMA copies of timm's train.py ('state_dict_ema') and of DeiT ('model_ema') when
# use_ema (timm's default), then the raw weights of timm ('state_dict') and of MAE / TinyMIM / DeiT ('model').
_EMA_ENTRIES = ("state_dict_ema", "model_ema")


_WEIGHT_ENTRIES = ("state_dict", "model")


# Every ViT / MAE state dict has this key; what precedes it in a file is a wrapper's prefix (DistributedDataParallel
# 'module.', torch.compile '_orig_mod.', Lightning 'model.', 'backbone.', DINO-style 'student.' / 'teacher.', ...).
_ANCHOR = "patch_embed.proj.weight"


# torch < 2.6 has a published bypass of torch.load(weights_only=True) (CVE-2025-32434): refuse to unpickle there.
TORCH_FLOOR = (2, 6)


def _unsupported(kind: str, label: str, name: str, fix: str) -> UnreadableFileError:
  return UnreadableFileError(f"cannot read {label}: tensor {name!r} is {kind}, which a ViT's weights never are; "
                             f"{fix}")


def _to_numpy(value, *, name: str = "?", label: str = "the file"):
  """A torch tensor / np array / scalar -> np.ndarray in its own dtype (bfloat16 as ml_dtypes.bfloat16), else None.

  Raises UnreadableFileError naming the tensor for what a weight file should not hold: sparse, quantized or
  complex tensors, and views that claim more values than their storage holds (stride 0 / broadcast: a few KB on
  disk that a copy would expand to any size), checked before anything is copied."""
  if isinstance(value, np.ndarray):
    arr = value
    if arr.dtype.kind == "c":
      raise _unsupported(f"complex ({arr.dtype})", label, name, "convert it to real weights first")
    if any(st == 0 and n > 1 for st, n in zip(arr.strides, arr.shape)):
      raise _unsupported(f"a broadcast view (strides {arr.strides}, shape {arr.shape})", label, name,
                         "re-save it as a plain array (np.ascontiguousarray)")
    return arr
  if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
    import torch
    t = value.detach()
    if t.layout != torch.strided:
      raise _unsupported(f"a sparse tensor ({t.layout})", label, name, "re-save it dense (tensor.to_dense())")
    if t.is_quantized:
      raise _unsupported(f"quantized ({t.dtype})", label, name, "re-save it dequantized (tensor.dequantize())")
    if t.is_complex():
      raise _unsupported(f"complex ({t.dtype})", label, name, "convert it to real weights first")
    claimed, stored = t.numel() * t.element_size(), t.untyped_storage().nbytes()
    if claimed > stored or any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
      raise _unsupported(f"a broadcast / overlapping view: shape {tuple(t.shape)} with strides {t.stride()} "
                         f"claims {claimed:,} bytes over a storage of {stored:,}", label, name,
                         "re-save it with tensor.contiguous() (or clone()) if it is meant to be a weight")
    t = t.cpu()
    if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: the same bits through int16, as ml_dtypes'
      import ml_dtypes
      import torch
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
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
  data = paths.read_bytes(path) if paths.is_remote(path) else None  # torch reads a file object as well as a path
  source = lambda: io.BytesIO(data) if data is not None else path  # pylint: disable=unnecessary-lambda-assignment
  if data is not None:
    head = data[:4]
  else:
    with open(path, "rb") as f:
      head = f.read(4)
  # torch.save writes a zip archive (torch >= 1.6) or, legacy, a pickle (protocol byte 0x80).
  if not head:
    raise UnreadableFileError(f"cannot read {path}: the file is empty (0 bytes)")
  if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
    raise UnreadableFileError(f"cannot read {path}: not a PyTorch checkpoint (neither a zip archive nor a "
                              f"pickle; it starts with {head!r})")
  try:
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
      return torch.load(source(), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:
      refused = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(source()) if g not in allowed]
    except Exception:  # not a zip checkpoint: fall back to what torch's message names
      refused = []
    refused = refused or re.findall(r"GLOBAL ([\w.]+)", str(e))
    if not refused:
      raise UnreadableFileError(f"cannot read {path}: damaged pickle ({first_line(e)})") from None
    raise UnsafeCheckpointError(
        f"refusing to load {path}: its pickle references global(s) {refused} that a weight "
        f"file does not need (allowed besides tensors and plain containers: {sorted(allowed)}). Nothing "
        f"from the file was executed. If you trust it, re-save only its weights, e.g. "
        f"torch.save({{'model': ckpt['model']}}, 'clean.pth').") from None
  except Exception as e:  # EOFError, RuntimeError (zip), KeyError (pickle opcodes), ...: a damaged file
    raise UnreadableFileError(f"cannot read {path}: damaged or truncated PyTorch checkpoint "
                              f"({type(e).__name__}: {first_line(e)})") from None


def first_line(e: BaseException, n: int = 160) -> str:
  text = str(e).strip().splitlines()
  return (text[0][:n] if text else "no message")


# Bytes per element of the safetensors dtypes (safetensors' Dtype).
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """safetensors.numpy.load_file after checking the header against the file size (nothing is allocated from the
  file's own length field before that). Layout: u64 little-endian header length N, N bytes of UTF-8 JSON
  {name: {dtype, shape, data_offsets: [begin, end]}, '__metadata__': {...}}, then the data."""
  size = paths.getsize(path)

  def bad(what):
    return UnreadableFileError(f"cannot read {path}: not a valid .safetensors file ({what})")

  if size < 8:
    raise bad(f"{size} bytes, shorter than the 8-byte header length")
  with paths.open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
      raise bad(f"header length {n} runs past the end of the file ({size} bytes)")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise bad(f"header is not UTF-8: {e.reason} at byte {e.start}") from None
  except json.JSONDecodeError as e:
    raise bad(f"header is not JSON: {e.msg} at byte {e.pos}") from None
  if not isinstance(header, dict):
    raise bad(f"header is a JSON {type(header).__name__}, not an object")
  data = size - 8 - n
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data):
      raise bad(f"tensor {name!r}: data_offsets {offsets} outside the {data} data bytes")
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if str(dtype).startswith("C"):
      raise bad(f"tensor {name!r} is complex ({dtype}), which a ViT's weights never are")
    itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
    if (itemsize is not None and isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
        and int(np.prod(shape, dtype=object)) * itemsize != offsets[1] - offsets[0]):
      raise bad(f"tensor {name!r}: shape {shape} of {dtype} claims {int(np.prod(shape, dtype=object)) * itemsize:,} "
                f"bytes, its data_offsets hold {offsets[1] - offsets[0]:,}")
  from safetensors import SafetensorError
  from safetensors.numpy import load, load_file  # no torch needed
  try:
    return load(paths.read_bytes(path)) if paths.is_remote(path) else load_file(path)
  except SafetensorError as e:
    raise bad(str(e)) from None


@dataclasses.dataclass
class Checkpoint:
  """A weight file as read: tensors by PyTorch name, in the file's dtypes, and how they were picked."""
  weights: dict[str, np.ndarray]
  extras: dict[str, str]               # top-level entries and keys not taken -> why
  label: str                           # the file's name, or '<state dict>'
  entry: str | None = None             # the top-level entry the weights came from ('model', 'state_dict_ema', ...)
  other_copy: str | None = None        # the EMA / raw copy beside it that was not taken
  ema: bool = True
  prefix: str = ""                     # the wrapper prefix removed from every key taken
  sidecar: dict | None = None          # the architecture saved beside the file (<name>.config.json)
  sidecar_label: str = ""
  layout: str | None = None            # another library's layout the weights were converted from (layouts.py)
  family: str | None = None            # the model family the file names ('mae', 'dinov2', ...): default resampling
  layout_notes: list[str] = dataclasses.field(default_factory=list)

  def describe(self, context: HintContext = "api") -> list[str]:
    """Report lines: which copy of the weights, which prefix."""
    lines = []
    if self.other_copy is not None:
      which = "the EMA copy" if self.entry in _EMA_ENTRIES else "the raw weights, not the EMA copy"
      fix = render_fix(context, ema=not self.ema)
      lines.append(f"weights: {self.entry!r} ({which}; {fix or 'the other'} loads {self.other_copy!r})")
    elif self.entry is not None:
      lines.append(f"weights: {self.entry!r}")
    if self.prefix:
      lines.append(f"prefix: {self.prefix!r} removed from every key (a wrapper's)")
    if self.layout is not None:
      lines.append(f"names: converted from the {self.layout} layout to timm's")
    lines += [f"note: {n}" for n in self.layout_notes]
    return lines


def _pick_entry(obj: Mapping, label: str, ema: bool, context: HintContext):
  """-> (the entry holding the weights or None, the other copy or None): timm's load_state_dict(use_ema=ema)."""
  present = lambda names: [k for k in names if isinstance(obj.get(k), Mapping)]
  emas, raws = present(_EMA_ENTRIES), present(_WEIGHT_ENTRIES)
  if ema and emas:
    return emas[0], (raws[0] if raws else None)
  if raws:
    return raws[0], (emas[0] if emas else None)
  if emas:  # ema=False, but the file holds only an EMA copy
    raise ConvertError(f"{label} holds only the EMA copy {emas[0]!r} of its weights and the raw weights were "
                       f"asked for; load the EMA copy with {render_fix(context, ema=True) or 'ema on'}")
  return None, None


def _wrapper_prefixes(names) -> dict[str, int]:
  """{prefix: number of keys under it} for every prefix that precedes a ViT's patch embedding."""
  found = sorted({k[:-len(_ANCHOR)] for k in names if k == _ANCHOR or k.endswith("." + _ANCHOR)})
  owner = [max((p for p in found if k.startswith(p)), key=len, default=None) for k in names]  # the longest
  return {p: owner.count(p) for p in found}


def _choose_prefix(names, label: str, prefix: str | None, context: HintContext) -> str:
  candidates = _wrapper_prefixes(names)
  if prefix is None:
    if len(candidates) <= 1:
      return next(iter(candidates), "")
    options = "; ".join(f"{p!r} ({n} keys): {render_fix(context, prefix=p.rstrip('.')) or p}"
                        for p, n in candidates.items())
    raise AmbiguousCheckpointError(f"{label} holds {len(candidates)} models, under the key prefixes "
                                   f"{list(candidates)}; name the one to load: {options}")
  if prefix == "":
    if "" not in candidates and candidates:
      raise ConvertError(f"{label} has no unprefixed model; its models are under {list(candidates)}")
    return ""
  matches = [p for p in candidates if p == prefix or p == prefix + "." or p.startswith(prefix.rstrip(".") + ".")]
  if len(matches) == 1:
    return matches[0]
  full = prefix if prefix.endswith(".") else prefix + "."
  if not matches and any(k.startswith(full) for k in names):
    return full
  raise ConvertError(f"prefix {prefix!r} names {'several' if matches else 'none'} of the models in {label} "
                     f"({matches or list(candidates) or 'no key has it'})")


def read_checkpoint(source, *, ema: bool = True, prefix: str | None = None,
                    hint_context: HintContext = "api") -> Checkpoint:
  """Reads a weight file (or takes an in-memory state dict) -> Checkpoint.

  source: a path (.safetensors via safetensors.numpy, no torch needed; anything else via torch's weights-only
    loader, torch >= 2.6) or a mapping {name: tensor / array}, optionally a training checkpoint: a mapping with a
    'state_dict' (timm train.py) or 'model' (MAE / TinyMIM / DeiT) entry; its other entries (optimizer, epoch,
    scaler, args, ...) are reported, not loaded.
  ema: read the EMA copy ('state_dict_ema' of timm's train.py, 'model_ema' of DeiT) where the file has one, as
    timm's load_checkpoint(use_ema=True) does by default; False reads the raw weights.
  prefix: the wrapper prefix of the model to read. None: found from the keys (what precedes
    'patch_embed.proj.weight'), an error listing them when there are several (a student and a teacher); '' the
    unprefixed model. Keys outside the prefix are reported, not loaded.
  hint_context: how error hints spell options (see HintContext).

  Tensors keep the file's dtype (bfloat16 as ml_dtypes.bfloat16). Raises MissingSourceError (no such file),
  UnreadableFileError (empty / damaged / foreign file), UnsafeCheckpointError, AmbiguousCheckpointError.
  """
  if isinstance(source, Checkpoint):
    return source
  path, sidecar, sidecar_label, folder = None, None, "", None
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    label = os.path.basename(path)
    folder = hub.hub_folder(path) if paths.isdir(path) else None
    if folder is not None:  # a Hugging Face hub snapshot / timm hub folder: config.json + its weight file
      path, sidecar, sidecar_label = folder.weights, folder.sidecar, f"{label}/config.json ({folder.kind})"
      label = f"{label}/{os.path.basename(path)}"
    elif not paths.isfile(path):
      raise MissingSourceError(f"no such checkpoint file: {path}")
    obj = _read_safetensors(path) if path.endswith(".safetensors") else _torch_load(path)
    if folder is None:
      sidecar = read_sidecar(path)
      sidecar_label = os.path.basename(sidecar_path(path))
  elif isinstance(source, Mapping):
    obj, label = source, "<state dict>"
  else:
    raise TypeError(f"source must be a file path or a state dict mapping, got {type(source).__name__}")
  if not isinstance(obj, Mapping):
    raise ConvertError(f"{label} holds a {type(obj).__name__}, not a state dict")

  extras: dict[str, str] = {}
  entry, other = _pick_entry(obj, label, ema, hint_context)
  if entry is not None:
    for k in obj:
      if k == other:
        extras[str(k)] = ("the raw weights beside the EMA copy" if entry in _EMA_ENTRIES else
                          "the EMA copy beside the raw weights")
      elif k != entry:
        extras[str(k)] = f"checkpoint entry beside '{entry}' (training state, not weights)"
    obj = obj[entry]

  weights = {}
  for k, v in obj.items():
    arr = _to_numpy(v, name=str(k), label=label)
    if arr is None:
      extras[str(k)] = f"not a tensor ({type(v).__name__})"
    else:
      weights[str(k)] = arr
  converted = layouts.to_timm(weights, model_type=folder and folder.model_type)
  if converted is not None:
    weights = converted.weights
    extras.update(converted.skipped)
    if prefix:  # the layout's own prefix ('vit.', 'visual.', ...) is part of its names: already removed
      prefix = None
  chosen = _choose_prefix(list(weights), label, prefix, hint_context)
  if chosen:
    for k in [k for k in weights if not k.startswith(chosen)]:
      extras[k] = f"outside the model's key prefix {chosen!r}"
      del weights[k]
    weights = {k[len(chosen):]: v for k, v in weights.items()}
  family = converted.family if converted is not None else hub.sidecar_family(sidecar)
  return Checkpoint(weights=weights, extras=extras, label=label, entry=entry, other_copy=other, ema=ema,
                    prefix=chosen, sidecar=sidecar, sidecar_label=sidecar_label,
                    layout=converted.layout if converted is not None else None, family=family,
                    layout_notes=converted.notes if converted is not None else [])


def read_pytorch_weights(source, **kw) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
  """read_checkpoint(source, **kw) as (weights {name: np.ndarray}, entries not taken {name: reason}, label)."""
  ckpt = read_checkpoint(source, **kw)
  return ckpt.weights, ckpt.extras, ckpt.label


def _as_torch(x: np.ndarray):
  import torch

  x = np.ascontiguousarray(x)
  if x.dtype.name == "bfloat16":  # torch.from_numpy does not know ml_dtypes: the same bits through int16
    return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(x.copy())


def save_pytorch_weights(model_or_dict, path, *, dtype=None, sidecar: dict | bool | None = None,
                         metadata: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
  """Writes timm-named weights: .safetensors (no torch needed; `metadata` goes into its header) or .pth/.pt
  ({'model': state_dict}).

  dtype: cast the floating tensors ('float16' / 'bfloat16' / 'float32' / 'float64'); None keeps theirs.
  sidecar: the architecture to write beside the weights as `<name>.config.json` (sidecar_path), naming `path` as
    the file it describes (sidecar_for). None: a model's own (architecture(model)), nothing for a dict; False:
    none; a dict: that one (its `assumed` fields stay marked as assumed).
  Returns the tensors written.
  """
  from flax import nnx

  is_model = isinstance(model_or_dict, nnx.Module)
  if is_model:
    weights = export_pytorch_weights(model_or_dict, dtype)
  else:
    weights = {k: np.ascontiguousarray(v) for k, v in model_or_dict.items()}
    weights = cast_weights(weights, dtype) if dtype is not None else weights
  if sidecar is None:
    sidecar = architecture(model_or_dict) if is_model else False
  path = os.fspath(path)
  # Every file is written as a new file: locally a temporary file renamed into place (a link at the path is
  # replaced, not followed; a failed write leaves the old file whole), on an object store one upload.
  remote = paths.is_remote(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save
    header = {**(metadata or {}), "format": "pt"}  # 'pt': timm / HF read it as torch
    if remote:
      paths.write_atomic(path, save(weights, metadata=header))
    else:
      with paths.new_local_file(path) as tmp, open(tmp, "wb") as f:  # (Python's write: a full disk is an OSError)
        f.write(save(weights, metadata=header))
  elif path.endswith((".pth", ".pt")):
    import torch
    state = {"model": {k: _as_torch(v) for k, v in weights.items()}}
    if remote:
      buffer = io.BytesIO()
      torch.save(state, buffer)
      paths.write_atomic(path, buffer.getvalue())
    else:
      with paths.new_local_file(path) as tmp:
        torch.save(state, tmp)
  else:
    raise ConvertError(f"unknown weight file type {path!r}: use .safetensors or .pth")
  if sidecar:
    paths.write_atomic(sidecar_path(path), json.dumps(sidecar_for(sidecar, path), indent=2))
  return weights


def read_safetensors_metadata(path) -> dict[str, str]:
  """The '__metadata__' of a .safetensors file's header (a local path or gs://), {} when it has none."""
  with paths.open(os.fspath(path), "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  return header.get("__metadata__") or {}
