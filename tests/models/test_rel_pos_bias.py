"""The authors' segmentation backbone options: BEiT relative position bias + layer scale, against timm's Beit
(the same block: fused qkv with a zero k bias, gamma_1 / gamma_2, the per-block bias table), and dense features."""

import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from timm.models.beit import Beit, gen_relative_position_index

from tests.helpers.torch_ref import randomize_
from tinymim_jax import create_model
from tinymim_jax.models import vit as vit_lib

SHAPE = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4)


@pytest.mark.parametrize("grid", [1, 4, 7])
def test_index_matches_beit(grid):
  np.testing.assert_array_equal(vit_lib.relative_position_index(grid),
                                gen_relative_position_index((grid, grid)).numpy())


def load_from_beit(model, beit):
  """Copies timm Beit weights into our ViT (qkv bias = [q_bias | 0 | v_bias], as Beit's forward builds it)."""
  sd = {k: v.detach().numpy() for k, v in beit.state_dict().items()}
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state["cls_token"] = sd["cls_token"]
  state["pos_embed"] = sd["pos_embed"]
  state["patch_embed"] = dict(kernel=sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                              bias=sd["patch_embed.proj.bias"])
  state["norm"] = dict(scale=sd["norm.weight"], bias=sd["norm.bias"])
  for i, blk in state["blocks"].items():
    p = f"blocks.{i}."
    lin = lambda n: dict(kernel=sd[p + n + ".weight"].T, bias=sd[p + n + ".bias"])
    blk["norm1"] = dict(scale=sd[p + "norm1.weight"], bias=sd[p + "norm1.bias"])
    blk["norm2"] = dict(scale=sd[p + "norm2.weight"], bias=sd[p + "norm2.bias"])
    q_bias, v_bias = sd[p + "attn.q_bias"], sd[p + "attn.v_bias"]
    blk["attn"]["qkv"] = dict(kernel=sd[p + "attn.qkv.weight"].T,
                              bias=np.concatenate([q_bias, np.zeros_like(q_bias), v_bias]))
    blk["attn"]["proj"] = lin("attn.proj")
    blk["attn"]["relative_position_bias_table"] = sd[p + "attn.relative_position_bias_table"]
    blk["mlp"] = dict(fc1=lin("mlp.fc1"), fc2=lin("mlp.fc2"))
    blk["ls1"] = dict(gamma=sd[p + "gamma_1"])
    blk["ls2"] = dict(gamma=sd[p + "gamma_2"])
  nnx.update(model, state)


@functools.lru_cache(maxsize=None)
def case():
  torch.manual_seed(0)
  beit = Beit(**SHAPE, mlp_ratio=4, qkv_bias=True, use_abs_pos_emb=True, use_rel_pos_bias=True,
              use_shared_rel_pos_bias=False, init_values=1.0, num_classes=0, global_pool="",
              norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
  randomize_(beit, seed=3)
  gen = torch.Generator().manual_seed(4)
  with torch.no_grad():
    for name, p in beit.named_parameters():
      if "relative_position_bias_table" in name or "gamma" in name:
        p.normal_(0.5 if "gamma" in name else 0.0, 0.5, generator=gen)  # a bias that moves the attention
  beit.eval()
  model = create_model("vit_tiny_patch16", **SHAPE, pos_embed="learn", init_values=1.0, use_rel_pos_bias=True)
  load_from_beit(model, beit)
  x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  with torch.no_grad():
    ref = beit.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  return model, x, ref


def test_forward_matches_timm_beit():
  model, x, ref = case()
  out = nnx.jit(lambda m, x: m(x))(model, x)
  np.testing.assert_allclose(np.asarray(out["tokens"]), ref, atol=2e-5, rtol=1e-5)
  # The bias matters here: with it zeroed the output moves far away (the test would notice a dropped bias).
  table = model.blocks[0].attn.relative_position_bias_table
  saved = table[...]
  table[...] = saved * 0
  off = nnx.jit(lambda m, x: m(x))(model, x)["tokens"]
  table[...] = saved
  assert np.max(np.abs(np.asarray(off) - ref)) > 1e-2


def test_fused_attention_path_adds_the_bias():
  model, x, ref = case()
  state = nnx.state(model)
  xla = create_model("vit_tiny_patch16", **SHAPE, pos_embed="learn", init_values=1.0, use_rel_pos_bias=True,
                     attention="xla")
  nnx.update(xla, state)
  out = nnx.jit(lambda m, x: m(x))(xla, x)
  np.testing.assert_allclose(np.asarray(out["tokens"]), ref, atol=2e-5, rtol=1e-5)


def test_default_off_and_zero_init():
  plain = create_model("vit_tiny_patch16", **SHAPE)
  names = jax.tree.leaves(jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p),
                                                           nnx.to_pure_dict(nnx.state(plain))))
  assert not any("relative_position" in n for n in names)
  model = create_model("vit_tiny_patch16", **SHAPE, use_rel_pos_bias=True)
  table = model.blocks[1].attn.relative_position_bias_table[...]
  assert table.shape == ((2 * 4 - 1) ** 2 + 3, 4) and not np.any(table)
  with pytest.raises(ValueError, match="not registers"):
    create_model("vit_tiny_patch16", **SHAPE, use_rel_pos_bias=True, reg_tokens=2)


