"""ViT in Flax NNX, numerically equivalent to MAE's / timm's VisionTransformer.

One model serves as MAE encoder, TinyMIM teacher, TinyMIM student and fine-tuned classifier. The forward
returns a dict of named intermediates so that a loss can read the q/k/v of any block without hooks:

  out = model(images)                       # images: (B, H, W, 3) float, NHWC
  out['tokens']   (B, N, D)  final tokens (timm forward_features: after `norm`; raw for the 'avg' layout)
  out['cls']      (B, D)     CLS token of out['tokens']
  out['pooled']   (B, D)     pre-logits feature (timm forward_head(pre_logits=True))
  out['logits']   (B, C)     only when num_classes > 0: the prediction (with a distillation token, the mean of
                              the two heads, as timm's VisionTransformerDistilled in eval mode)
  out['logits_cls'], out['logits_dist']  (B, C)  with a distillation token and a head: the class head's and the
                              distillation head's logits (what that model returns in distilled training)
  out['blocks'][i] = {'hidden': (B, N, D) output of block i, 'q'|'k'|'v': (B, H_i, N, dh_i)}
                              for each 1-based i in `capture`

Dense features (segmentation): `model.feature_maps(images, blocks)` -> the patch tokens of the chosen blocks as
(B, grid, grid, D) maps, read from out['blocks'][i]['hidden'].

N = num_prefix_tokens + grid^2: the prefix is CLS, then the distillation token (DeiT, `dist_token`), then
`reg_tokens` registers (DINOv2 with registers; DINOv3's storage tokens), then the patch tokens. q/k/v and the
hidden states hold every token. With `conv1x1_dim` (TinyMIM*-T), 'tokens' are the extra layer's
(B, N, conv1x1_dim) outputs and the final norm, pooling and heads have that width.

`depth=k` runs only blocks 1..k (a teacher never computes past its target block); then 'tokens' is the
raw output of block k and no norm/pooling/head is computed. `qkv_only=True` additionally stops block k right
after its qkv projection: the relation targets need nothing else of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinymim_jax.models.positions import (REL_POS_EXTRA_ROWS, dinov3_rope, relative_position_index,
                                          sincos_pos_embed)
from tinymim_jax.models.variants import VARIANTS


class Constant(nnx.Variable):
  """An array that is part of the model state but is never trained (e.g. the fixed sin-cos table)."""


# --------------------------------------------------------------------------------------------------------
# Initialisers (MAE style).
# --------------------------------------------------------------------------------------------------------
def drawn_in_float32(init):
  """`init` drawn in float32, then cast to the parameter dtype: a model's initial values do not depend on its
  param_dtype (a float64 model starts from the float32 model's values, as the reference's `.double()`)."""

  def init_fn(key, shape, dtype=jnp.float32):
    return init(key, shape, jnp.float32).astype(dtype)

  return init_fn


xavier_uniform = drawn_in_float32(jax.nn.initializers.xavier_uniform())
token_init = drawn_in_float32(jax.nn.initializers.normal(0.02))  # cls_token, mask_token: N(0, 0.02)


def patch_kernel_init(key, shape, dtype=jnp.float32):
  """xavier_uniform on the (D, 3*p*p) view of the conv weight, as MAE does, laid out (p, p, 3, D)."""
  p1, p2, c, d = shape
  return xavier_uniform(key, (p1 * p2 * c, d), dtype).reshape(shape)


# --------------------------------------------------------------------------------------------------------
# Layers.
# --------------------------------------------------------------------------------------------------------
def wide_dtype(dtype):
  """The wider of float32 and `dtype`: where softmax / normalisation statistics are computed (float32 for
  bfloat16 / float16 / float32 compute, float64 for float64)."""
  return jnp.promote_types(dtype, jnp.float32)


def apply_rope(x, sin, cos, num_prefix_tokens: int):
  """x (B, H, N, dh) with the rotation on tokens num_prefix_tokens.. (the patches; CLS and storage tokens keep
  theirs): x cos + rotate_half(x) sin, rotate_half([a | b]) = [-b | a] (timm apply_rot_embed_cat(half=True)),
  in the wider of float32 and x's dtype, returned in x's dtype."""
  wide = wide_dtype(x.dtype)
  p = x[:, :, num_prefix_tokens:].astype(wide)
  a, b = jnp.split(p, 2, axis=-1)
  p = p * jnp.asarray(cos, wide) + jnp.concatenate([-b, a], -1) * jnp.asarray(sin, wide)
  return jnp.concatenate([x[:, :, :num_prefix_tokens], p.astype(x.dtype)], axis=2)


def drop_path(x, rate: float, rng):
  """Stochastic depth per sample (timm DropPath); identity when rate == 0 or rng is None."""
  if rate == 0.0 or rng is None:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def linear(layer: nnx.Linear, x):
  """layer(x) on a 2-D (tokens, features) view of x: the same function, whose backward XLA:CPU compiles to
  faster code than the 3-D contraction's (the student's forward + backward: -5%, benchmarks/distill_step.py)."""
  y = layer(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], y.shape[-1])


class Attention(nnx.Module):

  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs, impl: str = "default",
               param_dtype=jnp.float32, qkv_bias: bool = True, rel_pos_grid: int = 0, rel_pos_prefix: int = 1):
    if dim % num_heads:
      raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.impl = impl
    # BEiT's per-block relative position bias over a rel_pos_grid^2 patch grid + CLS (+ the distillation token:
    # rel_pos_prefix 2, TinyMIM*-T); zero init (the authors' segmentation backbones). Off (None) when rel_pos_grid
    # is 0.
    self.rel_pos_grid, self.rel_pos_prefix = rel_pos_grid, rel_pos_prefix
    if rel_pos_grid:
      self.relative_position_bias_table = nnx.Param(
          jnp.zeros(((2 * rel_pos_grid - 1) ** 2 + REL_POS_EXTRA_ROWS[rel_pos_prefix], num_heads), param_dtype))
    else:
      self.relative_position_bias_table = None
    self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, param_dtype=param_dtype, kernel_init=xavier_uniform,
                          use_bias=qkv_bias, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, kernel_init=xavier_uniform, rngs=rngs)

  def split_qkv(self, x, rope=None, num_prefix_tokens: int = 0):
    """x (B, N, D) -> q, k, v each (B, H, N, dh): qkv outputs are [q | k | v], head h owns [h*dh, (h+1)*dh).
    rope: (grid, temperature) of DINOv3's rotary embedding (dinov3_rope), applied to q and k of the patch tokens
    (what the attention uses, so the relation maps read them rotated)."""
    b, n, d = x.shape
    qkv = linear(self.qkv, x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = jnp.moveaxis(qkv, (2, 3), (0, 2))
    if rope is not None:
      sin, cos = dinov3_rope(rope[0], d // self.num_heads, rope[1])
      q, k = apply_rope(q, sin, cos, num_prefix_tokens), apply_rope(k, sin, cos, num_prefix_tokens)
    return q, k, v

  def position_bias(self):
    """(1, H, N, N) float32 (param dtype) bias added to the attention logits, or None without one."""
    if self.relative_position_bias_table is None:
      return None
    index = relative_position_index(self.rel_pos_grid, self.rel_pos_prefix)
    bias = self.relative_position_bias_table[...][index.reshape(-1)]
    return jnp.transpose(bias.reshape(index.shape + (self.num_heads,)), (2, 0, 1))[None]

  def attend(self, q, k, v):
    b, h, n, dh = q.shape
    bias = self.position_bias()
    if bias is not None and bias.shape[-1] != n:
      raise ValueError(f"the relative position bias covers {bias.shape[-1]} tokens ({self.rel_pos_prefix} prefix + "
                       f"{self.rel_pos_grid}^2 patches), the attention got {n}: it needs every patch token")
    if self.impl != "default":  # a fused kernel (cuDNN flash attention on GPUs) or jax's reference form
      # cuDNN's training kernels want an even length (ViTs have 1 + grid^2 tokens): pad to a multiple of 8
      # and mask the padded keys out through the sequence lengths; padded query rows are dropped.
      pad = (-n) % 8
      q, k, v = (jnp.pad(jnp.swapaxes(t, 1, 2), ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
      lengths = jnp.full((b,), n, jnp.int32)
      if bias is not None:
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad), (0, pad))).astype(q.dtype)
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, query_seq_lengths=lengths,
                                         key_value_seq_lengths=lengths, implementation=self.impl)[:, :n]
      return linear(self.proj, out.reshape(b, n, h * dh))
    logits = jnp.einsum("bhnd,bhmd->bhnm", q * jnp.asarray(dh**-0.5, q.dtype), k)  # see losses.relation_logits
    # softmax(logits) @ v with the softmax in float32 (float64 when computing in float64) and its
    # normalisation applied to the (N, dh) output instead of the (N, N) probabilities: the same function
    # (rounding aside), one pass over the N x N matrix less (benchmarks/distill_step.py: ~5-10% off a block's
    # forward + backward on CPU).
    logits = logits.astype(wide_dtype(logits.dtype))
    if bias is not None:
      logits = logits + bias.astype(logits.dtype)
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    denom = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("bhnm,bhmd->bhnd", e.astype(v.dtype), v) / denom.astype(v.dtype)
    return linear(self.proj, jnp.swapaxes(out, 1, 2).reshape(b, n, h * dh))


_SQRT_HALF = np.sqrt(0.5)  # float64; rounded to the compute dtype where it is used


def gelu(h):
  """Exact erf GELU written as torch computes it, 0.5 h (1 + erf(h / sqrt 2)). (jax.nn.gelu's exact form goes
  through erfc, which XLA's CPU backend evaluates ~2.5x slower.)"""
  return 0.5 * h * (1 + jax.lax.erf(h * _SQRT_HALF.astype(h.dtype)))


class Mlp(nnx.Module):

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs, param_dtype=jnp.float32, act: str = "gelu"):
    if act not in ("gelu", "quick_gelu"):
      raise ValueError(f"act_layer must be 'gelu' or 'quick_gelu', got {act!r}")
    self.act = act
    self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, kernel_init=xavier_uniform, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, kernel_init=xavier_uniform, rngs=rngs)

  def __call__(self, x):
    h = linear(self.fc1, x)
    if self.act == "quick_gelu":  # OpenAI CLIP's x * sigmoid(1.702 x) (timm layers.quick_gelu)
      return linear(self.fc2, h * jax.nn.sigmoid(jnp.asarray(1.702, h.dtype) * h))
    return linear(self.fc2, gelu(h))


