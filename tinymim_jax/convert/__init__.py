"""PyTorch (timm / MAE / TinyMIM) checkpoints <-> tinymim-jax models.

The only module of the project that knows PyTorch parameter names. Name mapping (docs/method.md section 7):

  ours (nnx state path)                      PyTorch name                       layout change
  [encoder.]patch_embed.kernel (p,p,3,D)      patch_embed.proj.weight (D,3,p,p)  conv transpose
  [encoder.]cls_token / pos_embed             cls_token / pos_embed              -
  reg_token / norm_pre / blocks.i.ls1.gamma   the same names (DINOv2 / CLIP)     -
  dist_token / head_dist                      the same names (DeiT distilled)    -
  conv1x1.norm | conv1x1.fc (TinyMIM*-T)      conv1x1.0 | conv1x1.1              as above
  [encoder.]blocks.i.<lin>.kernel (in,out)    blocks.i.<lin>.weight (out,in)     transpose
  <norm>.scale                                <norm>.weight                      -
  norm | fc_norm | head                       norm | fc_norm | head              -
  mask_token, decoder_* (MAE)                 mask_token, decoder_*              as above

MAE keeps the encoder keys at the top level of its state dict, so our `encoder.` prefix is dropped. Layer scale
named `blocks.i.gamma_1` / `gamma_2` (BEiT / the TinyMIM*-T segmentation backbone) is read as `ls1.gamma` /
`ls2.gamma`, as timm's checkpoint_filter_fn(adapt_layer_scale=True) does; exports use timm's names.

Loading is all-or-nothing: every key of the file is either loaded or reported as skipped with a reason,
and any missing / unexpected / mis-shaped key raises one WeightMismatchError listing all of them before
anything is written to the model. `.pth` files are read with torch's weights-only unpickler (torch >= 2.6), a
.safetensors header is checked against the file's size before anything is read, and a file that is neither
raises UnreadableFileError naming it.

What a file holds beyond its tensors is chosen the way timm does: the EMA copy of a training checkpoint
(`state_dict_ema` of timm's train.py, `model_ema` of DeiT) unless ema=False, a wrapper's key prefix (`module.`,
`model.`, `backbone.`, ...) removed and reported. Tensors keep the file's dtype (float16 / bfloat16 via ml_dtypes /
float32 / float64) until they are written into a model, which casts them to its parameters' dtype.

A state dict does not store head counts: `save_pytorch_weights` writes the architecture beside the weights
(`<name>.config.json`, timm / Hugging Face hub style, every ViTConfig field) and readers use it when present.

Command line: python -m tinymim_jax.convert {import,export,inspect} --help (tinymim_jax/convert/cli.py).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import math
import os
import pickle
import re
from typing import Any, Mapping, Sequence

import numpy as np

from tinymim_jax import paths

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

_DECODER_RE = re.compile(r"^(mask_token$|decoder_)")


class ConvertError(ValueError):
  """A checkpoint could not be read or does not fit the model."""


class WeightMismatchError(ConvertError):
  """Missing, unexpected or mis-shaped keys; the message lists all of them."""


class UnsafeCheckpointError(ConvertError):
  """A .pth pickle references a global outside SAFE_GLOBALS (it is never executed), or the installed torch's
  weights-only unpickler has a known bypass."""


class UnreadableFileError(ConvertError):
  """A file that is empty, damaged, or not a checkpoint at all; the message names the file and the fault."""


class MissingSourceError(ConvertError, FileNotFoundError):
  """A weights source that does not exist, or a directory that is not a tinymim-jax workdir."""


class AmbiguousCheckpointError(ConvertError):
  """A file holds more than one model (e.g. a student and a teacher): the caller has to name one."""


# --------------------------------------------------------------------------------------------------------
# Hints: what the user types where they are.
# --------------------------------------------------------------------------------------------------------
# A hint_context says how the caller's user sets the loader's options: 'api' (Python arguments of
# load_pytorch_weights), 'cli' (flags of `python -m tinymim_jax.convert`), or a mapping {option: config field} for
# the main job's config (e.g. {'skip': 'init_skip', 'ema': 'init_ema'}), rendered as `--config.<field>=value`. An
# option without a config field cannot be set there, and a fix that needs it is not offered.
HintContext = str | Mapping[str, str]


def _option_text(context: HintContext, option: str, value) -> str | None:
  patterns = isinstance(value, (list, tuple))
  if context == "api":
    if patterns:
      return f"{option}=(" + ", ".join(f"r'{p}'" for p in value) + ",)"
    return f"{option}={value!r}"
  if context == "cli":
    if patterns:
      return " ".join(f"--{option.replace('_', '-')} '{p}'" for p in value)
    if option == "ema":
      return "--ema" if value else "--no-ema"
    return f"--{option.replace('_', '-')} {value or repr('')}"
  field = context.get(option) if isinstance(context, Mapping) else None
  if field is None:
    return None
  if patterns:
    text = f"'{value[0]}'" if len(value) == 1 else "'(" + ",".join(f'"{p}"' for p in value) + ")'"
  elif isinstance(value, bool):
    text = str(value).lower()
  else:
    text = value or repr("")
  return f"--config.{field}={text}"


def render_fix(context: HintContext, **options) -> str | None:
  """How to set `options` ({option: value}) where the user is (see HintContext); None if one cannot be set."""
  parts = [_option_text(context, k, v) for k, v in options.items()]
  return None if None in parts else (", " if context == "api" else " ").join(parts)


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
  unused_kept_init: list[str] = dataclasses.field(default_factory=list)  # model params the job never runs
  dtypes: str = ""          # the file's dtype(s) -> the model's, e.g. 'bfloat16 -> float32'
  info: list[str] = dataclasses.field(default_factory=list)  # which copy / prefix was read, the heads assumed

  def __str__(self):
    dtypes = f" ({self.dtypes})" if self.dtypes else ""
    lines = [f"loaded {len(self.loaded)} tensors{dtypes} from {self.source} [{self.layout}]"]
    lines += [f"  {line}" for line in self.info]
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
    if self.unused_kept_init:
      lines.append(f"  not run by this job, kept at init ({len(self.unused_kept_init)}): "
                   f"{_short_list(self.unused_kept_init)}")
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)


def _short_list(keys, n=8):
  keys = list(keys)
  return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# --------------------------------------------------------------------------------------------------------
# Reading files.
# --------------------------------------------------------------------------------------------------------
def _to_numpy(value):
  """A torch tensor / np array / scalar -> np.ndarray in its own dtype (bfloat16 as ml_dtypes.bfloat16), else None."""
  if isinstance(value, np.ndarray):
    return value
  if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
    t = value.detach().cpu()
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
      raise UnreadableFileError(f"cannot read {path}: damaged pickle ({_first_line(e)})") from None
    raise UnsafeCheckpointError(
        f"refusing to load {path}: its pickle references global(s) {refused} that a weight "
        f"file does not need (allowed besides tensors and plain containers: {sorted(allowed)}). Nothing "
        f"from the file was executed. If you trust it, re-save only its weights, e.g. "
        f"torch.save({{'model': ckpt['model']}}, 'clean.pth').") from None
  except Exception as e:  # EOFError, RuntimeError (zip), KeyError (pickle opcodes), ...: a damaged file
    raise UnreadableFileError(f"cannot read {path}: damaged or truncated PyTorch checkpoint "
                              f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException, n: int = 160) -> str:
  text = str(e).strip().splitlines()
  return (text[0][:n] if text else "no message")


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
  path, sidecar, sidecar_label = None, None, ""
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    label = os.path.basename(path)
    if not paths.isfile(path):
      raise MissingSourceError(f"no such checkpoint file: {path}")
    obj = _read_safetensors(path) if path.endswith(".safetensors") else _torch_load(path)
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
    arr = _to_numpy(v)
    if arr is None:
      extras[str(k)] = f"not a tensor ({type(v).__name__})"
    else:
      weights[str(k)] = arr
  chosen = _choose_prefix(list(weights), label, prefix, hint_context)
  if chosen:
    for k in [k for k in weights if not k.startswith(chosen)]:
      extras[k] = f"outside the model's key prefix {chosen!r}"
      del weights[k]
    weights = {k[len(chosen):]: v for k, v in weights.items()}
  return Checkpoint(weights=weights, extras=extras, label=label, entry=entry, other_copy=other, ema=ema,
                    prefix=chosen, sidecar=sidecar, sidecar_label=sidecar_label)


def read_pytorch_weights(source, **kw) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
  """read_checkpoint(source, **kw) as (weights {name: np.ndarray}, entries not taken {name: reason}, label)."""
  ckpt = read_checkpoint(source, **kw)
  return ckpt.weights, ckpt.extras, ckpt.label


# --------------------------------------------------------------------------------------------------------
# Dtypes.
# --------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------
# The architecture beside the weights (what a state dict cannot say: the heads).
# --------------------------------------------------------------------------------------------------------
SIDECAR_SUFFIX = ".config.json"


def sidecar_path(weights_path) -> str:
  """`x.safetensors` / `x.pth` -> `x.config.json`: named after the weights, so several exports share a directory
  and a run's own config.json in a workdir stays as it is."""
  return os.path.splitext(os.fspath(weights_path))[0] + SIDECAR_SUFFIX


