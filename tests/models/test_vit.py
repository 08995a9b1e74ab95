"""ViT parity with timm's VisionTransformer (the reference MAE / TinyMIM build on), on CPU in float32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tests.helpers.torch_ref import timm_vit
from tinymim_jax import convert, create_model
from tinymim_jax.models import vit as vit_lib

SHAPES = {
    "vit_tiny_patch16": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "custom": dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4),
}
PARAM_VARIANTS = {
    "vit_tiny_patch16": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}






def ours(shape, **overrides):
  """Our model of this shape, abstract: the tests load every parameter from timm, so skip the init."""
  return nnx.eval_shape(lambda: create_model("vit_tiny_patch16", **shape, **overrides))


@functools.partial(nnx.jit, static_argnames=("depth", "capture", "qkv_only"))
def forward(model, x, depth=None, capture=(), qkv_only=False):
  return model(x, depth=depth, capture=capture, qkv_only=qkv_only)


def images(shape, batch=2, seed=0):
  s = shape["img_size"]
  return np.random.RandomState(seed).randn(batch, s, s, 3).astype(np.float32)


def to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def assert_close(ours_, ref, tol=1e-5):
  ours_, ref = np.asarray(ours_, np.float64), np.asarray(ref, np.float64)
  assert ours_.shape == ref.shape
  err = np.max(np.abs(ours_ - ref))
  assert err <= tol * max(1.0, np.max(np.abs(ref))), f"max abs err {err:.3g} (ref max {np.max(np.abs(ref)):.3g})"


# --------------------------------------------------------------------------------------------------------
# Forward parity.
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[(n, p) for n in SHAPES for p in ("cls", "avg")],
                ids=lambda np_: f"{np_[0]}-{np_[1]}")
def parity_case(request):
  name, pooling = request.param
  shape = SHAPES[name]
  # Pretrain layout without a head for the standard sizes; the custom shape carries a head in both.
  num_classes = 7 if name == "custom" else (0 if pooling == "cls" else 1000)
  tm = timm_vit(shape, pooling, num_classes)
  model = ours(shape, pooling=pooling, num_classes=num_classes)
  convert.load_pytorch_weights(model, tm.state_dict())
  x = images(shape)
  out = forward(model, x)
  with torch.no_grad():
    feats = tm.forward_features(to_torch(x))
    ref = dict(tokens=feats, pooled=tm.forward_head(feats, pre_logits=True))
    if num_classes:
      ref["logits"] = tm.forward_head(feats)
  return out, {k: v.numpy() for k, v in ref.items()}, pooling


def test_parity_tokens(parity_case):
  out, ref, _ = parity_case
  assert_close(out["tokens"], ref["tokens"])
  assert_close(out["cls"], ref["tokens"][:, 0])


def test_parity_pooled_and_logits(parity_case):
  out, ref, pooling = parity_case
  assert_close(out["pooled"], ref["pooled"])
  if pooling == "cls":
    assert_close(out["pooled"], ref["tokens"][:, 0])  # CLS pooling after the final norm
  assert ("logits" in out) == ("logits" in ref)
  if "logits" in ref:
    assert_close(out["logits"], ref["logits"])


# --------------------------------------------------------------------------------------------------------
# Inside the blocks: q / k / v, head overrides, depth truncation.
# --------------------------------------------------------------------------------------------------------
def timm_block_io(tm, x):
  """{1-based block index: (input, output)} of every timm block, via forward hooks."""
  io = {}
  hooks = [blk.register_forward_hook(functools.partial(lambda i, mod, inp, out: io.__setitem__(i, (inp[0], out)), i))
           for i, blk in enumerate(tm.blocks, start=1)]
  try:
    with torch.no_grad():
      tm.forward_features(to_torch(x))
  finally:
    for h in hooks:
      h.remove()
  return io


def timm_qkv(block, block_input, num_heads):
  """q, k, v (B, H, N, dh) from timm's fused qkv Linear, split into `num_heads` heads by hand."""
  with torch.no_grad():
    qkv = block.attn.qkv(block.norm1(block_input))
  b, n, three_d = qkv.shape
  d = three_d // 3
  q, k, v = qkv.reshape(b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
  return q.numpy(), k.numpy(), v.numpy()


@functools.lru_cache(maxsize=None)
def make_block_case(name):
  shape = SHAPES[name]
  tm = timm_vit(shape, "avg", 5, seed=1)
  x = images(shape, seed=1)
  return shape, tm, tm.state_dict(), x, timm_block_io(tm, x)


@pytest.fixture(scope="module", params=["custom", "vit_tiny_patch16"])
def block_case(request):
  return make_block_case(request.param)


@pytest.fixture(scope="module")
def custom_block_case():
  return make_block_case("custom")


def test_capture_qkv_and_hidden(block_case):
  shape, tm, sd, x, io = block_case
  model = ours(shape, pooling="avg", num_classes=5)
  convert.load_pytorch_weights(model, sd)
  depth = shape["depth"]
  out = forward(model, x, capture=tuple(range(1, depth + 1)))
  assert sorted(out["blocks"]) == list(range(1, depth + 1))
  for i in range(1, depth + 1):
    inp, hidden = io[i]
    q, k, v = timm_qkv(tm.blocks[i - 1], inp, shape["num_heads"])
    got = out["blocks"][i]
    for name, ref in zip("qkv", (q, k, v)):
      assert_close(got[name], ref)
    assert_close(got["hidden"], hidden.numpy())


def test_head_override_resplits_qkv(custom_block_case):
  shape, tm, sd, x, io = custom_block_case
  depth, heads = shape["depth"], shape["num_heads"]
  model = ours(shape, pooling="avg", num_classes=5, head_overrides={depth: 2 * heads})
  convert.load_pytorch_weights(model, sd)  # parameter shapes do not depend on the head split
  out = forward(model, x, capture=(depth - 1, depth))
  # Blocks before the relation block are unchanged.
  assert_close(out["blocks"][depth - 1]["hidden"], io[depth - 1][1].numpy())
  inp = io[depth][0]
  q, k, v = timm_qkv(tm.blocks[depth - 1], inp, 2 * heads)
  got = out["blocks"][depth]
  assert got["q"].shape == (x.shape[0], 2 * heads, inp.shape[1], shape["embed_dim"] // (2 * heads))
  for name, ref in zip("qkv", (q, k, v)):
    assert_close(got[name], ref)
  # The block's output with the other split, computed by hand from timm's layers.
  blk = tm.blocks[depth - 1]
  with torch.no_grad():
    qt, kt, vt = (torch.from_numpy(a) for a in (q, k, v))
    attn = torch.softmax(qt @ kt.transpose(-2, -1) * qt.shape[-1] ** -0.5, dim=-1)
    y = inp + blk.attn.proj((attn @ vt).transpose(1, 2).reshape(inp.shape))
    y = y + blk.mlp(blk.norm2(y))
  assert_close(got["hidden"], y.numpy())


def test_depth_truncation_and_qkv_only(custom_block_case):
  shape, tm, sd, x, io = custom_block_case
  model = ours(shape, pooling="avg", num_classes=5)
  convert.load_pytorch_weights(model, sd)
  for k in (1, shape["depth"] - 1):
    out = forward(model, x, depth=k)
    assert set(out) == {"blocks", "tokens"}  # no norm / pooling / head past a truncated depth
    assert_close(out["tokens"], io[k][1].numpy())
    only = forward(model, x, depth=k, qkv_only=True)
    assert "tokens" not in only and "hidden" not in only["blocks"][k]
    for name, ref in zip("qkv", timm_qkv(tm.blocks[k - 1], io[k][0], shape["num_heads"])):
      assert_close(only["blocks"][k][name], ref)


# --------------------------------------------------------------------------------------------------------
# Parameter counts, positional table, init, dtype.
# --------------------------------------------------------------------------------------------------------
def count_ours(name, **overrides):
  abstract = nnx.eval_shape(lambda: create_model(name, **overrides))
  # Every array of the state, the fixed sin-cos table included: timm counts its pos_embed Parameter too.
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))


