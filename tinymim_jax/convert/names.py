"""The one table of names and layouts: our nnx state paths <-> PyTorch (timm / MAE) names (docs/method.md section 7)."""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from tinymim_jax.convert.dtypes import cast_weights


DECODER_RE = re.compile(r"^(mask_token$|decoder_)")


def detect_layout(names, extras: Mapping[str, str] = (), source_layout: str | None = None) -> str:
  """A human-readable guess of which kind of checkpoint these keys (timm / MAE names) come from; `source_layout`:
  the other library's layout they were converted from (layouts.py), named first."""
  names = set(names)
  if any(DECODER_RE.match(k) for k in names):
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
  if source_layout is not None:
    kind = f"{source_layout} (as timm names: {kind})"
  if {"optimizer", "args"} & extras:
    kind = f"training checkpoint: {kind}"
  return kind


def flat_state(model) -> dict[tuple, Any]:
  from flax import nnx, traverse_util

  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))


_CONV1X1_INDEX = {"norm": "0", "fc": "1"}


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


def to_torch_layout(path: tuple, x: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and x.ndim == 2:
    return x.T  # Linear: (in, out) -> (out, in)
  if path[-1] == "kernel" and x.ndim == 4:
    return x.transpose(3, 2, 0, 1)  # Conv: (p, p, 3, D) -> (D, 3, p, p)
  return x


def from_torch_layout(path: tuple, x: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and x.ndim == 2:
    return x.T
  if path[-1] == "kernel" and x.ndim == 4:
    return x.transpose(2, 3, 1, 0)  # (D, 3, p, p) -> (p, p, 3, D)
  return x


def torch_shape(path: tuple, shape: tuple) -> tuple:
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
# timm's Eva (DINOv3) registers gamma_1 / gamma_2 before norm1, q_bias / v_bias before qkv, SwiGLU's fc1_g, fc1_x.
_EVA_ORDER = {n: i for i, n in enumerate([
    "cls_token", "reg_token", "patch_embed", "blocks", "norm", "fc_norm", "head", "gamma_1", "gamma_2", "norm1",
    "attn", "norm2", "mlp", "q_bias", "v_bias", "qkv", "proj", "fc1", "fc1_g", "fc1_x", "fc2", "weight", "bias"])}


def _eva_order(name: str):
  return tuple((int(p), "") if p.isdigit() else (_EVA_ORDER.get(p, len(_EVA_ORDER)), p) for p in name.split("."))


# Other names files use for our parameters (file-name regex -> our PyTorch name). The authors' segmentation
# backbone (BEiT's `backbone/mae.py`) names the layer scales gamma_1 / gamma_2 (timm: ls1.gamma / ls2.gamma).
FILE_ALIASES = ((re.compile(r"^(blocks\.\d+\.)gamma_([12])$"), r"\1ls\2.gamma"),)
# Buffers of such files that our model recomputes: checked against ours, then skipped (BEiT's fixed index into
# the relative position bias table, docs/method.md section 10.1).
REL_POS_INDEX_RE = re.compile(r"^blocks\.\d+\.attn\.relative_position_index$")


def file_alias(name: str) -> str:
  """Our PyTorch name for a file's key (the key itself unless FILE_ALIASES renames it)."""
  for pattern, ours in FILE_ALIASES:
    if pattern.match(name):
      return pattern.sub(ours, name)
  return name


def state_dict_order(name: str):
  return tuple((int(p), "") if p.isdigit() else (_ORDER.get(p, len(_ORDER)), p) for p in name.split("."))


def torch_names(model) -> dict[str, tuple[tuple, Any]]:
  """{PyTorch name: (our state path, our value)} in timm order."""
  flat = flat_state(model)
  out = {_torch_name(path): (path, value) for path, value in flat.items()}
  if len(out) != len(flat):
    raise AssertionError("two model parameters map to one PyTorch name")
  return dict(sorted(out.items(), key=lambda kv: state_dict_order(kv[0])))


def export_pytorch_weights(model, dtype=None, layout: str = "timm") -> dict[str, np.ndarray]:
  """{timm / MAE name: C-contiguous array} of a ViT or MAE model, in timm's order, in the parameters' dtype
  (float32, or float64 for a param_dtype float64 model: nothing is rounded on the way out) or, for the floating
  ones, `dtype` ('float16' / 'bfloat16' / 'float32' / 'float64').

  layout: 'timm' (a DINOv3 model: timm's Eva names) or 'dinov3' (a DINOv3 model: the original hub file's names).
  A 'cls'-layout ViT loads into timm VisionTransformer(global_pool='token', num_classes=0) (plus a head if
  it has one), an 'avg'-layout ViT into VisionTransformer(global_pool='avg', fc_norm=True), an MAE model
  into MAE's MaskedAutoencoderViT -- all with load_state_dict(strict=True).
  """
  out = {}
  for name, (path, value) in torch_names(model).items():
    # A copy: writable (torch.from_numpy warns on the read-only views of jax arrays) and C-contiguous.
    out[name] = np.array(to_torch_layout(path, np.asarray(value)), order="C")
  cfg = model.config[0] if isinstance(model.config, tuple) else model.config
  if getattr(cfg, "rope", "none") != "none":  # DINOv3: timm's Eva names, or the original hub file's
    from tinymim_jax.convert.errors import ConvertError
    from tinymim_jax.convert.layouts import from_timm_eva_names, to_dinov3_hub
    if layout == "dinov3":
      out = to_dinov3_hub(out, cfg.embed_dim // cfg.num_heads)
    elif layout == "timm":
      try:
        out = from_timm_eva_names(out)
      except ValueError as e:
        raise ConvertError(str(e)) from None
      out = dict(sorted(out.items(), key=lambda kv: _eva_order(kv[0])))
    else:
      raise ConvertError(f"unknown export layout {layout!r}: 'timm' or 'dinov3'")
  elif layout != "timm":
    from tinymim_jax.convert.errors import ConvertError
    raise ConvertError(f"layout {layout!r} is for DINOv3 models; this model exports in timm's names only")
  return cast_weights(out, dtype) if dtype is not None else out
