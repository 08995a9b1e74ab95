"""Hub folders: a Hugging Face hub snapshot (transformers' `config.json` + `model.safetensors` /
`pytorch_model.bin`) or a timm hub folder (timm's `config.json`, as timm.models.save_for_hf writes it), read as
a weight file with its architecture; and timm hub folders written (export_hub), which timm loads with
`timm.create_model('local-dir:DIR', pretrained=True)` as it loads its own."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Mapping

from tinymim_jax import paths
from tinymim_jax.convert.errors import ConvertError, UnreadableFileError


HUB_CONFIG = "config.json"
# What hub snapshots hold, in the order transformers and timm prefer them.
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclasses.dataclass
class HubFolder:
  weights: str          # the weight file's path
  sidecar: dict         # the architecture, as sidecar.architecture writes it
  kind: str             # 'timm' or 'transformers <model_type>'
  model_type: str | None = None  # transformers' model_type ('vit_mae', ...); None for timm's


def hub_folder(path: str) -> HubFolder | None:
  """The hub folder at `path` (a directory with config.json and one of HUB_WEIGHTS), else None.

  Raises UnreadableFileError for a config.json that is not JSON, ConvertError for a model it does not describe
  as a ViT this project builds (naming the model type and what is supported)."""
  cfg_path = paths.join(path, HUB_CONFIG)
  weights = next((paths.join(path, w) for w in HUB_WEIGHTS if paths.isfile(paths.join(path, w))), None)
  if weights is None or not paths.isfile(cfg_path):
    return None
  try:
    cfg = json.loads(paths.read_bytes(cfg_path).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UnreadableFileError(f"cannot read {cfg_path}: not a JSON file ({e})") from None
  if not isinstance(cfg, dict):
    raise UnreadableFileError(f"cannot read {cfg_path}: a JSON {type(cfg).__name__}, not an object")
  if "architecture" in cfg:
    return HubFolder(weights, timm_config_sidecar(cfg, cfg_path), "timm")
  if "model_type" in cfg:
    return HubFolder(weights, transformers_config_sidecar(cfg, cfg_path), f"transformers {cfg['model_type']}",
                     str(cfg["model_type"]))
  return None  # another config.json (e.g. a run's workdir, which also holds model.safetensors): not a hub folder


def _sidecar(name: str, args: dict, *, global_pool: str = "token", num_classes: int = 0,
             decoder: dict | None = None) -> dict:
  side = {"architecture": name, "img_size": args.get("img_size"), "global_pool": global_pool,
          "num_classes": num_classes,
          "model_args": {**args, "pooling": "avg" if global_pool == "avg" else "cls", "num_classes": num_classes}}
  if decoder is not None:
    side["decoder_args"] = decoder
  return side


# transformers' model types and their config fields (configuration_vit.py, configuration_vit_mae.py,
# configuration_dinov2.py, configuration_dinov2_with_registers.py) -> ViTConfig fields.
_HF_TYPES = ("vit", "vit_mae", "dinov2", "dinov2_with_registers")


def transformers_config_sidecar(cfg: Mapping, where: str = HUB_CONFIG) -> dict:
  """A transformers config.json -> the architecture (sidecar) of the same ViT. Raises ConvertError for another
  model type or a part this project does not build (SwiGLU, no qkv bias, another activation)."""
  kind = cfg.get("model_type")
  if kind not in _HF_TYPES:
    raise ConvertError(f"{where}: transformers model_type {kind!r} is not a ViT this project reads; "
                       f"supported: {', '.join(_HF_TYPES)}")
  act = cfg.get("hidden_act", "gelu")
  if act not in ("gelu", "quick_gelu"):
    raise ConvertError(f"{where}: hidden_act {act!r} is not built here (only 'gelu', 'quick_gelu')")
  if cfg.get("use_swiglu_ffn"):
    raise ConvertError(f"{where}: use_swiglu_ffn=true (DINOv2 giant's SwiGLU MLP) is not built here")
  if cfg.get("qkv_bias", True) is False:
    raise ConvertError(f"{where}: qkv_bias=false is not built here (every block has a qkv bias)")
  d = int(cfg.get("hidden_size", 768))
  mlp = cfg.get("mlp_ratio") or int(cfg.get("intermediate_size", 4 * d)) / d
  img = cfg.get("image_size", 224)
  args = {"img_size": int(img if isinstance(img, int) else img[0]), "patch_size": int(cfg.get("patch_size", 16)),
          "embed_dim": d, "depth": int(cfg.get("num_hidden_layers", 12)),
          "num_heads": int(cfg.get("num_attention_heads", 12)), "mlp_ratio": float(mlp),
          "norm_eps": float(cfg.get("layer_norm_eps", 1e-12)), "act_layer": act,
          # ViTMAE's table is its fixed sin-cos one (requires_grad=False); the others learn theirs.
          "pos_embed": "sincos" if kind == "vit_mae" else "learn"}
  if kind.startswith("dinov2"):
    args["init_values"] = float(cfg.get("layerscale_value", 1.0))
  if kind == "dinov2_with_registers":
    args.update(reg_tokens=int(cfg.get("num_register_tokens", 4)), no_embed_class=True)
  decoder = None
  archs = cfg.get("architectures") or []
  # ViTMAEModel (the encoder alone) saves no decoder; ViTMAEForPreTraining, or a config naming no class, has one.
  if kind == "vit_mae" and (not archs or any("ForPreTraining" in a for a in archs)):
    dd = int(cfg.get("decoder_hidden_size", 512))
    decoder = {"embed_dim": dd, "depth": int(cfg.get("decoder_num_hidden_layers", 8)),
               "num_heads": int(cfg.get("decoder_num_attention_heads", 16)),
               "mlp_ratio": int(cfg.get("decoder_intermediate_size", 4 * dd)) / dd}
  labels = cfg.get("id2label") or {}
  classes = len(labels) if kind == "vit" and any("ForImageClassification" in a for a in cfg.get("architectures", [])) else 0
  return _sidecar(("mae_" if decoder else "") + _variant_name(args), args, num_classes=classes, decoder=decoder)


def _variant_name(args: Mapping) -> str:
  from tinymim_jax.models import VARIANTS
  shape = ("patch_size", "embed_dim", "depth")
  return next((n for n, v in VARIANTS.items() if all(v.get(k) == args.get(k) for k in shape)), "vit_custom")


# timm VisionTransformer arguments -> ViTConfig fields (the ones this project builds).
_TIMM_ARGS = {"img_size": "img_size", "patch_size": "patch_size", "embed_dim": "embed_dim", "depth": "depth",
              "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "init_values": "init_values",
              "reg_tokens": "reg_tokens", "no_embed_class": "no_embed_class", "pre_norm": "pre_norm",
              "act_layer": "act_layer"}
_TIMM_IGNORED = ("num_classes", "global_pool", "in_chans", "fc_norm", "dynamic_img_size", "pretrained_model_args",
                 "num_reg_tokens", "use_fc_norm")


def timm_architecture(name: str) -> str | None:
  """timm's model name (optionally with a '.tag') -> the variant of the same family here, or None."""
  from tinymim_jax.models import VARIANTS
  base = name.split(".")[0]
  if base in VARIANTS:
    return base
  short = re.sub(r"_\d+$", "", base)  # vit_small_patch16_224 -> vit_small_patch16
  return short if short in VARIANTS else None