class SwiGLU(nnx.Module):
  """fc2(silu(fc1_g(x)) * fc1_x(x)) (timm layers.SwiGLU; DINOv3 ViT-S+ / H+ SwiGLUFFN, w1 / w2 / w3)."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs, param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=xavier_uniform, rngs=rngs)
    self.fc1_g = nnx.Linear(dim, hidden, **kw)
    self.fc1_x = nnx.Linear(dim, hidden, **kw)
    self.fc2 = nnx.Linear(hidden, dim, **kw)

  def __call__(self, x):
    return linear(self.fc2, jax.nn.silu(linear(self.fc1_g, x)) * linear(self.fc1_x, x))


def layer_norm(dim, dtype, rngs, param_dtype=jnp.float32, eps: float = 1e-6):
  # Flax computes the statistics in the wider of float32 and the input dtype.
  return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class LayerScale(nnx.Module):
  """x * gamma, gamma (D,) initialised to `init_values` (timm layers.LayerScale; CaiT / DINOv2)."""

  def __init__(self, dim: int, init_values: float, *, param_dtype=jnp.float32):
    self.gamma = nnx.Param(jnp.full((dim,), init_values, param_dtype))

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


class Conv1x1(nnx.Module):
  """TinyMIM*-T's extra layer on the last block's tokens: LayerNorm(D) -> Linear(D, width) -> GELU (exact).

  (B, N, D) -> (B, N, width). The authors' `conv1x1 = nn.Sequential(nn.LayerNorm(192), nn.Linear(192, 1280),
  nn.GELU())` (Segmentation/TinyMIMstar-T/backbone/mae.py); its LayerNorm has torch's default eps 1e-5 (the
  segmentation log prints `LayerNorm((192,), eps=1e-05)`), unlike the blocks' 1e-6. Named `norm` / `fc` here,
  `conv1x1.0` / `conv1x1.1` in PyTorch files (tinymim_jax/convert).
  """

  EPS = 1e-5

  def __init__(self, dim: int, width: int, *, dtype, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.norm = layer_norm(dim, dtype, rngs, param_dtype, self.EPS)
    self.fc = nnx.Linear(dim, width, dtype=dtype, param_dtype=param_dtype, kernel_init=xavier_uniform, rngs=rngs)

  def __call__(self, x):
    return gelu(linear(self.fc, self.norm(x)))


class Block(nnx.Module):
  """Pre-norm transformer block: x + DropPath(Attn(LN1(x))), then x + DropPath(MLP(LN2(x)))."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, *, dtype, rngs,
               attention: str = "default", param_dtype=jnp.float32, init_values: float = 0.0, act: str = "gelu",
               norm_eps: float = 1e-6, qkv_bias: bool = True, mlp_type: str = "mlp", num_prefix_tokens: int = 1,
               rel_pos_grid: int = 0):
    self.drop_path = drop_path
    self.num_prefix_tokens = num_prefix_tokens
    self.norm1 = layer_norm(dim, dtype, rngs, param_dtype, norm_eps)
    self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs, impl=attention, param_dtype=param_dtype,
                          qkv_bias=qkv_bias, rel_pos_grid=rel_pos_grid, rel_pos_prefix=num_prefix_tokens)
    self.norm2 = layer_norm(dim, dtype, rngs, param_dtype, norm_eps)
    if mlp_type == "swiglu":
      self.mlp = SwiGLU(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs, param_dtype=param_dtype)
    elif mlp_type == "mlp":
      self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs, param_dtype=param_dtype, act=act)
    else:
      raise ValueError(f"mlp_type must be 'mlp' or 'swiglu', got {mlp_type!r}")
    if init_values:  # timm: LayerScale only when init_values is set (truthy)
      self.ls1 = LayerScale(dim, init_values, param_dtype=param_dtype)
      self.ls2 = LayerScale(dim, init_values, param_dtype=param_dtype)
    else:
      self.ls1 = self.ls2 = None

  def __call__(self, x, *, rng=None, qkv_only: bool = False, rope=None):
    """Returns (x_out, (q, k, v)); with qkv_only, x_out is None and nothing past the qkv Linear runs."""
    q, k, v = self.attn.split_qkv(self.norm1(x), rope, self.num_prefix_tokens)
    if qkv_only:
      return None, (q, k, v)
    r1, r2 = jax.random.split(rng) if rng is not None else (None, None)
    a, m = self.attn.attend(q, k, v), None
    a = a if self.ls1 is None else self.ls1(a)
    x = x + drop_path(a, self.drop_path, r1)
    m = self.mlp(self.norm2(x))
    m = m if self.ls2 is None else self.ls2(m)
    x = x + drop_path(m, self.drop_path, r2)
    return x, (q, k, v)


# --------------------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ViTConfig:
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  # Drop path: a constant rate for every block, or a linear ramp 0 -> rate over depth (timm's default).
  drop_path: float = 0.0
  drop_path_mode: str = "linear"  # 'linear' | 'constant'
  # Per-block overrides, 1-based block index -> value (e.g. a relation block with another head count,
  # or a relation block without drop path).
  head_overrides: Mapping[int, int] = dataclasses.field(default_factory=dict)
  drop_path_overrides: Mapping[int, float] = dataclasses.field(default_factory=dict)
  # 'cls': final `norm`, pooled = CLS (MAE pretrain / TinyMIM layout). 'avg': no `norm`, pooled = mean of
  # patch tokens -> `fc_norm` (MAE fine-tuning / timm global_pool='avg' layout).
  pooling: str = "cls"
  num_classes: int = 0
  # 'sincos': fixed table (a Constant, never trained). 'learn': a Param initialised to the same table.
  pos_embed: str = "sincos"
  dtype: Any = jnp.float32  # compute dtype
  # dtype of the parameters and fixed tables (Flax's name). float64 with dtype float64 runs the whole model
  # in float64 (exactness tests: tests/test_reference_float64.py); the sin-cos tables keep their float32 rounding.
  param_dtype: Any = jnp.float32
  # softmax(q k^T) v of the blocks: 'default' (written out here; softmax in the wider of float32 and dtype),
  # or an implementation of jax.nn.dot_product_attention: 'cudnn' (fused flash attention; GPUs,
  # bfloat16/float16 compute) or 'xla'.
  # q, k, v (what the relation losses read) are the same either way.
  attention: str = "default"
  # Parts of other ViT families, named as timm's VisionTransformer arguments (DINOv2 / CLIP towers:
  # models/variants.py). init_values: LayerScale after attention and MLP (blocks.i.ls1 / ls2 gamma), off when 0.
  init_values: float = 0.0
  # reg_tokens: register tokens (Darcet et al. 2024; DINOv3's storage tokens) after CLS and the distillation
  # token; the prefix is CLS + dist + registers (num_prefix_tokens). no_embed_class:
  # the positional table has rows for the patches only (the prefix gets none), else one per token, prefix first.
  reg_tokens: int = 0
  no_embed_class: bool = False
  # dist_token: DeiT's distillation token (Touvron et al. 2021; timm VisionTransformerDistilled) right after CLS,
  # with its own positional row, and with num_classes > 0 a second head `head_dist` reading it; 'logits' is then
  # the mean of both heads (docs/method.md section 11).
  dist_token: bool = False
  # conv1x1_dim > 0: TinyMIM*-T's extra layer (Conv1x1: LayerNorm -> Linear(D, conv1x1_dim) -> GELU, the
  # authors' `conv1x1`, 1280 wide) on the last block's tokens, before the final norm / pooling / heads.
  conv1x1_dim: int = 0
  # pre_norm: a LayerNorm `norm_pre` on the tokens before the blocks, and no patch-embedding bias (CLIP).
  pre_norm: bool = False
  act_layer: str = "gelu"           # MLP activation: 'gelu' (exact, erf) | 'quick_gelu' (OpenAI CLIP)
  norm_eps: float = 1e-6            # epsilon of every LayerNorm (MAE / DINOv2 1e-6, CLIP 1e-5)
  # DINOv3 (timm's Eva with rope_type='dinov3'): rope 'dinov3' rotates the patch tokens' q / k (dinov3_rope;
  # with pos_embed 'none': no table), qkv_bias False drops the qkv bias, mlp_type 'swiglu' (ViT-S+ / H+).
  rope: str = "none"
  rope_temperature: float = 100.0
  qkv_bias: bool = True
  mlp_type: str = "mlp"
  # BEiT's per-block relative position bias (blocks.i.attn.relative_position_bias_table, zero init), as the
  # authors' segmentation backbones have it (docs/method.md section 10.1; their `use_rel_pos_bias`). Needs CLS, or
  # CLS + the distillation token (TinyMIM*-T), as prefix, no registers, and every patch token (no keep_ids).
  use_rel_pos_bias: bool = False

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens: CLS, the distillation token, the registers (timm's num_prefix_tokens)."""
    return 1 + int(self.dist_token) + self.reg_tokens

  @property
  def num_features(self) -> int:
    """Width of 'tokens' / 'pooled' and of the heads' input: conv1x1_dim when set, else embed_dim."""
    return self.conv1x1_dim or self.embed_dim

  def block_heads(self, i: int) -> int:
    return int(self.head_overrides.get(i, self.num_heads))

  def block_drop_path(self, i: int) -> float:
    if i in self.drop_path_overrides:
      return float(self.drop_path_overrides[i])
    if self.drop_path_mode == "constant":
      return float(self.drop_path)
    if self.drop_path_mode == "linear":
      return float(self.drop_path * (i - 1) / max(self.depth - 1, 1))
    raise ValueError(f"drop_path_mode must be 'linear' or 'constant', got {self.drop_path_mode!r}")


class ViT(nnx.Module):

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    if c.img_size % c.patch_size:
      raise ValueError(f"img_size {c.img_size} is not a multiple of patch_size {c.patch_size}")
    if c.pooling not in ("cls", "avg"):
      raise ValueError(f"pooling must be 'cls' or 'avg', got {c.pooling!r}")
    if c.attention not in ("default", "xla", "cudnn"):
      raise ValueError(f"attention must be 'default', 'xla' or 'cudnn', got {c.attention!r}")
    for name in ("dtype", "param_dtype"):
      if jnp.dtype(getattr(c, name)) != jax.dtypes.canonicalize_dtype(getattr(c, name)):  # jax would truncate
        raise ValueError(f"model {name}={jnp.dtype(getattr(c, name))} needs jax's 64-bit mode: set JAX_ENABLE_X64=1 "
                         f"(or jax.config.update('jax_enable_x64', True)) before building the model")
    if c.attention == "cudnn" and jnp.dtype(c.dtype) not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention='cudnn' needs a bfloat16 or float16 compute dtype, got {jnp.dtype(c.dtype)}")
    for i in list(c.head_overrides) + list(c.drop_path_overrides):
      if not 1 <= i <= c.depth:
        raise ValueError(f"per-block override names block {i}, but the model has blocks 1..{c.depth}")
    if c.use_rel_pos_bias and c.reg_tokens:
      raise ValueError(f"use_rel_pos_bias covers CLS and the distillation token as prefix, not registers: got "
                       f"reg_tokens={c.reg_tokens}")
    d, p = c.embed_dim, c.patch_size
    self.grid = c.img_size // p
    pdt = c.param_dtype
    self.patch_embed = nnx.Conv(3, d, (p, p), strides=(p, p), padding="VALID", dtype=c.dtype, param_dtype=pdt,
                                kernel_init=patch_kernel_init, use_bias=not c.pre_norm, rngs=rngs)
    self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, d), pdt))
    if c.reg_tokens < 0:
      raise ValueError(f"reg_tokens must be >= 0, got {c.reg_tokens}")
    self.reg_token = nnx.Param(token_init(rngs.params(), (1, c.reg_tokens, d), pdt)) if c.reg_tokens else None
    # timm: trunc_normal_(dist_token, std=.02), the same draw as cls_token's
    self.dist_token = nnx.Param(token_init(rngs.params(), (1, 1, d), pdt)) if c.dist_token else None
    # Positional rows for the prefix tokens (all zeros in the sin-cos table) unless no_embed_class.
    table = sincos_pos_embed(d, self.grid, cls_token=False)
    pos_prefix = 0 if c.no_embed_class else c.num_prefix_tokens
    table = jnp.asarray(np.concatenate([np.zeros((1, pos_prefix, d), np.float32), table], axis=1), pdt)
    if c.rope not in ("none", "dinov3"):
      raise ValueError(f"rope must be 'none' or 'dinov3', got {c.rope!r}")
    if (c.rope != "none") != (c.pos_embed == "none"):
      raise ValueError(f"pos_embed='none' goes with a rotary embedding and only with one (rope={c.rope!r}, "
                       f"pos_embed={c.pos_embed!r})")
    if c.pos_embed == "sincos":
      self.pos_embed = Constant(table)
    elif c.pos_embed == "learn":
      self.pos_embed = nnx.Param(table)
    elif c.pos_embed == "none":
      self.pos_embed = None
    else:
      raise ValueError(f"pos_embed must be 'sincos', 'learn' or 'none', got {c.pos_embed!r}")
    self.blocks = nnx.List([
        Block(d, c.block_heads(i), c.mlp_ratio, c.block_drop_path(i), dtype=c.dtype, rngs=rngs,
              attention=c.attention, param_dtype=pdt, init_values=c.init_values, act=c.act_layer,
              norm_eps=c.norm_eps, qkv_bias=c.qkv_bias, mlp_type=c.mlp_type, num_prefix_tokens=c.num_prefix_tokens,
              rel_pos_grid=self.grid if c.use_rel_pos_bias else 0)
        for i in range(1, c.depth + 1)])
    self.norm_pre = layer_norm(d, c.dtype, rngs, pdt, c.norm_eps) if c.pre_norm else None
    if c.conv1x1_dim < 0:
      raise ValueError(f"conv1x1_dim must be >= 0 (0 = no TinyMIM*-T extra layer), got {c.conv1x1_dim}")
    self.conv1x1 = (Conv1x1(d, c.conv1x1_dim, dtype=c.dtype, param_dtype=pdt, rngs=rngs) if c.conv1x1_dim
                    else None)
    f = c.num_features
    if c.pooling == "cls":
      self.norm = layer_norm(f, c.dtype, rngs, pdt, c.norm_eps)
    else:
      self.fc_norm = layer_norm(f, c.dtype, rngs, pdt, c.norm_eps)
    if c.num_classes:
      # MAE: trunc_normal_(std=2e-5) with bounds +-2 (absolute): in effect a plain normal(0, 2e-5). head_dist
      # gets the same init (fine-tuning starts both classifiers near zero).
      head_init = drawn_in_float32(jax.nn.initializers.normal(2e-5))
      self.head = nnx.Linear(f, c.num_classes, dtype=c.dtype, param_dtype=pdt, kernel_init=head_init, rngs=rngs)
    self.head_dist = nnx.Linear(f, c.num_classes, dtype=c.dtype, param_dtype=pdt, kernel_init=head_init,
                                rngs=rngs) if c.num_classes and c.dist_token else None

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens in every (B, N, .) output: CLS, the distillation token, the registers."""
    return self.config.num_prefix_tokens

  def embed(self, images, keep_ids=None):
    """Patch tokens + positions, optionally only those in keep_ids (B, L_keep), then the prefix (CLS, the
    distillation token, registers) in front, then `norm_pre` if the model has one (timm
    VisionTransformer._pos_embed, patch_drop, norm_pre)."""
    c = self.config
    if images.ndim != 4 or images.shape[1:] != (c.img_size, c.img_size, 3):
      raise ValueError(f"expected NHWC images (B, {c.img_size}, {c.img_size}, 3), got {images.shape}")
    pos = self.pos_embed[...] if self.pos_embed is not None else jnp.zeros((1, self.grid * self.grid, 1), c.dtype)
    n_pos_prefix = pos.shape[1] - self.grid * self.grid  # 0 (no_embed_class) or num_prefix_tokens
    x = self.patch_embed(images.astype(c.dtype))
    x = x.reshape(x.shape[0], -1, x.shape[-1]) + pos[:, n_pos_prefix:].astype(c.dtype)
    if keep_ids is not None:
      x = jnp.take_along_axis(x, keep_ids[..., None], axis=1)
    prefix = self.cls_token[...]
    if self.dist_token is not None:
      prefix = jnp.concatenate([prefix, self.dist_token[...]], axis=1)
    if self.reg_token is not None:
      prefix = jnp.concatenate([prefix, self.reg_token[...]], axis=1)
    if n_pos_prefix:
      prefix = prefix + pos[:, :n_pos_prefix]
    prefix = prefix.astype(c.dtype)
    x = jnp.concatenate([jnp.broadcast_to(prefix, (x.shape[0],) + prefix.shape[1:]), x], axis=1)
    return x if self.norm_pre is None else self.norm_pre(x)

  def __call__(self, images, *, rng=None, depth: int | None = None, capture: Sequence[int] = (),
               qkv_only: bool = False, keep_ids=None) -> dict[str, Any]:
    """See the module docstring. `rng` enables drop path (training); None means eval mode."""
    c = self.config
    depth = c.depth if depth is None else int(depth)
    if not 1 <= depth <= c.depth:
      raise ValueError(f"depth must be in 1..{c.depth}, got {depth}")
    capture = sorted(set(int(i) for i in capture) | ({depth} if qkv_only else set()))
    if capture and not (1 <= capture[0] and capture[-1] <= depth):
      raise ValueError(f"capture={capture} must name blocks in 1..{depth}")
    x = self.embed(images, keep_ids)
    rope = None
    if c.rope == "dinov3":
      if keep_ids is not None:
        raise ValueError("a masked input (keep_ids) with a rotary embedding is not supported")
      rope = (self.grid, c.rope_temperature)  # each block's table follows its own head dim
    out: dict[str, Any] = {"blocks": {}}
    rngs = jax.random.split(rng, depth) if rng is not None else [None] * depth
    for i in range(1, depth + 1):
      last_qkv_only = qkv_only and i == depth
      y, (q, k, v) = self.blocks[i - 1](x, rng=rngs[i - 1], qkv_only=last_qkv_only, rope=rope)
      if i in capture:
        out["blocks"][i] = {"q": q, "k": k, "v": v}
        if y is not None:
          out["blocks"][i]["hidden"] = y
      if last_qkv_only:
        return out
      x = y
    if depth < c.depth:
      out["tokens"] = x
      return out
    if self.conv1x1 is not None:
      x = self.conv1x1(x)
    if c.pooling == "cls":
      x = self.norm(x)
      pooled = x[:, 0]
    else:
      pooled = self.fc_norm(x[:, self.num_prefix_tokens:].mean(axis=1))  # patch tokens: all but the prefix
    out.update(tokens=x, cls=x[:, 0])
    if not c.dist_token:
      out["pooled"] = pooled
      if c.num_classes:
        out["logits"] = self.head(pooled)
      return out
    # The distillation token, through the same norm as the class read-out (docs/method.md section 11.1).
    dist = x[:, 1] if c.pooling == "cls" else self.fc_norm(x[:, 1])
    # timm VisionTransformerDistilled.forward_head: pre_logits = the mean of the two read-outs; eval-mode logits
    # the mean of the two heads' (distilled training uses both heads' logits apart).
    out["pooled"] = (pooled + dist) / 2
    if c.num_classes:
      out["logits_cls"], out["logits_dist"] = self.head(pooled), self.head_dist(dist)
      out["logits"] = (out["logits_cls"] + out["logits_dist"]) / 2
    return out

  def feature_maps(self, images, blocks: Sequence[int], *, rng=None) -> list[Any]:
    """Patch tokens of the 1-based `blocks` as (B, grid, grid, D) maps in the compute dtype, in `blocks` order.

    The output of block i (before any final norm), prefix tokens dropped, tokens back in row-major grid order
    (BEiT / the authors' segmentation backbone `out_indices` are the 0-based i - 1). Runs blocks
    1..max(blocks) only. `rng` enables drop path. Raises ValueError for a block outside 1..depth.
    """
    blocks = [int(i) for i in blocks]
    if not blocks or min(blocks) < 1 or max(blocks) > self.config.depth:
      raise ValueError(f"feature_maps blocks={blocks} must name blocks in 1..{self.config.depth}")
    out = self(images, rng=rng, depth=max(blocks), capture=blocks)
    maps = []
    for i in blocks:
      x = out["blocks"][i]["hidden"][:, self.num_prefix_tokens:]
      maps.append(x.reshape(x.shape[0], self.grid, self.grid, x.shape[-1]))
    return maps


# --------------------------------------------------------------------------------------------------------
# Variants (MAE / timm sizes: tinymim_jax/models/variants.py).
# --------------------------------------------------------------------------------------------------------
def _int_keys(mapping) -> dict[int, Any]:
  return {int(k): v for k, v in dict(mapping or {}).items()}


def vit_config(name: str, **overrides) -> ViTConfig:
  """The named variant's ViTConfig with any field overridden (unknown fields are an error)."""
  if name not in VARIANTS:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(ViTConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown model field(s) {unknown} for {name!r}; known: {sorted(fields)}")
  kw = {**VARIANTS[name], **overrides}
  kw["head_overrides"] = _int_keys(kw.get("head_overrides"))
  kw["drop_path_overrides"] = _int_keys(kw.get("drop_path_overrides"))
  for name in ("dtype", "param_dtype"):
    if isinstance(kw.get(name), str):
      kw[name] = jnp.dtype(kw[name])
  return ViTConfig(**kw)
