"""Other libraries' layouts of a ViT -> timm names: Hugging Face transformers (ViT, ViTMAE, Dinov2,
Dinov2WithRegisters), DINOv2's own hub files (with and without registers), OpenAI / OpenCLIP visual towers,
DINOv3 in timm's Eva names and in its original hub files.

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
  family: str                                  # 'mae' | 'dinov2' | 'transformers_dinov2[_with_registers]' |
                                               # 'clip' | 'vit': picks the default resampling (load.resample_method)
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


# ViTMAEForPreTraining's decoder layers: as transformers 4 (and the hub's files) name them, and as transformers 5's
# save_pretrained writes them (its reverse of the 'encoder.layer' -> 'layers' renaming also hits 'decoder_layers').
_HF_MAE_DECODER_LAYERS = ("decoder.decoder_layers.", "decoder.decoder_encoder.layer.")


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


def _hf(weights: Mapping[str, np.ndarray], model_type: str | None = None) -> Converted | None:
  anchors = [k[:-len(_HF_ANCHOR)] for k in weights if k == _HF_ANCHOR or k.endswith("." + _HF_ANCHOR)]
  if len(anchors) != 1:
    return None
  p = anchors[0]  # 'vit.' (ViTForImageClassification, ViTMAEForPreTraining), 'dinov2.', or '' (the bare models)
  out, used, skipped, notes = {}, set(), {}, []
  dinov2 = any(k.startswith(p + "encoder.layer.") and ".layer_scale1." in k for k in weights)
  registers = p + "embeddings.register_tokens" in weights
  # A bare ViTMAEModel holds ViTModel's names: only its config.json's model_type tells them apart.
  mae = model_type == "vit_mae" or any(k.startswith(_HF_MAE_DECODER_LAYERS) for k in weights)

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
    for layers in _HF_MAE_DECODER_LAYERS:
      _hf_blocks(weights, layers, "decoder_blocks.", out, used)
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
  family = ("transformers_dinov2_with_registers" if registers else "transformers_dinov2" if dinov2 else
            "mae" if mae else "vit")
  return Converted(f"Hugging Face transformers {name}{where}", family,
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


# --------------------------------------------------------------------------------------------------------
# DINOv3: timm's Eva names and the original hub files (facebookresearch/dinov3 hubconf, dinov3_vits16_pretrain_*.pth).
# Our blocks keep DINOv2's names (ls1.gamma, one qkv bias); timm's Eva has gamma_1 / gamma_2 and q_bias / v_bias
# (its k bias is a fixed zero buffer); the original has storage_tokens, a masked qkv bias (bias_mask zeroes the k
# part: LinearKMaskedBias), SwiGLU w1 / w2 / w3 and the RoPE periods as a buffer.
# --------------------------------------------------------------------------------------------------------
_EVA_GAMMA = re.compile(r"^(blocks\.\d+\.)gamma_([12])$")


def _qkv_bias(q, v):
  return np.concatenate([q, np.zeros_like(q), v])


def _timm_eva(weights: Mapping[str, np.ndarray]) -> Converted | None:
  # DINOv3's Eva has a rotary embedding and no pos_embed; BEiT-style files (the authors' segmentation and
  # TinyMIM*-T backbones) share gamma_1 / gamma_2 but keep pos_embed and are read through names.FILE_ALIASES.
  if not any(_EVA_GAMMA.match(k) for k in weights) or "pos_embed" in weights:
    return None
  out = {}
  for k, v in weights.items():
    m = _EVA_GAMMA.match(k)
    a = re.match(r"^(blocks\.\d+\.attn\.)(q|v)_bias$", k)
    if m:
      out[f"{m[1]}ls{m[2]}.gamma"] = v
    elif a and a[2] == "q":
      out[a[1] + "qkv.bias"] = _qkv_bias(v, weights[a[1] + "v_bias"])
    elif not a:
      out[k] = v
  return Converted("timm Eva (DINOv3)", "dinov3", out, {})


def from_timm_eva_names(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our DINOv3 names -> timm Eva's (the inverse of the reading above). Raises ValueError for a k bias that is
  not zero (timm's Eva and DINOv3 fix it at 0)."""
  out = {}
  for k, v in weights.items():
    m = re.match(r"^(blocks\.\d+\.)ls([12])\.gamma$", k)
    if m:
      out[f"{m[1]}gamma_{m[2]}"] = v
    elif k.endswith("attn.qkv.bias"):
      q, kb, vb = np.split(v, 3)
      if np.any(kb):
        raise ValueError(f"{k}: the k part of the qkv bias is not 0, which timm's Eva cannot hold")
      out[k[:-len("qkv.bias")] + "q_bias"], out[k[:-len("qkv.bias")] + "v_bias"] = q, vb
    else:
      out[k] = v
  return out