def _jsonable(value):
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return np.dtype(value).name  # a dtype such as jnp.float32


def _model_configs(model):
  return model.config if isinstance(model.config, tuple) else (model.config, None)


def architecture(model) -> dict:
  """A model's architecture as JSON, in the spirit of timm's / the hub's config.json.

  {'architecture': 'vit_tiny_patch16' (the variant of the same patch / width / depth, or 'vit_custom'; 'mae_...'
   for an MAE), 'library': 'tinymim_jax', 'img_size', 'patch_size', 'embed_dim', 'depth', 'heads_per_block'
   [block 1, ..., block depth], 'global_pool' ('token' | 'avg', timm's), 'num_classes', 'num_features',
   'model_args': every ViTConfig field, 'decoder_args': every DecoderConfig field (MAE only)}.
  """
  from tinymim_jax.models import MAE_PREFIX, VARIANTS

  enc, dec = _model_configs(model)
  shape = ("patch_size", "embed_dim", "depth")
  name = next((n for n, v in VARIANTS.items() if all(v[k] == getattr(enc, k) for k in shape)
               and all(getattr(enc, k) == x for k, x in v.items() if k not in ("img_size", "pos_embed"))),
              "vit_custom")
  out = {"architecture": (MAE_PREFIX if dec is not None else "") + name, "library": "tinymim_jax",
         "img_size": enc.img_size, "patch_size": enc.patch_size, "embed_dim": enc.embed_dim, "depth": enc.depth,
         "heads_per_block": [enc.block_heads(i) for i in range(1, enc.depth + 1)],
         "global_pool": {"cls": "token", "avg": "avg"}.get(enc.pooling, enc.pooling),
         "num_classes": enc.num_classes, "num_features": enc.num_features,
         "model_args": {f.name: _jsonable(getattr(enc, f.name)) for f in dataclasses.fields(enc)}}
  if dec is not None:
    out["decoder_args"] = {f.name: _jsonable(getattr(dec, f.name)) for f in dataclasses.fields(dec)}
  return out


