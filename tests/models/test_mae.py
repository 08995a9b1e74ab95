"""MAE parity with a torch transcription of facebookresearch/mae's MaskedAutoencoderViT (loss-free)."""

import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from tests.helpers.torch_ref import randomize_
from tinymim_jax import convert, create_model
from tinymim_jax.models import random_masking

CASES = {
    "small": dict(name="mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                  decoder=dict(embed_dim=32, depth=2, num_heads=4)),
    "tiny224": dict(name="mae_vit_tiny_patch16", img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3,
                    decoder=dict(embed_dim=128, depth=2, num_heads=4)),
}


class TorchMAE(nn.Module):
  """models_mae.MaskedAutoencoderViT's forward, with the masking noise passed in (timm Blocks as in MAE)."""

  def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth,
               decoder_num_heads, mlp_ratio=4.0):
    super().__init__()
    norm_layer = functools.partial(nn.LayerNorm, eps=1e-6)
    self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
    num_patches = self.patch_embed.num_patches
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                 for _ in range(depth)])
    self.norm = norm_layer(embed_dim)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
    self.decoder_blocks = nn.ModuleList([
        Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
        for _ in range(decoder_depth)])
    self.decoder_norm = norm_layer(decoder_embed_dim)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * 3, bias=True)

  def random_masking(self, x, mask_ratio, noise):
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore

  def forward_encoder(self, x, mask_ratio, noise):
    x = self.patch_embed(x)
    x = x + self.pos_embed[:, 1:, :]
    x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
    cls_token = self.cls_token + self.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x), mask, ids_restore

  def forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    x = self.decoder_norm(x)
    return self.decoder_pred(x)[:, 1:, :]

  def forward(self, imgs, mask_ratio, noise):
    latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
    return latent, self.forward_decoder(latent, ids_restore), mask, ids_restore


def torch_mae(case, device=None):
  c = CASES[case]
  with torch.device(device or "cpu"):
    return TorchMAE(c["img_size"], c["patch_size"], c["embed_dim"], c["depth"], c["num_heads"],
                    c["decoder"]["embed_dim"], c["decoder"]["depth"], c["decoder"]["num_heads"])


def our_mae(case, abstract=False):
  c = dict(CASES[case])
  make = functools.partial(create_model, c.pop("name"), **c)
  return nnx.eval_shape(make) if abstract else make()




@functools.partial(nnx.jit, static_argnames=("mask_ratio",))
def mae_forward(model, x, rng, mask_ratio):
  return model(x, rng=rng, mask_ratio=mask_ratio)


def assert_close(ours, ref, tol=1e-5):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  err = np.max(np.abs(ours - ref))
  assert err <= tol * max(1.0, np.max(np.abs(ref))), f"max abs err {err:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_mae_forward_matches_reference(case):
  c = CASES[case]
  ref_model = torch_mae(case).eval()
  randomize_(ref_model)
  model = our_mae(case, abstract=True)
  report = convert.load_pytorch_weights(model, ref_model.state_dict())
  assert not report.skipped and not report.missing_kept_init
  batch, length, ratio = 2, (c["img_size"] // c["patch_size"]) ** 2, 0.75
  x = np.random.RandomState(0).randn(batch, c["img_size"], c["img_size"], 3).astype(np.float32)
  rng = jax.random.key(7)
  out = mae_forward(model, x, rng, ratio)
  # MAE.__call__ draws its masking noise from the first half of the split key: same noise for torch.
  mask_rng, _ = jax.random.split(rng)
  noise = torch.from_numpy(np.array(jax.random.uniform(mask_rng, (batch, length))))
  with torch.no_grad():
    latent, pred, mask, ids_restore = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), ratio, noise)
  np.testing.assert_array_equal(np.asarray(out["mask"]), mask.numpy())
  _, _, our_restore = random_masking(mask_rng, batch, length, ratio)
  np.testing.assert_array_equal(np.asarray(our_restore), ids_restore.numpy())
  assert out["latent"].shape == (batch, 1 + int(length * (1 - ratio)), c["embed_dim"])
  assert_close(out["latent"], latent.numpy())
  assert out["pred"].shape == (batch, length, c["patch_size"] ** 2 * 3)
  assert_close(out["pred"], pred.numpy())