def authors_star_index(grid):
  """TinyMIM*-T's index (Segmentation/TinyMIMstar-T/backbone/mae.py, Attention.__init__), transcribed in torch:
  CLS at 0, the distillation token at 1, six extra table rows."""
  num_relative_distance = (2 * grid - 1) ** 2 + 6
  coords = torch.stack(torch.meshgrid([torch.arange(grid), torch.arange(grid)], indexing="ij"))
  coords_flatten = torch.flatten(coords, 1)
  relative_coords = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
  relative_coords[:, :, 0] += grid - 1
  relative_coords[:, :, 1] += grid - 1
  relative_coords[:, :, 0] *= 2 * grid - 1
  index = torch.zeros(size=(grid * grid + 2,) * 2, dtype=relative_coords.dtype)
  index[2:, 2:] = relative_coords.sum(-1)
  index[1, 0:] = num_relative_distance - 6
  index[0:, 1] = num_relative_distance - 5
  index[1, 1] = num_relative_distance - 4
  index[0, 0:] = num_relative_distance - 3
  index[0:, 0] = num_relative_distance - 2
  index[0, 0] = num_relative_distance - 1
  return index.numpy()


@pytest.mark.parametrize("grid", [1, 3, 4])
def test_index_with_distillation_token_matches_the_authors(grid):
  np.testing.assert_array_equal(vit_lib.relative_position_index(grid, 2), authors_star_index(grid))
  with pytest.raises(ValueError, match="3 prefix tokens"):
    vit_lib.relative_position_index(grid, 3)


def test_distillation_token_bias():
  """TinyMIM*-T's backbone: CLS + dist token + patches, a table of (2 g - 1)^2 + 6 rows; the bias each token pair
  gets is the table row the authors' index names (distinct rows make any misplacement visible)."""
  model = create_model("vit_tiny_patch16", **SHAPE, use_rel_pos_bias=True, dist_token=True)
  attn = model.blocks[0].attn
  rows = (2 * 4 - 1) ** 2 + 6
  assert attn.relative_position_bias_table[...].shape == (rows, 4)
  table = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
  attn.relative_position_bias_table[...] = table
  bias = np.asarray(attn.position_bias())[0]          # (H, N, N), N = 2 + 16
  index = authors_star_index(4)
  np.testing.assert_array_equal(bias, table[index].transpose(2, 0, 1))
  x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  assert model(x)["tokens"].shape == (2, 18, 64)


def test_feature_maps():
  model, x, _ = case()
  maps = nnx.jit(lambda m, x: m.feature_maps(x, (1, 3)))(model, x)
  out = nnx.jit(lambda m, x: m(x, capture=(1, 3)))(model, x)
  assert [m.shape for m in maps] == [(2, 4, 4, 64)] * 2
  for m, i in zip(maps, (1, 3)):
    hidden = np.asarray(out["blocks"][i]["hidden"])
    np.testing.assert_array_equal(np.asarray(m)[:, 1, 2], hidden[:, 1 + 1 * 4 + 2])  # row 1, col 2
    np.testing.assert_array_equal(np.asarray(m).reshape(2, 16, 64), hidden[:, 1:])
  with pytest.raises(ValueError, match="1..3"):
    model.feature_maps(x, (0,))
