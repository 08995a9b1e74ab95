"""Which features of a frozen encoder the frozen-feature evals read (k-NN, few-shot, linear probe).

A feature is the hidden state after one block (1-based; 0 = the embeddings: patch tokens + positions with
CLS in front), optionally put through a parameter-free LayerNorm per token (eps 1e-6: the place and eps of the
ViT's final `norm`, without its affine), then pooled: 'cls' (the CLS token) or 'mean' (the mean of the patch
tokens, CLS excluded).

Default block: the last one, except for a TinyMIM student distilled with the relation target. Its relation
block contributes only LN1 and the qkv projection to the loss; its attention output projection, MLP, later
blocks and the final `norm` get no gradient and stay at their random init (train_steps.distill_frozen_patterns), so its
features are the *input* of the relation block, i.e. the output of block `student_block - 1`. (With the
feature / class-token targets the relation block's output is what is distilled: block `student_block`.)

MAE's linear probe (He et al. 2022, main_linprobe.py) reads `norm(x)[:, 0]` of the last block and puts it
through BatchNorm without affine; `FeatureSpec(block=depth, pool='cls', norm=True)` is the same input up to
the per-channel affine of `norm`, which that BatchNorm removes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from tinymim_jax import losses

POOLS = ("cls", "mean")
LN_EPS = 1e-6
METADATA_KEY = "tinymim_jax.feature"  # the spec (JSON) in the header of an exported .safetensors


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  block: int          # 0 = embeddings, 1..depth = output of that block
  pool: str = "mean"  # 'cls' | 'mean' (of the patch tokens)
  norm: bool = True   # parameter-free LayerNorm per token before pooling

  def __post_init__(self):
    if self.pool not in POOLS:
      raise ValueError(f"eval.feature.pool must be one of {POOLS}, got {self.pool!r}")
    if not isinstance(self.block, int) or self.block < 0:
      raise ValueError(f"eval.feature.block must be an int >= 0 (0 = embeddings), got {self.block!r}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def vit_of(model):
  """The ViT of a model: an MAE's encoder, or the model itself."""
  return getattr(model, "encoder", model)


def resolve(overrides: Mapping | None, *, depth: int, recorded: Mapping | None = None,
            default_block: int | None = None) -> FeatureSpec:
  """The spec an eval uses: each field from `overrides` (config.eval.feature; None = not set), else from
  `recorded` (the spec a workdir recorded), else the default: block `default_block` (the objective that trained
  the model decides it, objectives.default_feature_block; None = the last block, `depth`), mean pooling, norm.

  Raises ValueError when the block is not in 0..depth.
  """
  overrides, recorded = dict(overrides or {}), dict(recorded or {})
  default = {"block": depth if default_block is None else default_block, "pool": "mean", "norm": True}
  fields = {}
  for k in default:
    v = overrides.get(k)
    fields[k] = v if v is not None else recorded.get(k, default[k])
  spec = FeatureSpec(block=int(fields["block"]), pool=str(fields["pool"]), norm=bool(fields["norm"]))
  if spec.block > depth:
    raise ValueError(f"eval.feature.block={spec.block}, but the model has blocks 1..{depth} (0 = embeddings)")
  return spec


def pool(hidden, spec: FeatureSpec, num_prefix_tokens: int = 1):
  """(B, N, D) hidden states -> (B, D) float32 features as `spec` says (LayerNorm, then pooling).

  The first `num_prefix_tokens` tokens are CLS (then any registers); 'mean' averages the patch tokens after them.
  """
  h = _normed(hidden, spec)
  return h[:, 0] if spec.pool == "cls" else h[:, num_prefix_tokens:].mean(axis=1)  # 'mean': the patch tokens


def _normed(hidden, spec: FeatureSpec):
  """(B, N, D) hidden states in float32, through the parameter-free LayerNorm per token when spec.norm."""
  h = hidden.astype(jnp.float32)
  return losses.layer_norm(h, LN_EPS) if spec.norm else h


def patch_tokens(vit, images, spec: FeatureSpec):
  """(B, H, W, 3) images -> (B, H / p, W / p, D) float32 patch tokens of a ViT in eval mode: the hidden state
  after block spec.block (0: the embeddings), put through the parameter-free LayerNorm when spec.norm, prefix
  tokens (CLS, registers) dropped, in row-major grid order. spec.pool plays no part. What the dense
  frozen-feature evals read (segprobe.py); the forward stops at the spec's block."""
  if spec.block == 0:
    hidden = vit.embed(images)
  else:
    hidden = vit(images, capture=(spec.block,), depth=spec.block)["blocks"][spec.block]["hidden"]
  h = _normed(hidden, spec)[:, vit.num_prefix_tokens:]
  return h.reshape(h.shape[0], vit.grid, vit.grid, h.shape[-1])


def extract(vit, images, spec: FeatureSpec, *, logits: bool = False) -> dict[str, Any]:
  """{'feature': (B, D) float32} of a ViT in eval mode, plus {'logits': (B, C) float32} when `logits` and the
  ViT has a head. Without logits the forward stops at the spec's block.
  """
  want_logits = logits and vit.config.num_classes > 0
  res = {}
  if spec.block == 0:
    hidden = vit.embed(images)
    if want_logits:
      res["logits"] = vit(images)["logits"]
  else:
    out = vit(images, capture=(spec.block,), depth=None if want_logits else spec.block)
    hidden = out["blocks"][spec.block]["hidden"]
    if want_logits:
      res["logits"] = out["logits"]
  res["feature"] = pool(hidden, spec, vit.num_prefix_tokens)
  if "logits" in res:
    res["logits"] = res["logits"].astype(jnp.float32)
  return res