def test_export_loads_into_reference_mae():
  model = our_mae("small")
  exported = convert.export_pytorch_weights(model)
  ref_model = torch_mae("small")
  ref_model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  assert list(exported) == list(ref_model.state_dict())  # and in MAE's order
  # MAE's fixed tables: ours are the same float32 sin-cos tables MAE builds.
  np.testing.assert_array_equal(exported["decoder_pos_embed"], np.asarray(model.decoder_pos_embed[...]))
  assert exported["decoder_pos_embed"].shape == (1, 17, 32) and not exported["decoder_pos_embed"][0, 0].any()


def test_parameter_count_matches_reference():
  model = nnx.eval_shape(lambda: create_model("mae_vit_base_patch16"))  # default decoder 512 / 8 / 16
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
  with torch.device("meta"):
    ref = TorchMAE(224, 16, 768, 12, 12, 512, 8, 16)
  assert ours == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("length,ratio", [(196, 0.75), (49, 0.75), (16, 0.5), (196, 0.9), (10, 0.0)])
def test_random_masking(length, ratio):
  batch = 3
  ids_keep, mask, ids_restore = random_masking(jax.random.key(length), batch, length, ratio)
  ids_keep, mask, ids_restore = map(np.asarray, (ids_keep, mask, ids_restore))
  keep = int(length * (1 - ratio))
  assert ids_keep.shape == (batch, keep) and mask.shape == ids_restore.shape == (batch, length)
  assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
  for b in range(batch):
    assert sorted(ids_restore[b]) == list(range(length))  # a permutation
    assert mask[b].sum() == length - keep  # 1 = removed
    assert not mask[b, ids_keep[b]].any()  # the kept patches are the unmasked ones
    np.testing.assert_array_equal(ids_restore[b, ids_keep[b]], np.arange(keep))  # inverts the shuffle
    np.testing.assert_array_equal(mask[b], (ids_restore[b] >= keep).astype(np.float32))
  assert len({tuple(r) for r in ids_keep}) == batch  # a different shuffle per sample


def test_random_masking_rejects_empty_keep():
  with pytest.raises(ValueError):
    random_masking(jax.random.key(0), 1, 4, 0.9)


def test_float64_params_and_compute():
  """param_dtype=float64 reaches the decoder too (mask_token, decoder_pos_embed, decoder layers); pred stays
  float64 and the masks are those of the float32 model."""
  c = dict(CASES["small"])
  name = c.pop("name")
  f32 = create_model(name, **c)
  x = np.random.RandomState(1).randn(2, c["img_size"], c["img_size"], 3).astype(np.float32)
  ref = mae_forward(f32, x, jax.random.key(3), 0.75)
  with jax.enable_x64(True):
    f64 = create_model(name, **c, dtype="float64", param_dtype="float64")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nnx.state(f32)), jax.tree.leaves(nnx.state(f64))):
      assert b.dtype == np.float64, path
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a, np.float64), err_msg=str(path))
    out = mae_forward(f64, x.astype(np.float64), jax.random.key(3), 0.75)
    assert out["pred"].dtype == out["latent"].dtype == np.float64
    np.testing.assert_array_equal(np.asarray(out["mask"]), np.asarray(ref["mask"]))
    assert_close(out["pred"], ref["pred"])
  assert not jax.config.jax_enable_x64


def test_mae_with_register_tokens_is_refused():
  with pytest.raises(ValueError, match="register tokens"):
    create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                 reg_tokens=2, decoder=dict(embed_dim=32, depth=1, num_heads=2))