def count_timm(shape, pooling, num_classes):
  pool = dict(global_pool="token", fc_norm=False) if pooling == "cls" else dict(global_pool="avg", fc_norm=True)
  with torch.device("meta"):  # shapes only: ViT-H would be 2.5 GB
    tm = VisionTransformer(**shape, mlp_ratio=4, qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
                           class_token=True, num_classes=num_classes, **pool)
  return sum(p.numel() for p in tm.parameters())


@pytest.mark.parametrize("name", list(PARAM_VARIANTS))
def test_parameter_counts(name):
  shape = PARAM_VARIANTS[name]
  assert count_ours(name) == count_timm(shape, "cls", 0)
  assert count_ours(name, pooling="avg", num_classes=1000) == count_timm(shape, "avg", 1000)


def mae_get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
  """facebookresearch/mae util/pos_embed.py, transcribed (np.float -> np.float64)."""

  def from_grid_1d(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
  emb = np.concatenate([from_grid_1d(embed_dim // 2, grid[0]), from_grid_1d(embed_dim // 2, grid[1])], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
  return emb


@pytest.mark.parametrize("dim,grid", [(64, 4), (192, 14), (768, 14), (1024, 16), (512, 14)])
def test_sincos_matches_mae(dim, grid):
  ref = mae_get_2d_sincos_pos_embed(dim, grid, cls_token=True).astype(np.float32)[None]  # MAE's .float()
  got = vit_lib.sincos_pos_embed(dim, grid)
  assert got.dtype == np.float32 and got.shape == (1, 1 + grid * grid, dim)
  np.testing.assert_array_equal(got, ref)


def test_init_statistics():
  model = create_model("vit_small_patch16", pooling="avg", num_classes=1000, seed=3)
  d, p = 384, 16
  params = convert.export_pytorch_weights(model)  # timm names, (out, in) layout
  qkv = params["blocks.0.attn.qkv.weight"]
  bound = np.sqrt(6.0 / (d + 3 * d))
  assert np.abs(qkv).max() <= bound and abs(qkv.std() / (bound / np.sqrt(3)) - 1) < 0.02
  fc1 = params["blocks.5.mlp.fc1.weight"]
  assert np.abs(fc1).max() <= np.sqrt(6.0 / (d + 4 * d))
  patch = params["patch_embed.proj.weight"]  # xavier on the (D, 3*p*p) view
  pbound = np.sqrt(6.0 / (3 * p * p + d))
  assert np.abs(patch).max() <= pbound and abs(patch.std() / (pbound / np.sqrt(3)) - 1) < 0.05
  assert abs(params["cls_token"].std() / 0.02 - 1) < 0.2
  head = params["head.weight"]  # std 2e-5 (a truncation at 2 std or none: MAE's is effectively none)
  assert np.abs(head).max() <= 6 * 2e-5 and 0.8 < head.std() / 2e-5 < 1.05
  for name, value in params.items():
    if name.endswith("bias"):
      assert not value.any(), name
    elif "norm" in name:
      np.testing.assert_array_equal(value, 1.0, err_msg=name)
  np.testing.assert_array_equal(params["pos_embed"], vit_lib.sincos_pos_embed(d, 14))
  # Different blocks get different draws.
  assert not np.array_equal(params["blocks.0.attn.qkv.weight"], params["blocks.1.attn.qkv.weight"])


def test_pos_embed_kinds():
  fixed = create_model("vit_tiny_patch16", img_size=32, patch_size=8, depth=1)
  learn = create_model("vit_tiny_patch16", img_size=32, patch_size=8, depth=1, pos_embed="learn")
  assert isinstance(fixed.pos_embed, vit_lib.Constant) and not isinstance(fixed.pos_embed, nnx.Param)
  assert isinstance(learn.pos_embed, nnx.Param)
  np.testing.assert_array_equal(np.asarray(learn.pos_embed[...]), np.asarray(fixed.pos_embed[...]))


def test_bfloat16_compute():
  shape = SHAPES["custom"]
  sd = timm_vit(shape, "avg", 7, seed=2).state_dict()
  f32 = ours(shape, pooling="avg", num_classes=7)
  bf16 = ours(shape, pooling="avg", num_classes=7, dtype="bfloat16")
  convert.load_pytorch_weights(f32, sd)
  convert.load_pytorch_weights(bf16, sd)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16)))  # params stay float32
  x = images(shape, seed=2)
  ref, low = forward(f32, x), forward(bf16, x)
  assert low["tokens"].dtype == jnp.bfloat16
  for key in ("tokens", "pooled", "logits"):
    assert_close(low[key], ref[key], tol=5e-2)


def test_fused_attention_option_matches_default():
  """attention='xla' runs the blocks through jax.nn.dot_product_attention (the layout code the 'cudnn' kernel
  uses too): same outputs and gradients as the default path, which the tests above pin to timm."""
  shape = SHAPES["custom"]
  sd = timm_vit(shape, "cls", 0, seed=3).state_dict()
  models = {}
  for impl in ("default", "xla"):
    models[impl] = ours(shape, attention=impl, drop_path=0.1)
    convert.load_pytorch_weights(models[impl], sd)
  x = images(shape, seed=3)

  @nnx.jit
  def loss_and_grad(model, x):
    def f(m):
      out = m(x, rng=jax.random.PRNGKey(0))
      return jnp.mean(out["tokens"] ** 2), out
    return nnx.value_and_grad(f, has_aux=True)(model)

  (l0, o0), g0 = loss_and_grad(models["default"], x)
  (l1, o1), g1 = loss_and_grad(models["xla"], x)
  assert_close(o1["tokens"], o0["tokens"])
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(g0)),
                          jax.tree.leaves(nnx.to_pure_dict(g1))):
    scale = float(jnp.max(jnp.abs(a))) + 1e-12
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * scale, path