def timm_config_sidecar(cfg: Mapping, where: str = HUB_CONFIG) -> dict:
  """timm's hub config.json (architecture, num_classes, global_pool, model_args, pretrained_cfg.input_size) ->
  the architecture (sidecar). Raises ConvertError for an architecture or argument this project does not build."""
  from tinymim_jax.models import VARIANTS
  arch = str(cfg["architecture"])
  ours = cfg.get("tinymim_jax")
  if isinstance(ours, dict) and isinstance(ours.get("model_args"), dict):  # written by export_hub: exact fields
    return dict(ours)
  name = timm_architecture(arch)
  if name is None:
    raise ConvertError(f"{where}: timm architecture {arch!r} has no counterpart here; known: "
                       f"{', '.join(sorted(VARIANTS))} (with timm's '_224' / '_384' suffixes)")
  args = dict(VARIANTS[name])
  model_args = dict(cfg.get("model_args") or {})
  unknown = sorted(set(model_args) - set(_TIMM_ARGS) - set(_TIMM_IGNORED))
  if unknown:
    raise ConvertError(f"{where}: timm model_args {unknown} are not built here (known: {sorted(_TIMM_ARGS)})")
  for k, v in model_args.items():
    if k in _TIMM_ARGS:
      args[_TIMM_ARGS[k]] = v
  size = model_args.get("img_size") or (cfg.get("pretrained_cfg") or {}).get("input_size", [3, None, None])[1:]
  if isinstance(size, (list, tuple)):
    if len(size) == 2 and size[0] != size[1]:
      raise ConvertError(f"{where}: non-square input {list(size)} is not built here")
    size = size[0] if size else None
  if size:
    args["img_size"] = int(size)
  if args.get("act_layer") not in (None, "gelu", "quick_gelu"):
    raise ConvertError(f"{where}: act_layer {args['act_layer']!r} is not built here")
  pool = str(cfg.get("global_pool", model_args.get("global_pool", "token")))
  if pool not in ("token", "avg"):
    raise ConvertError(f"{where}: global_pool {pool!r} is not built here ('token' or 'avg')")
  args["pos_embed"] = "learn"  # timm's tables are parameters
  return _sidecar(name, args, global_pool=pool, num_classes=int(cfg.get("num_classes", 0)))


def sidecar_family(sidecar: Mapping | None) -> str | None:
  """The family a recorded architecture names ('dinov2', 'clip', 'mae') or None."""
  name = str((sidecar or {}).get("architecture", ""))
  return "dinov2" if "dinov2" in name else "clip" if "_clip" in name else None


