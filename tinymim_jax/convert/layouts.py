"""Other libraries' layouts of a ViT -> timm names: Hugging Face transformers (ViT, ViTMAE, Dinov2,
Dinov2WithRegisters), DINOv2's own hub files (with and without registers), OpenAI / OpenCLIP visual towers.

Each conversion is the one the layout's defining library implies, written after timm's own filters where timm has
one (timm 1.0 vision_transformer.py: _convert_dinov2, _convert_openai_clip) and after transformers' modeling files
where it does not (modeling_vit.py, modeling_vit_mae.py, modeling_dinov2.py: q / k / v Linears, concatenated into
timm's qkv in that order). docs/method.md section 7.7.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import numpy as np


@dataclasses.dataclass
class Converted:
  """A state dict in timm names, and what the conversion did."""
  layout: str                                  # the layout's name, as reports print it
  family: str                                  # 'mae' | 'dinov2' | 'clip' | 'vit': picks the default resampling
  weights: dict[str, np.ndarray]
  skipped: dict[str, str]                      # the file's keys not taken -> why
  notes: list[str] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------------------
# Hugging Face transformers: ViTModel / ViTForImageClassification / ViTMAEForPreTraining / Dinov2(WithRegisters).
# --------------------------------------------------------------------------------------------------------
_HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"

# One transformers layer (modeling_vit.ViTLayer, modeling_dinov2.Dinov2Layer) -> timm's Block; q/k/v are merged.
_HF_LAYER = [
    ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),          # ViT / ViTMAE
    ("norm1.", "norm1."), ("norm2.", "norm2."),                                # Dinov2
    ("attention.output.dense.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."),       # ViT / ViTMAE
    ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),                        # Dinov2
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
]


def _hf_layer(rest: str) -> str | None:
  for theirs, ours in _HF_LAYER:
    if rest.startswith(theirs):
      return ours + rest[len(theirs):]
  return None


def _hf_blocks(weights, src_prefix: str, dst_prefix: str, out: dict, used: set):
  """encoder.layer.N.* (or decoder_layers.N.*) under src_prefix -> dst_prefix + 'N.*', q / k / v -> qkv."""
  pat = re.compile(re.escape(src_prefix) + r"(\d+)\.(.*)$")
  qkv: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}
  for k, v in weights.items():
    m = pat.match(k)
    if not m:
      continue
    i, rest = m[1], m[2]
    a = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
    if a:
      qkv.setdefault((i, a[2]), {})[a[1]] = (k, v)
      continue
    name = _hf_layer(rest)
    if name is not None:
      out[f"{dst_prefix}{i}.{name}"] = v
      used.add(k)
  for (i, leaf), parts in qkv.items():
    if len(parts) == 3:  # else the pieces stay under their own names, and the load names them
      out[f"{dst_prefix}{i}.attn.qkv.{leaf}"] = np.concatenate([parts[n][1] for n in ("query", "key", "value")], 0)
      used.update(parts[n][0] for n in parts)


def _hf(weights: Mapping[str, np.ndarray]) -> Converted | None:
  anchors = [k[:-len(_HF_ANCHOR)] for k in weights if k == _HF_ANCHOR or k.endswith("." + _HF_ANCHOR)]
  if len(anchors) != 1:
    return None
  p = anchors[0]  # 'vit.' (ViTForImageClassification, ViTMAEForPreTraining), 'dinov2.', or '' (the bare models)
  out, used, skipped, notes = {}, set(), {}, []
  dinov2 = any(k.startswith(p + "encoder.layer.") and ".layer_scale1." in k for k in weights)
  registers = p + "embeddings.register_tokens" in weights
  mae = any(k.startswith("decoder.decoder_layers.") for k in weights)

  def take(theirs, ours, fn=lambda x: x):
    if theirs in weights:
      out[ours] = fn(weights[theirs])
      used.add(theirs)

  take(p + "embeddings.cls_token", "cls_token")
  take(p + "embeddings.position_embeddings", "pos_embed")
  take(p + "embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight")
  take(p + "embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias")
  take(p + "layernorm.weight", "norm.weight")
  take(p + "layernorm.bias", "norm.bias")
  _hf_blocks(weights, p + "encoder.layer.", "blocks.", out, used)
  if registers:
    # Dinov2WithRegisters adds its table (CLS row first) before inserting the registers after CLS: timm's
    # no_embed_class form folds the CLS row into cls_token (as its _convert_dinov2 does for DINOv2's own files).
    used.add(p + "embeddings.register_tokens")
    out["reg_token"] = weights[p + "embeddings.register_tokens"]
    out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
    out["pos_embed"] = out["pos_embed"][:, 1:]
  if mae:
    d = "decoder."
    take(d + "mask_token", "mask_token")
    take(d + "decoder_pos_embed", "decoder_pos_embed")
    for part in ("decoder_embed", "decoder_norm", "decoder_pred"):
      take(f"{d}{part}.weight", f"{part}.weight")
      take(f"{d}{part}.bias", f"{part}.bias")
    _hf_blocks(weights, d + "decoder_layers.", "decoder_blocks.", out, used)
  if "classifier.weight" in weights and not dinov2:  # ViTForImageClassification: CLS after layernorm -> Linear
    take("classifier.weight", "head.weight")
    take("classifier.bias", "head.bias")
  for k in weights:
    if k in used:
      continue
    if k.startswith(p + "embeddings.mask_token"):
      skipped[k] = "masked-image-modeling token (training only)"
    elif k.startswith(p + "pooler."):
      skipped[k] = "transformers' pooler (tanh Linear over CLS; not part of a timm ViT)"
    elif k.startswith("classifier."):
      skipped[k] = "Dinov2ForImageClassification's head over [CLS, mean of patches] (no timm counterpart)"
    else:
      out[k] = weights[k]  # not a transformers name: left for the load to report
  name = ("Dinov2WithRegisters" if registers else "Dinov2" if dinov2 else "ViTMAE" if mae else "ViT")
  where = f", under {p!r}" if p else ""
  return Converted(f"Hugging Face transformers {name}{where}", "dinov2" if dinov2 else "mae" if mae else "vit",
                   out, skipped, notes)


# --------------------------------------------------------------------------------------------------------
# DINOv2's own hub files (facebookresearch/dinov2 hubconf: dinov2_vits14_pretrain.pth, ..._reg4_pretrain.pth).
# --------------------------------------------------------------------------------------------------------
def _dinov2(weights: Mapping[str, np.ndarray]) -> Converted | None:
  mt = weights.get("mask_token")
  if mt is None or mt.ndim != 2 or "patch_embed.proj.weight" not in weights:  # MAE's mask token is (1, 1, D)
    return None
  out, skipped = {}, {"mask_token": "iBOT's mask token (training only)"}
  w = {k: v for k, v in weights.items() if k != "mask_token"}
  registers = "register_tokens" in w
  if registers:  # timm _convert_dinov2: a no_embed_class model, the CLS row folded into cls_token
    out["reg_token"] = w.pop("register_tokens")
    out["cls_token"] = w.pop("cls_token") + w["pos_embed"][:, :1]
    out["pos_embed"] = w.pop("pos_embed")[:, 1:]
  for k, v in w.items():
    out[re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", k))] = v
  n = out["reg_token"].shape[1] if registers else 0
  return Converted(f"DINOv2 hub file{f' with {n} registers' if registers else ''}", "dinov2", out, skipped)


# --------------------------------------------------------------------------------------------------------
# OpenAI CLIP / OpenCLIP visual towers (visual.conv1, visual.class_embedding, visual.transformer.resblocks.N).
# --------------------------------------------------------------------------------------------------------
_CLIP_SWAPS = [("conv1", "patch_embed.proj"), ("positional_embedding", "pos_embed"),
               ("transformer.resblocks.", "blocks."), ("ln_pre", "norm_pre"), ("ln_post", "norm"), ("ln_", "norm"),
               ("in_proj_", "qkv."), ("out_proj", "proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]


def _clip(weights: Mapping[str, np.ndarray]) -> Converted | None:
  found = [k[:-len("visual.class_embedding")] for k in weights if k.endswith("visual.class_embedding")]
  if len(found) != 1:
    return None
  p = found[0] + "visual."
  out, skipped, notes = {}, {}, []
  for k, v in weights.items():
    if not k.startswith(p):
      skipped[k] = "CLIP's text tower and logit scale (only the image tower is a ViT)"
      continue
    name = k[len(p):]
    for theirs, ours in _CLIP_SWAPS:  # timm _convert_openai_clip, in its order
      name = name.replace(theirs, ours)
    if name == "proj":  # the image projection, (D, E): timm's head Linear(D, E) with a zero bias
      out["head.weight"] = np.ascontiguousarray(v.T)
      out["head.bias"] = np.zeros(v.shape[1], v.dtype)
      notes.append(f"visual.proj -> head (CLIP's image projection to {v.shape[1]} dims, bias 0)")
    elif name == "class_embedding":
      out["cls_token"] = v[None, None]
    elif name == "pos_embed":
      out["pos_embed"] = v[None]
    else:
      out[name] = v
  notes.append("the activation is not stored: OpenAI's towers use QuickGELU (act_layer='quick_gelu'), most "
               "OpenCLIP towers exact GELU")
  lib = "OpenAI CLIP / OpenCLIP visual tower" + (f", under {found[0]!r}" if found[0] else "")
  return Converted(lib, "clip", out, skipped, notes)


_LAYOUTS: tuple[Callable[[Mapping[str, np.ndarray]], Converted | None], ...] = (_clip, _hf, _dinov2)


def to_timm(weights: Mapping[str, np.ndarray]) -> Converted | None:
  """The file's tensors in timm names when they are in one of the layouts above, else None (already timm / MAE
  names, or unknown). Values are not copied or cast; only DINOv2's registers' CLS fold and q / k / v
  concatenation compute (in the file's dtype, as timm / transformers do)."""
  for convert in _LAYOUTS:
    out = convert(weights)
    if out is not None:
      return out
  return None