def test_attention_option_errors():
  with pytest.raises(ValueError, match="attention must be"):
    create_model("vit_tiny_patch16", img_size=32, depth=1, attention="flash")
  with pytest.raises(ValueError, match="needs a bfloat16 or float16"):
    create_model("vit_tiny_patch16", img_size=32, depth=1, attention="cudnn")


def test_float64_params_and_compute():
  """param_dtype=float64: every array is float64 and holds the float32 model's initial values (drawn in float32);
  the forward stays float64. Exactness against the authors' float64 numbers: tests/test_reference_float64.py."""
  shape = SHAPES["custom"]
  kw = dict(shape, pooling="avg", num_classes=7, pos_embed="learn", seed=4)
  f32 = create_model("vit_tiny_patch16", **kw)
  x = images(shape, seed=4)
  ref = forward(f32, x)
  with jax.enable_x64(True):
    f64 = create_model("vit_tiny_patch16", **kw, dtype="float64", param_dtype="float64")
    assert create_model("vit_tiny_patch16", **kw).config.param_dtype == jnp.float32  # x64 alone changes nothing
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(create_model("vit_tiny_patch16", **kw))))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nnx.state(f32)), jax.tree.leaves(nnx.state(f64))):
      assert b.dtype == jnp.float64, path
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a, np.float64), err_msg=str(path))
    out = forward(f64, x.astype(np.float64), capture=(2,))
    dtypes = {out[k].dtype for k in ("tokens", "pooled", "logits")} | {out["blocks"][2]["q"].dtype}
    assert dtypes == {np.dtype("float64")}
    for key in ("tokens", "pooled", "logits"):
      assert_close(out[key], ref[key])
  assert not jax.config.jax_enable_x64
  with pytest.raises(ValueError, match="param_dtype=float64 needs jax's 64-bit mode: set JAX_ENABLE_X64=1"):
    create_model("vit_tiny_patch16", **kw, param_dtype="float64")
