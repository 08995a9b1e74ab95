"""DINOv2 and CLIP towers by their timm names: forward parity with timm's own classes on random weights (no
downloads), the converter's keys both ways, a timm-saved file of each kind, positional tables with prefix rows."""

import numpy as np
import pytest
import timm
import torch
from flax import nnx

from tests.helpers.torch_ref import randomize_
from tinymim_jax import convert, create_model
from tinymim_jax.models import VARIANTS

NAMES = ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "vit_base_patch16_clip_224",
         "vit_base_patch16_clip_quickgelu_224"]
TINY = dict(embed_dim=64, depth=2, num_heads=4)


def tiny_timm(name, grid=2, seed=0):
  """timm's model of this name at a tiny size, every parameter random (LayerScale gammas and registers included)."""
  img = grid * VARIANTS[name]["patch_size"]
  tm = timm.create_model(name, pretrained=False, img_size=img, num_classes=0, **TINY)
  randomize_(tm, seed)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for n, p in tm.named_parameters():
      if n.endswith("gamma"):
        p.normal_(1.0, 0.3, generator=gen)  # timm's 1e-5 would hide a missing or misplaced LayerScale
      elif n == "reg_token":
        p.normal_(0.0, 0.5, generator=gen)
  return tm.eval()


def tiny_ours(name, grid=2):
  img = grid * VARIANTS[name]["patch_size"]
  return nnx.eval_shape(lambda: create_model(name, img_size=img, **TINY))


def close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  err = np.max(np.abs(a - b))
  assert err <= tol * max(1.0, np.max(np.abs(b))), f"max abs err {err:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_forward_parity_and_keys_both_ways(name, tmp_path):
  tm = tiny_timm(name)
  sd = tm.state_dict()
  path = str(tmp_path / "timm.pth")
  torch.save(sd, path)  # a timm-saved file of this kind
  model = tiny_ours(name)
  report = convert.load_pytorch_weights(model, path)
  assert sorted(report.loaded) == sorted(sd) and not report.skipped and not report.missing_kept_init
  img = model.config.img_size
  x = np.random.RandomState(0).randn(2, img, img, 3).astype(np.float32)
  out = nnx.jit(lambda m, x: m(x, capture=(1,)))(model, x)
  with torch.no_grad():
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    feats = tm.forward_features(xt)
    h = tm.norm_pre(tm._pos_embed(tm.patch_embed(xt)))
    qkv = tm.blocks[0].attn.qkv(tm.blocks[0].norm1(h))
  n_tok = 1 + model.config.reg_tokens + 4
  assert out["tokens"].shape[1] == n_tok == feats.shape[1]
  close(out["tokens"], feats.numpy())
  close(out["pooled"], tm.forward_head(feats, pre_logits=True).numpy())
  q = qkv.reshape(2, n_tok, 3, 4, 16).permute(2, 0, 3, 1, 4).numpy()  # every token: CLS, registers, patches
  for i, k in enumerate("qkv"):
    close(out["blocks"][1][k], q[i])
  # Export: timm's own class loads our keys strictly, and they are timm's state_dict order.
  exported = convert.export_pytorch_weights(model)
  assert list(exported) == list(sd)
  tm.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_pos_embed_resample_keeps_prefix_rows(name):
  from timm.layers import resample_abs_pos_embed
  tm = tiny_timm(name, grid=2)
  model = tiny_ours(name, grid=3)
  report = convert.load_pytorch_weights(model, tm.state_dict())
  assert report.resampled == {"pos_embed": ((2, 2), (3, 3))}
  prefix = 0 if tm.no_embed_class else tm.num_prefix_tokens
  assert prefix == (0 if "reg4" in name else 1)
  # Upsampling: timm's antialias flag changes nothing, so this is exactly timm's resample.
  ref = resample_abs_pos_embed(tm.pos_embed.detach(), (3, 3), (2, 2), num_prefix_tokens=prefix, antialias=False)
  close(model.pos_embed[...], ref.numpy(), tol=1e-6)


def test_variant_defaults_match_timm():
  for name in NAMES + ["vit_base_patch14_reg4_dinov2", "vit_large_patch14_dinov2"]:
    with torch.device("meta"):
      tm = timm.create_model(name, pretrained=False)
    c = nnx.eval_shape(lambda: create_model(name)).config
    assert (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads) == (
        tm.patch_embed.img_size[0], tm.patch_embed.patch_size[0], tm.embed_dim, len(tm.blocks),
        tm.blocks[0].attn.num_heads), name
    assert (c.reg_tokens, c.no_embed_class, c.pre_norm) == (
        tm.num_reg_tokens, tm.no_embed_class, not isinstance(tm.norm_pre, torch.nn.Identity)), name
    ls = tm.blocks[0].ls1
    assert c.init_values == (ls.init_values if hasattr(ls, "init_values") else 0.0), name
    assert c.norm_eps == tm.norm.eps, name
    assert (c.act_layer == "quick_gelu") == ("quickgelu" in name), name