# Our variants -> timm's model names (timm 1.0 vision_transformer.py); the other families share timm's names.
_TIMM_NAMES = {"vit_tiny_patch16": "vit_tiny_patch16_224", "vit_small_patch16": "vit_small_patch16_224",
               "vit_base_patch16": "vit_base_patch16_224", "vit_large_patch16": "vit_large_patch16_224",
               "vit_huge_patch14": "vit_huge_patch14_224"}


def timm_hub_config(side: Mapping) -> tuple[dict, list[str]]:
  """The architecture (sidecar) -> (timm's hub config.json, notes): architecture, num_classes, global_pool,
  model_args (every shape argument, so any size loads) and pretrained_cfg (input size, mean / std), as
  timm.models.save_for_hf writes them; our exact fields ride under the key 'tinymim_jax', which timm ignores.

  Raises ConvertError for an MAE (not a timm model) or a LayerNorm epsilon timm's model of that name does not use.
  """
  from tinymim_jax.models import VARIANTS
  from tinymim_jax.models.variants import INPUT_NORM
  if "decoder_args" in side:
    raise ConvertError("an MAE (encoder + decoder) is not a timm model: export its encoder (a ViT) to a hub folder")
  a = side["model_args"]
  base = str(side["architecture"])
  base = base if base in VARIANTS else next(
      (n for n in _TIMM_NAMES if VARIANTS[n]["patch_size"] == a["patch_size"]), "vit_base_patch16")
  default_eps = VARIANTS[base].get("norm_eps", 1e-6)
  if float(a.get("norm_eps", 1e-6)) != default_eps:
    raise ConvertError(f"LayerNorm epsilon {a['norm_eps']} differs from timm's {default_eps} for {base}: timm's "
                       f"config.json cannot express it")
  heads = [int(a["num_heads"])] + [int(h) for h in (a.get("head_overrides") or {}).values()]
  notes = []
  if len(set(heads)) > 1:
    notes.append(f"timm builds every block with {a['num_heads']} heads; this model had per-block counts "
                 f"{dict(a['head_overrides'])} (a TinyMIM relation block): the same weights regrouped, as fine-tuning "
                 f"does (docs/method.md 2.3)")
  args = {"img_size": int(a["img_size"]), "patch_size": int(a["patch_size"]), "embed_dim": int(a["embed_dim"]),
          "depth": int(a["depth"]), "num_heads": int(a["num_heads"]), "mlp_ratio": float(a["mlp_ratio"])}
  if a.get("init_values"):
    args["init_values"] = float(a["init_values"])
  if a.get("reg_tokens"):
    args["reg_tokens"] = int(a["reg_tokens"])
  if a.get("no_embed_class"):
    args["no_embed_class"] = True
  if a.get("pre_norm") != VARIANTS[base].get("pre_norm", False):
    args["pre_norm"] = bool(a.get("pre_norm"))
  if a.get("act_layer", "gelu") != VARIANTS[base].get("act_layer", "gelu"):
    args["act_layer"] = a.get("act_layer", "gelu")
  if a.get("rope", "none") != "none":  # timm's Eva: the variant's own arguments, only the sizes may differ
    args = {k: args[k] for k in ("img_size", "embed_dim", "depth", "num_heads")}
    if a.get("pooling") == "avg":
      raise ConvertError("a DINOv3 model with pooling 'avg' (fc_norm after the mean) is not timm's Eva 'avg' (mean "
                         "after norm): export it with pooling 'cls'")
  pool = "avg" if a.get("pooling") == "avg" else "token"
  classes = int(a.get("num_classes", 0))
  args.update(global_pool=pool, num_classes=classes)
  mean, std = INPUT_NORM.get(base, INPUT_NORM["vit_base_patch16"])
  img = args["img_size"]
  cfg = {"architecture": _TIMM_NAMES.get(base, base), "num_classes": classes, "num_features": args["embed_dim"],
         "global_pool": pool, "model_args": args,
         "pretrained_cfg": {"tag": "tinymim_jax", "custom_load": False, "input_size": [3, img, img],
                            "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 0.875,
                            "crop_mode": "center", "mean": list(mean), "std": list(std), "num_classes": classes,
                            "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head"},
         "tinymim_jax": dict(side)}
  return cfg, notes


def write_hub_folder(out_dir: str, weights: Mapping, side: Mapping, card: str) -> list[str]:
  """Writes a timm hub folder: model.safetensors (timm names), config.json (timm_hub_config) and README.md (the
  model card `card`), which timm.create_model('local-dir:' + out_dir, pretrained=True) loads offline.
  -> notes (timm_hub_config's). Raises ConvertError as timm_hub_config does; nothing is written then."""
  from tinymim_jax.convert.files import save_pytorch_weights
  cfg, notes = timm_hub_config(side)
  paths.makedirs(out_dir)
  save_pytorch_weights(dict(weights), paths.join(out_dir, HUB_WEIGHTS[0]), sidecar=False)
  paths.write_atomic(paths.join(out_dir, HUB_CONFIG), json.dumps(cfg, indent=2))
  paths.write_atomic(paths.join(out_dir, "README.md"), card)
  return notes
