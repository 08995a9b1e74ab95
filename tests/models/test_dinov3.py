"""DINOv3 ViTs by their timm names: forward parity with timm's Eva (rope_type='dinov3') on random weights, the
relation maps a teacher gives (q / k after the rotary embedding, CLS + patches), timm's and the original hub
layout both ways (timm's checkpoint_filter_fn reads our export of the original layout)."""

import numpy as np
import pytest
import timm
import torch
from flax import nnx

from tests.helpers.torch_ref import randomize_
from tinymim_jax import convert, convert_cli, create_model

TINY = dict(embed_dim=64, depth=2, num_heads=4)


def tiny_timm(name, grid=3, seed=0):
  tm = timm.create_model(name, pretrained=False, img_size=16 * grid, num_classes=0, global_pool="token", **TINY)
  randomize_(tm, seed)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for n, p in tm.named_parameters():
      if "gamma" in n:
        p.normal_(1.0, 0.3, generator=gen)
      elif n == "reg_token":
        p.normal_(0.0, 0.5, generator=gen)
  return tm.eval()


def tiny_ours(name, grid=3):
  return nnx.eval_shape(lambda: create_model(name, img_size=16 * grid, **TINY))


def close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  err = float(np.max(np.abs(a - b)))
  assert err <= tol * max(1.0, np.max(np.abs(b))), f"max abs err {err:.3g}"
  return err


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3_qkvb"])
def test_forward_and_relation_qk_match_timm_eva(name):
  tm = tiny_timm(name)
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  model = tiny_ours(name)
  report = convert.load_pytorch_weights(model, sd)
  assert report.layout.startswith("timm Eva (DINOv3)") and not report.skipped
  x = np.random.RandomState(0).randn(2, 48, 48, 3).astype(np.float32)
  out = nnx.jit(lambda m, x: m(x, capture=(2,)))(model, x)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  captured = {}
  attn = tm.blocks[1].attn
  def hook(mod, args, kwargs, output):  # q / k as the attention uses them: after the rotary embedding
    from timm.layers import apply_rot_embed_cat
    h = args[0]
    qkv = torch.nn.functional.linear(h, attn.qkv.weight, None if attn.q_bias is None else
                                     torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    q, k, v = qkv.reshape(2, h.shape[1], 3, 4, 16).permute(2, 0, 3, 1, 4)
    rope = kwargs["rope"]
    npt = attn.num_prefix_tokens
    captured["q"] = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=True)], 2)
    captured["k"] = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=True)], 2)
    captured["v"] = v
  handle = attn.register_forward_hook(hook, with_kwargs=True)
  with torch.no_grad():
    feats = tm.forward_features(xt)
  handle.remove()
  assert out["tokens"].shape == (2, 1 + 4 + 9, 64)
  close(out["tokens"], feats.numpy())
  close(out["pooled"], tm.forward_head(feats, pre_logits=True).numpy())
  for k in "qkv":
    close(out["blocks"][2][k], captured[k].numpy())
  # export: timm's names and order, loaded strictly by timm's own class
  exported = convert.export_pytorch_weights(model)
  assert list(exported) == [k for k in tm.state_dict() if not k.endswith("k_bias")]
  tm.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=False)


@pytest.mark.parametrize("name", ["vit_base_patch16_dinov3", "vit_huge_plus_patch16_dinov3_qkvb"])
def test_original_hub_layout_both_ways(name, tmp_path):
  from timm.models.eva import checkpoint_filter_fn
  src = tiny_timm(name, seed=3)
  model = tiny_ours(name)
  convert.load_pytorch_weights(model, {k: v.numpy() for k, v in src.state_dict().items()})
  hub = convert.export_pytorch_weights(model, layout="dinov3")
  assert "storage_tokens" in hub and "blocks.0.attn.qkv.bias_mask" in hub and "rope_embed.periods" in hub
  assert ("blocks.0.mlp.w1.weight" in hub) == ("huge_plus" in name)
  path = str(tmp_path / "dinov3_vitb16_pretrain.pth")
  torch.save({k: torch.from_numpy(v) for k, v in hub.items()}, path)
  # timm's own filter reads the file into its Eva: the same function as ours
  tm = tiny_timm(name, seed=9)
  tm.load_state_dict(checkpoint_filter_fn(torch.load(path), tm), strict=True)
  back = tiny_ours(name)
  report = convert.load_pytorch_weights(back, path)
  assert report.layout.startswith("DINOv3 hub file"), report.layout
  assert "mask_token" in report.skipped and "rope_embed.periods" in report.skipped
  x = np.random.RandomState(1).randn(2, 48, 48, 3).astype(np.float32)
  with torch.no_grad():
    ref = tm.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  close(nnx.jit(lambda m, x: m(x))(back, x)["tokens"], ref)
  # the command line: import names the layout and writes timm's Eva names, which timm loads strictly
  sized = str(tmp_path / "sized" / "dinov3.pth")  # the tiny size recorded beside it: no --model needed
  (tmp_path / "sized").mkdir()
  convert.save_pytorch_weights(hub, sized, sidecar=convert.architecture(back))
  out = str(tmp_path / "dinov3.safetensors")
  assert convert_cli.main(["import", sized, "--out", out]) == 0
  from safetensors.numpy import load_file
  written = load_file(out)  # as written (reading converts Eva names back to ours)
  tm.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=False)
  assert set(tm.state_dict()) - set(written) == {f"blocks.{i}.attn.k_bias" for i in range(2)} & set(tm.state_dict())


def test_variant_defaults_match_timm():
  for name in ["vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3", "vit_base_patch16_dinov3_qkvb",
               "vit_large_patch16_dinov3", "vit_huge_plus_patch16_dinov3"]:
    with torch.device("meta"):
      tm = timm.create_model(name, pretrained=False)
    c = nnx.eval_shape(lambda: create_model(name)).config
    b = tm.blocks[0]
    hidden = (b.mlp.fc1_g if hasattr(b.mlp, "fc1_g") else b.mlp.fc1).out_features
    assert (c.img_size, c.embed_dim, c.depth, c.num_heads, int(c.embed_dim * c.mlp_ratio), c.reg_tokens) == (
        tm.pretrained_cfg["input_size"][1], tm.embed_dim, len(tm.blocks), b.attn.num_heads, hidden,
        tm.reg_token.shape[1]), name
    assert (c.qkv_bias, c.norm_eps, c.init_values, c.rope_temperature, c.mlp_type == "swiglu") == (
        b.attn.q_bias is not None, tm.norm.eps, 1e-5, tm.rope.temperature, hasattr(b.mlp, "fc1_g")), name
