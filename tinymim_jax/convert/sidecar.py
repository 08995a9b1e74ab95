"""The architecture saved beside a weight file (`<name>.config.json`, timm / Hugging Face hub style): a state
dict does not store head counts, so readers take them from here when present.

A sidecar describes one file: it names the weights it was written for (`weights_file`), and `x.pth` does not
read the `x.config.json` written for `x.safetensors`. A value its writer did not know but assumed (the variant's
head count when `convert import` was not told one) is listed in `assumed`: readers report it as assumed and never
let it override the user's config. A sidecar is checked like a config (read_sidecar) before any model is built
from it."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from tinymim_jax import paths
from tinymim_jax.convert.errors import UnreadableFileError


SIDECAR_SUFFIX = ".config.json"
WEIGHTS_FILE_KEY = "weights_file"   # the base name of the weight file the sidecar describes
ASSUMED_KEY = "assumed"             # model_args fields the writer assumed rather than knew

# Bounds on a sidecar's sizes: far above any published ViT (ViT-22B: depth 48, D 6144, 48 heads; 1024 px is
# several times the largest released resolution), far below what would exhaust memory when a model is built.
_INT_BOUNDS = {"img_size": (1, 8192), "patch_size": (1, 1024), "embed_dim": (1, 65536), "depth": (1, 1024),
               "num_heads": (1, 4096), "num_classes": (0, 1_000_000), "reg_tokens": (0, 1024)}
_DECODER_BOUNDS = {"embed_dim": (1, 65536), "depth": (0, 1024), "num_heads": (1, 4096)}


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


def model_configs(model):
  return model.config if isinstance(model.config, tuple) else (model.config, None)


def architecture(model) -> dict:
  """A model's architecture as JSON, in the spirit of timm's / the hub's config.json.

  {'architecture': 'vit_tiny_patch16' (the variant of the same patch / width / depth, or 'vit_custom'; 'mae_...'
   for an MAE), 'library': 'tinymim_jax', 'img_size', 'patch_size', 'embed_dim', 'depth', 'heads_per_block'
   [block 1, ..., block depth], 'global_pool' ('token' | 'avg', timm's), 'num_classes', 'num_features',
   'model_args': every ViTConfig field, 'decoder_args': every DecoderConfig field (MAE only)}.
  """
  from tinymim_jax.models import MAE_PREFIX, VARIANTS

  enc, dec = model_configs(model)
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


def sidecar_for(side: Mapping, weights_path) -> dict:
  """`side` (an architecture) as the sidecar of `weights_path`: it names the file it describes."""
  return {**side, WEIGHTS_FILE_KEY: os.path.basename(os.fspath(weights_path))}


def assumed_fields(side: Mapping | None) -> tuple[str, ...]:
  """The model_args fields a sidecar's writer assumed (not recorded facts): ('num_heads', 'head_overrides')."""
  return tuple((side or {}).get(ASSUMED_KEY) or ())


def read_sidecar(weights_path) -> dict | None:
  """The architecture saved beside `weights_path` (sidecar_path), or None when there is none or it was written
  for another file of the same stem (its `weights_file`). Raises UnreadableFileError, naming the file and the
  key, for a sidecar that is not JSON or holds values no model can have (check_sidecar)."""
  path = sidecar_path(weights_path)
  if not paths.isfile(path):
    return None
  try:
    side = json.loads(paths.read_bytes(path).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UnreadableFileError(f"cannot read {path}: not a JSON file ({e})") from None
  if not isinstance(side, dict) or not isinstance(side.get("model_args"), dict):
    raise UnreadableFileError(f"cannot read {path}: no 'model_args' object (not written by tinymim_jax.convert)")
  owner = side.get(WEIGHTS_FILE_KEY)
  if owner is not None and owner != os.path.basename(os.fspath(weights_path)):
    return None  # it describes `owner` (e.g. the .safetensors imported from this .pth), not this file
  check_sidecar(side, path)
  return side


def check_sidecar(side: Mapping, path: str = "<sidecar>") -> None:
  """Raises UnreadableFileError (one line: the file, the key, the value, what is allowed) for a sidecar whose
  sizes are not integers in range (_INT_BOUNDS), whose heads do not divide the width, or whose per-block head
  counts name blocks the model does not have."""
  def bad(key, value, want):
    return UnreadableFileError(f"cannot use {path}: {key}={value!r} {want} (edit or delete the file, or pass the "
                               f"architecture explicitly)")

  def integer(section, key, value, bounds):
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int):
      raise bad(f"{section}.{key}", value, f"is not an integer in [{lo}, {hi}]")
    if not lo <= value <= hi:
      raise bad(f"{section}.{key}", value, f"is outside [{lo}, {hi}]")

  args = side["model_args"]
  for key, bounds in _INT_BOUNDS.items():
    if key in args:
      integer("model_args", key, args[key], bounds)
  dim = args.get("embed_dim")
  overrides = args.get("head_overrides") or {}
  if not isinstance(overrides, Mapping):
    raise bad("model_args.head_overrides", overrides, "is not an object {block: heads}")
  for block, heads in overrides.items():
    if not str(block).isdigit() or not 1 <= int(block) <= args.get("depth", 1024):
      raise bad("model_args.head_overrides", {block: heads}, f"names no block of 1..{args.get('depth')}")
    integer("model_args", f"head_overrides[{block}]", heads, _INT_BOUNDS["num_heads"])
  for key, heads in [("num_heads", args.get("num_heads"))] + [(f"head_overrides[{b}]", h) for b, h in overrides.items()]:
    if dim is not None and heads is not None and dim % heads:
      raise bad(f"model_args.{key}", heads, f"does not divide embed_dim={dim}")
  if args.get("img_size") is not None and args.get("patch_size") is not None and args["img_size"] % args["patch_size"]:
    raise bad("model_args.img_size", args["img_size"], f"is not a multiple of patch_size={args['patch_size']}")
  decoder = side.get("decoder_args")
  if decoder is not None:
    if not isinstance(decoder, Mapping):
      raise bad("decoder_args", decoder, "is not an object")
    for key, bounds in _DECODER_BOUNDS.items():
      if key in decoder:
        integer("decoder_args", key, decoder[key], bounds)
  assumed = side.get(ASSUMED_KEY, [])
  if not isinstance(assumed, list) or not all(isinstance(a, str) for a in assumed):
    raise bad(ASSUMED_KEY, assumed, "is not a list of field names")


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
