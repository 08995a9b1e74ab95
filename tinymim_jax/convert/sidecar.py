"""The architecture saved beside a weight file (`<name>.config.json`, timm / Hugging Face hub style): a state
dict does not store head counts, so readers take them from here when present."""

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