def read_sidecar(weights_path) -> dict | None:
  """The architecture saved beside `weights_path` (sidecar_path), or None when there is none."""
  path = sidecar_path(weights_path)
  if not paths.isfile(path):
    return None
  try:
    side = json.loads(paths.read_bytes(path).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UnreadableFileError(f"cannot read {path}: not a JSON file ({e})") from None
  if not isinstance(side, dict) or not isinstance(side.get("model_args"), dict):
    raise UnreadableFileError(f"cannot read {path}: no 'model_args' object (not written by tinymim_jax.convert)")
  return side


def sidecar_model(side: Mapping) -> tuple[str, dict, dict | None]:
  """-> (create_model name, ViTConfig overrides, DecoderConfig overrides or None) of a sidecar's model.

  Fields this version does not know (written by a newer one) are left out."""
  from tinymim_jax.models import MAE_PREFIX, VARIANTS, ViTConfig

  name = str(side.get("architecture", ""))
  is_mae = name.startswith(MAE_PREFIX) or "decoder_args" in side
  base = name[len(MAE_PREFIX):] if name.startswith(MAE_PREFIX) else name
  base = base if base in VARIANTS else next(iter(VARIANTS))  # every field is overridden anyway
  known = {f.name for f in dataclasses.fields(ViTConfig)}
  overrides = {k: v for k, v in side["model_args"].items() if k in known}
  return (MAE_PREFIX if is_mae else "") + base, overrides, (dict(side["decoder_args"]) if is_mae else None)


def sidecar_configs(side: Mapping):
  """-> (ViTConfig, DecoderConfig or None) of a sidecar."""
  from tinymim_jax.models import MAE_PREFIX, DecoderConfig, vit_config

  name, overrides, dec = sidecar_model(side)
  return (vit_config(name[len(MAE_PREFIX):] if name.startswith(MAE_PREFIX) else name, **overrides),
          DecoderConfig(**dec) if dec is not None else None)


def heads_text(heads: Sequence[int]) -> str:
  """[6, 6, ..., 12] -> '6 per block (block 12: 12)'."""
  if not heads:
    return "no blocks"
  common = collections.Counter(heads).most_common(1)[0][0]
  odd = [f"block {i}: {h}" for i, h in enumerate(heads, 1) if h != common]
  return f"{common} per block" + (f" ({', '.join(odd)})" if odd else "")


def _heads_line(model, ckpt: Checkpoint) -> str:
  enc, dec = _model_configs(model)
  mine = [enc.block_heads(i) for i in range(1, enc.depth + 1)]
  text = heads_text(mine) + (f", decoder {dec.num_heads}" if dec is not None else "")
  if ckpt.sidecar is None:
    return f"heads: not stored in the file; assumed the model's {text}"
  s_enc, s_dec = sidecar_configs(ckpt.sidecar)
  theirs = [s_enc.block_heads(i) for i in range(1, min(enc.depth, s_enc.depth) + 1)]
  same = theirs == mine[:len(theirs)] and (dec is None or s_dec is None or s_dec.num_heads == dec.num_heads)
  if same:
    return f"heads: {text}, as {ckpt.sidecar_label} records (a state dict alone does not store them)"
  s_text = heads_text(theirs) + (f", decoder {s_dec.num_heads}" if s_dec is not None and dec is not None else "")
  return (f"heads: the model's {text}, but {ckpt.sidecar_label} records {s_text}: the same weights split into other "
          f"heads (docs/method.md 2.3), so the outputs differ from the exporting model's")


def detect_layout(names, extras: Mapping[str, str] = ()) -> str:
  """A human-readable guess of which kind of checkpoint these keys come from."""
  names = set(names)
  if any(_DECODER_RE.match(k) for k in names):
    kind = "MAE pretrain (encoder + decoder)"
  elif "dist_token" in names and any(k.startswith("conv1x1.") for k in names):
    kind = "TinyMIM*-T (distillation token, conv1x1 layer" + (", fc_norm + head + head_dist)" if "head_dist.weight"
                                                               in names else ")")
  elif "dist_token" in names:
    kind = "DeiT distilled (timm VisionTransformerDistilled: dist_token" + (
        ", head + head_dist)" if "head_dist.weight" in names else ")")
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


_CONV1X1_INDEX = {"norm": "0", "fc": "1"}
_LAYER_SCALE_RE = re.compile(r"^(.*blocks\.\d+\.)gamma_([12])$")


def _adapt_layer_scale(weights: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
  """BEiT-style `blocks.i.gamma_1` / `gamma_2` -> timm's `blocks.i.ls1.gamma` / `ls2.gamma` (timm
  vision_transformer.checkpoint_filter_fn, adapt_layer_scale); -> (weights, how many were renamed)."""
  out, renamed = {}, 0
  for name, arr in weights.items():
    m = _LAYER_SCALE_RE.match(name)
    if m:
      name, renamed = f"{m[1]}ls{m[2]}.gamma", renamed + 1
    out[name] = arr
  return out, renamed


def _torch_name(path: tuple) -> str:
  parts = [str(p) for p in path]
  if parts[0] == "encoder":  # MAE: encoder keys sit at the top level of the PyTorch state dict
    parts = parts[1:]
  *mod, leaf = parts
  if mod == ["patch_embed"]:
    mod = ["patch_embed", "proj"]
  if mod[:1] == ["conv1x1"]:  # the authors' nn.Sequential(LayerNorm, Linear, GELU)
    mod = ["conv1x1", _CONV1X1_INDEX[mod[1]]] + mod[2:]
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
    "cls_token", "reg_token", "pos_embed", "dist_token", "mask_token", "decoder_pos_embed", "patch_embed", "norm_pre",
    "blocks", "conv1x1", "norm", "fc_norm", "head", "head_dist", "decoder_embed", "decoder_blocks", "decoder_norm",
    "decoder_pred", "norm1", "attn", "ls1", "norm2", "mlp", "ls2", "qkv", "proj", "fc1", "fc2", "weight", "bias",
    "gamma"])}


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
                         strict: bool = True, ema: bool = True, prefix: str | None = None, depth: int | None = None,
                         hint_context: HintContext = "api") -> LoadReport:
  """Loads a PyTorch checkpoint into a ViT or MAE model, all or nothing.

  Args:
    model: a tinymim_jax ViT or MAE (nnx.Module); updated in place only if the whole load succeeds. It
      may be abstract (nnx.eval_shape(lambda: create_model(...))): that skips the random init of a big
      teacher, and then every parameter must come from the file.
    source: a .pth / .pt / .bin / .safetensors path, an in-memory state dict (name -> tensor / array),
      optionally a training checkpoint {'model': ..., 'optimizer': ..., 'args': ...}, or a Checkpoint.
    skip: regexes (re.search on PyTorch names) of file keys to ignore; reported as skipped.
    allow_missing: regexes of model parameters the file may lack; they keep their init and are reported.
      E.g. ('^fc_norm\\.', '^head\\.') to start fine-tuning from a pretrain file; then the file's final
      `norm` has no place in the 'avg' layout and is reported as skipped.
    strict: False turns missing keys into kept-init ones and unexpected keys into skipped ones (both still
      reported). Shape mismatches always raise.
    ema: read a training checkpoint's EMA copy where it has one (timm's default); False: the raw weights.
    prefix: the wrapper prefix of the model to read (read_checkpoint); None finds it.
    depth: the caller runs only the embeddings and blocks 1..depth (a distillation teacher: ViT(..., depth=k)).
      The later blocks, the final norm / fc_norm / head and an MAE decoder are then unused: not taken from the
      file (reported as skipped), not required, and kept at init in the model (reported). The rest is strict.
    hint_context: how hints in errors and the report spell options: 'api', 'cli', or {option: config field}.

  Values are cast to each parameter's dtype. Returns a LoadReport (which copy / prefix was read, the heads the
  model assumes or the sidecar records). Raises WeightMismatchError listing every problem, and the errors of
  read_checkpoint.
  """
  ckpt = read_checkpoint(source, ema=ema, prefix=prefix, hint_context=hint_context)
  return _load(model, ckpt, skip=skip, allow_missing=allow_missing, strict=strict, depth=depth,
               hint_context=hint_context)