_DINOV3_SWIGLU = {"w1": "fc1_g", "w2": "fc1_x", "w3": "fc2"}


def _dinov3_hub(weights: Mapping[str, np.ndarray]) -> Converted | None:
  if "storage_tokens" not in weights or "patch_embed.proj.weight" not in weights:
    return None
  out, skipped, notes = {}, {}, []
  for k, v in weights.items():
    if k == "mask_token":
      skipped[k] = "iBOT's mask token (training only)"
    elif k.endswith(".bias_mask"):
      skipped[k] = "the qkv bias mask (applied: the k part of the bias is 0)"
    elif k.endswith("rope_embed.periods"):
      skipped[k] = "RoPE periods (recomputed in float32 from the temperature, as timm does)"
      d = v.shape[0] * 4
      ours = (100.0 ** (2.0 * np.arange(d // 4, dtype=np.float32) / (d // 2))).astype(np.float32)
      err = float(np.max(np.abs(v.astype(np.float64) / ours - 1)))
      if err > 1e-6:
        notes.append(f"the file's RoPE periods differ from temperature 100's by up to {err:.2g} relative (a "
                     f"bfloat16 copy); the model uses the float32 ones, as timm does")
    elif k.startswith("local_cls_norm"):
      skipped[k] = "the 7B pretraining's local-crop CLS norm (training only)"
    elif k == "storage_tokens":
      out["reg_token"] = v
    elif k.endswith("attn.qkv.bias"):
      mask = weights.get(k + "_mask")
      q, _, vb = np.split(v * mask if mask is not None else v, 3)
      out[k] = _qkv_bias(q, vb)
    else:
      m = re.match(r"^(blocks\.\d+\.mlp\.)(w[123])\.(weight|bias)$", k)
      out[f"{m[1]}{_DINOV3_SWIGLU[m[2]]}.{m[3]}" if m else k] = v
  return Converted("DINOv3 hub file", "dinov3", out, skipped, notes)


def to_dinov3_hub(weights: Mapping[str, np.ndarray], head_dim: int) -> dict[str, np.ndarray]:
  """Our DINOv3 names -> the original hub file's: storage_tokens, a qkv bias with its bias_mask (zeros where the
  model has none), SwiGLU w1 / w2 / w3, the RoPE periods (temperature 100), a zero mask_token."""
  out = {}
  d = weights["cls_token"].shape[-1]
  dtype = weights["cls_token"].dtype
  for k, v in weights.items():
    m = re.match(r"^(blocks\.\d+\.mlp\.)(fc1_g|fc1_x|fc2)\.(weight|bias)$", k)
    if k == "reg_token":
      out["storage_tokens"] = v
    elif m and any(n.startswith(m[1] + "fc1_g") for n in weights):
      out[f"{m[1]}{ {b: a for a, b in _DINOV3_SWIGLU.items()}[m[2]] }.{m[3]}"] = v
    else:
      out[k] = v
    if k.endswith("attn.qkv.weight"):
      bias = k[:-len("weight")] + "bias"
      if bias not in weights:
        out[bias] = np.zeros(3 * d, dtype)
      out[bias + "_mask"] = np.concatenate([np.ones(d, dtype), np.zeros(d, dtype), np.ones(d, dtype)])
  out["mask_token"] = np.zeros((1, d), dtype)
  out["rope_embed.periods"] = (100.0 ** (2.0 * np.arange(head_dim // 4, dtype=np.float32) / (head_dim // 2))
                               ).astype(np.float32)
  return out


_LAYOUTS: tuple[Callable[[Mapping[str, np.ndarray]], Converted | None], ...] = (_clip, _hf, _dinov3_hub, _timm_eva, _dinov2)


def to_timm(weights: Mapping[str, np.ndarray], model_type: str | None = None) -> Converted | None:
  """The file's tensors in timm names when they are in one of the layouts above, else None (already timm / MAE
  names, or unknown). Values are not copied or cast; only DINOv2's registers' CLS fold and q / k / v
  concatenation compute (in the file's dtype, as timm / transformers do). `model_type`: a transformers
  config.json's, where the file came with one (names a bare ViTMAEModel, whose names are ViTModel's)."""
  for convert in _LAYOUTS:
    out = convert(weights, model_type) if convert is _hf else convert(weights)
    if out is not None:
      return out
  return None