def _runs(name: str, depth: int | None) -> bool:
  """Whether a job that runs a ViT to block `depth` (1-based) uses the PyTorch-named parameter `name`."""
  if depth is None:
    return True
  m = re.match(r"blocks\.(\d+)\.", name)
  if m:
    return int(m[1]) < depth
  # After the blocks: the final norm, the fine-tuned tail, an MAE decoder. Anything else (the embeddings, or a
  # part this ViT does not know, e.g. DeiT's dist_token) is taken as run: loaded, or unexpected.
  return not (name.split(".")[0] in ("conv1x1", "norm", "fc_norm", "head", "head_dist") or _DECODER_RE.match(name))


def _load(model, ckpt: Checkpoint, *, skip=(), allow_missing=(), strict=True, depth=None,
          hint_context: HintContext = "api") -> LoadReport:
  weights, label = ckpt.weights, ckpt.label
  report = LoadReport(source=label, layout=detect_layout(weights, ckpt.extras))
  report.skipped.update(ckpt.extras)
  report.info += ckpt.describe(hint_context)
  weights, renamed = _adapt_layer_scale(weights)
  if renamed:
    report.info.append(f"{renamed} layer-scale tensor(s) blocks.i.gamma_1 / gamma_2 read as blocks.i.ls1.gamma / "
                       f"ls2.gamma (timm's names)")
  target = _mapping(model)
  is_vit_only = not any(_DECODER_RE.match(k) for k in target)
  # The prefix tokens' rows of pos_embed (CLS, registers; none with no_embed_class) are kept as they are when the
  # grid is resampled (timm's resample_abs_pos_embed(num_prefix_tokens=0 if no_embed_class else ...)).
  enc = _model_configs(model)[0]
  prefix = 0 if enc.no_embed_class else enc.num_prefix_tokens
  unused = f"not run: this job runs blocks 1..{depth} only"

  missing, unexpected, mismatched = [], [], []
  missing_names, mismatched_names = [], []
  for name, (path, value) in target.items():
    if not _runs(name, depth):
      report.unused_kept_init.append(name)
      continue
    if name in weights:
      continue
    pattern = _first_match(allow_missing, name)
    if pattern is not None or not strict:
      report.missing_kept_init.append(name)
    else:
      missing.append(f"{name} {_torch_shape(path, value.shape)}")
      missing_names.append(name)
  # The pretrained final norm has no counterpart in the 'avg' layout, whose fc_norm starts fresh (MAE's
  # fine-tuning start); only accepted when the caller allowed fc_norm to be missing.
  fresh_fc_norm = any(k.startswith("fc_norm.") for k in report.missing_kept_init)

  new_values, rounded = {}, []
  for name, arr in weights.items():
    skip_pattern = _first_match(skip, name)
    if not _runs(name, depth):
      report.skipped[name] = unused
      continue
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
        missing_names.append(name)
      continue
    if name.endswith("pos_embed") and tuple(arr.shape) != want:
      grids = _resample_grids(arr.shape, want, prefix)
      if grids is not None:
        arr = resample_pos_embed(arr, grids[1][0], prefix)
        report.resampled[name] = grids
    if tuple(arr.shape) != want:
      mismatched.append(f"{name}: file {tuple(arr.shape)}, model expects {want}")
      mismatched_names.append(name)
      continue
    new_values[path] = np.asarray(_from_torch_layout(path, arr), dtype=value.dtype)
    report.loaded.append(name)
    if arr.dtype.kind == "f" and np.dtype(value.dtype).itemsize < arr.dtype.itemsize:
      rounded.append(f"{name} ({arr.dtype} -> {np.dtype(value.dtype)})")
  if rounded:  # as intended (a float64 file into a float32 model), but said
    report.notes.append(f"{len(rounded)} tensor(s) rounded to the model's param_dtype: {_short_list(rounded, 3)}")

  if _is_abstract_model(target) and (report.missing_kept_init or report.unused_kept_init):
    # An nnx.eval_shape model has no init to keep: every parameter has to come from the file.
    missing += [f"{name} {_torch_shape(target[name][0], target[name][1].shape)} (the model is abstract: "
                f"no init to keep)"
                for name in report.missing_kept_init + report.unused_kept_init]
  if missing or unexpected or mismatched:
    lines = [f"cannot load {label} [{report.layout}] into {_describe_model(model)}: "
             f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped key(s); "
             f"nothing was written to the model."]
    lines += [f"  {line}" for line in report.info]
    for title, items in (("missing from the file", missing), ("unexpected in the file", unexpected),
                         ("shape mismatch", mismatched)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines += [f"    {item}" for item in items]
    parts = {n.split(".")[0] for n in target}
    lines += [f"  hint: {h}" for h in _mismatch_hints(missing_names, unexpected, mismatched_names, allow_missing,
                                                      hint_context, parts)]
    raise WeightMismatchError("\n".join(lines))

  if report.loaded:
    file_dtypes = dtype_summary({n: weights[n] for n in report.loaded})
    model_dtypes = " + ".join(sorted({np.dtype(target[n][1].dtype).name for n in report.loaded}))
    report.dtypes = file_dtypes if file_dtypes == model_dtypes else f"{file_dtypes} -> {model_dtypes}"
  report.info.append(_heads_line(model, ckpt))
  _check_fixed_tables(model, target, new_values, report)
  _write(model, new_values)
  return report


def _mismatch_hints(missing_names, unexpected, mismatched_names, allow_missing, context, model_parts
                    ) -> list[str]:
  """The fixes of a failed load, spelt for where the user is; a fix that cannot be set there is left out."""
  hints = []
  tails = [t for t in ("fc_norm", "head") if any(n.startswith(t + ".") for n in missing_names)]
  if tails:
    fix = render_fix(context, allow_missing=[rf"^{t}\." for t in tails])
    if fix:
      hints.append(f"to start fine-tuning from a pretrain file (a fresh {' + '.join(tails)}): {fix}")
  if any(u.startswith("head.") for u in unexpected):
    fix = render_fix(context, skip=[r"^head\."])
    if fix:
      hints.append(f"to drop the file's classifier head: {fix}")
  # Parts the model does not have at all (e.g. DeiT's dist_token): skip them by their top-level name. (A part the
  # model has, e.g. a deeper file's extra blocks, is a different architecture: no hint.)
  others = sorted({u.split()[0].split(".")[0] for u in unexpected} - set(model_parts) - {"head"})
  if others and len(others) <= 4:
    fix = render_fix(context, skip=[rf"^{re.escape(o)}\." if any(u.startswith(o + ".") for u in unexpected)
                                    else rf"^{re.escape(o)}$" for o in others])
    if fix:
      hints.append(f"to ignore the file's {', '.join(others)} (the model has no such part): {fix}")
  # The distilled layouts are parts of the model's config, not of the file: say which fields build them.
  parts = {u.split()[0].split(".")[0] for u in unexpected}
  wanted = (("dist_token", "dist_token=True"),
            ("conv1x1", "conv1x1_dim=<the file's conv1x1.1 rows, 1280 for TinyMIM*-T>"))
  fields = [f for part, f in wanted if part in parts]
  if fields:
    hints.append(f"the file holds {' and '.join(p for p in ('dist_token', 'conv1x1') if p in parts)}: build the "
                 f"model with {', '.join(fields)} (ViTConfig fields) to load them")
  if any(n.startswith("head.") for n in mismatched_names):
    options = {"skip": [r"^head\."]}
    if _first_match(allow_missing, "head.weight") is None:
      options["allow_missing"] = [r"^head\."]
    fix = render_fix(context, **options)
    if fix:
      hints.append(f"the file's classifier has another number of classes; to start a fresh head: {fix}")
  return hints


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
def export_pytorch_weights(model, dtype=None) -> dict[str, np.ndarray]:
  """{timm / MAE name: C-contiguous array} of a ViT or MAE model, in timm's order, in the parameters' dtype
  (float32, or float64 for a param_dtype float64 model: nothing is rounded on the way out) or, for the floating
  ones, `dtype` ('float16' / 'bfloat16' / 'float32' / 'float64').

  A 'cls'-layout ViT loads into timm VisionTransformer(global_pool='token', num_classes=0) (plus a head if
  it has one), an 'avg'-layout ViT into VisionTransformer(global_pool='avg', fc_norm=True), an MAE model
  into MAE's MaskedAutoencoderViT -- all with load_state_dict(strict=True).
  """
  out = {}
  for name, (path, value) in _mapping(model).items():
    # A copy: writable (torch.from_numpy warns on the read-only views of jax arrays) and C-contiguous.
    out[name] = np.array(_to_torch_layout(path, np.asarray(value)), order="C")
  return cast_weights(out, dtype) if dtype is not None else out


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
  sidecar: the architecture to write beside the weights as `<name>.config.json` (sidecar_path). None: a model's
    own (architecture(model)), nothing for a dict; False: none; a dict: that one.
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
  remote = paths.is_remote(path)  # an object store: each file is one upload (it appears whole, or not at all)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save, save_file
    header = {**(metadata or {}), "format": "pt"}  # 'pt': timm / HF read it as torch
    if remote:
      paths.write_atomic(path, save(weights, metadata=header))
    else:
      save_file(weights, path, metadata=header)
  elif path.endswith((".pth", ".pt")):
    import torch
    buffer = io.BytesIO() if remote else path
    torch.save({"model": {k: _as_torch(v) for k, v in weights.items()}}, buffer)
    if remote:
      paths.write_atomic(path, buffer.getvalue())
  else:
    raise ConvertError(f"unknown weight file type {path!r}: use .safetensors or .pth")
  if sidecar:
    with paths.open(sidecar_path(path), "w") as f:
      json.dump(sidecar, f, indent=2)
  return weights


def read_safetensors_metadata(path) -> dict[str, str]:
  """The '__metadata__' of a .safetensors file's header (a local path or gs://), {} when it has none."""
  with paths.open(os.fspath(path), "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  return header.get("__metadata__") or {}
