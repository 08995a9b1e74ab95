"""Other libraries' layouts, read as timm names: small files built in each real layout with random weights.

DINOv2's hub files and OpenAI / OpenCLIP towers: timm's own checkpoint_filter_fn converts the same file into timm's
model, whose outputs ours must match. transformers (not installed here): the files are written from a timm model's
weights under transformers' names (modeling_vit.py / modeling_vit_mae.py / modeling_dinov2.py: q, k, v Linears,
layernorm_before / after, layer_scale1.lambda1, ...), with a config.json as the hub holds it, and our model must
reproduce that timm model."""

import json

import numpy as np
import pytest
import timm
import torch
from flax import nnx
from safetensors.numpy import save_file

from tests.helpers.torch_ref import randomize_
from tinymim_jax import builders, convert, convert_cli, create_model
from tinymim_jax.convert.resample import resample_pos_embed

TINY = dict(embed_dim=64, depth=2, num_heads=4)


def tiny_timm(name, grid=2, seed=0, **kw):
  tm = timm.create_model(name, pretrained=False, img_size=grid * (14 if "patch14" in name else 16),
                         num_classes=kw.pop("num_classes", 0), **TINY, **kw)
  randomize_(tm, seed)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for n, p in tm.named_parameters():
      if n.endswith("gamma"):
        p.normal_(1.0, 0.3, generator=gen)
      elif n == "reg_token":
        p.normal_(0.0, 0.5, generator=gen)
  return tm.eval()


def npy(sd):
  return {k: v.detach().numpy().copy() for k, v in sd.items()}


def tokens_close(model, tm, tol=1e-5):
  """Our forward against timm's on the same random images: final tokens and a block-1 q."""
  img = model.config.img_size
  x = np.random.RandomState(0).randn(2, img, img, 3).astype(np.float32)
  out = nnx.jit(lambda m, x: m(x))(model, x)
  with torch.no_grad():
    ref = tm.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  err = float(np.max(np.abs(np.asarray(out["tokens"], np.float64) - ref)))
  assert out["tokens"].shape == ref.shape and err <= tol * max(1.0, np.abs(ref).max()), err
  return err


# ----------------------------------------------------------------------------------------------------------
# transformers layouts, written from timm names (the inverse of transformers' conversion scripts).
# ----------------------------------------------------------------------------------------------------------
def hf_layout(sd, prefix="", dinov2=False, registers=False):
  out = {}
  p = prefix
  cls, pos = sd["cls_token"], sd["pos_embed"]
  if registers:  # Dinov2WithRegisters keeps a CLS row in its table: split timm's folded cls_token back
    row = np.random.RandomState(5).randn(1, 1, pos.shape[-1]).astype(np.float32)
    cls, pos = cls - row, np.concatenate([row, pos], 1)
    out[p + "embeddings.register_tokens"] = sd["reg_token"]
  out[p + "embeddings.cls_token"] = cls
  out[p + "embeddings.position_embeddings"] = pos
  if dinov2:
    out[p + "embeddings.mask_token"] = np.zeros((1, pos.shape[-1]), np.float32)
  out[p + "embeddings.patch_embeddings.projection.weight"] = sd["patch_embed.proj.weight"]
  out[p + "embeddings.patch_embeddings.projection.bias"] = sd["patch_embed.proj.bias"]
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  names = ({"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"} if dinov2 else
           {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense"})
  names["attn.proj"] = "attention.output.dense"
  for i in range(depth):
    b, L = f"blocks.{i}.", f"{p}encoder.layer.{i}."
    for leaf in ("weight", "bias"):
      q, k, v = np.split(sd[b + f"attn.qkv.{leaf}"], 3, 0)
      for n, t in zip(("query", "key", "value"), (q, k, v)):
        out[L + f"attention.attention.{n}.{leaf}"] = t
      for ours, theirs in names.items():
        out[L + f"{theirs}.{leaf}"] = sd[b + f"{ours}.{leaf}"]
    if dinov2:
      out[L + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
      out[L + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
  out[p + "layernorm.weight"], out[p + "layernorm.bias"] = sd["norm.weight"], sd["norm.bias"]
  return out


def hf_config(model_type, tm, **kw):
  d = tm.embed_dim
  cfg = {"model_type": model_type, "hidden_size": d, "num_hidden_layers": len(tm.blocks),
         "num_attention_heads": tm.blocks[0].attn.num_heads, "intermediate_size": 4 * d,
         "image_size": tm.patch_embed.img_size[0], "patch_size": tm.patch_embed.patch_size[0], "hidden_act": "gelu",
         "layer_norm_eps": 1e-6, "qkv_bias": True}
  cfg.update(kw)
  return cfg


def snapshot(tmp_path, weights, cfg):
  folder = tmp_path / "snapshot"
  folder.mkdir()
  save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps(cfg))
  return str(folder)


@pytest.mark.parametrize("kind", ["vit", "dinov2", "dinov2_with_registers"])
def test_transformers_snapshot_matches_timm(kind, tmp_path):
  name = {"vit": "vit_small_patch16_224", "dinov2": "vit_small_patch14_dinov2",
          "dinov2_with_registers": "vit_small_patch14_reg4_dinov2"}[kind]
  tm = tiny_timm(name)
  dinov2 = kind != "vit"
  extra = {"layerscale_value": 1.0} if dinov2 else {}
  if kind == "dinov2_with_registers":
    extra["num_register_tokens"] = 4
  weights = hf_layout(npy(tm.state_dict()), prefix="" if dinov2 else "vit.", dinov2=dinov2,
                      registers=kind == "dinov2_with_registers")
  weights.update({} if dinov2 else {"vit.pooler.dense.weight": np.eye(64, dtype=np.float32),
                                    "vit.pooler.dense.bias": np.zeros(64, np.float32)})
  folder = snapshot(tmp_path, weights, hf_config(kind, tm, **extra))
  ckpt = convert.read_checkpoint(folder)
  side = ckpt.sidecar
  model = nnx.eval_shape(lambda: create_model(convert.sidecar_model(side)[0], **convert.sidecar_model(side)[1]))
  report = convert.load_pytorch_weights(model, folder)
  label = {"vit": "Hugging Face transformers ViT, under 'vit.'", "dinov2": "Hugging Face transformers Dinov2",
           "dinov2_with_registers": "Hugging Face transformers Dinov2WithRegisters"}[kind]
  assert report.layout.startswith(label), report.layout
  assert "config.json (transformers" in str(report)
  tokens_close(model, tm)
  # As teacher.source / init: the folder is a source, not a workdir, and its config.json gives the heads.
  assert builders.source_architecture(folder)[0]["model_args"]["num_heads"] == 4
  assert builders.load_weights(model, folder).layout == report.layout
  # The round trip: our export is timm's state dict, name for name.
  convert_testlib_same(convert.export_pytorch_weights(model), npy(tm.state_dict()))


def convert_testlib_same(a, b):
  assert set(a) == set(b), sorted(set(a) ^ set(b))
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


def test_transformers_vit_mae_snapshot_cli(tmp_path, capsys):
  """ViTMAEForPreTraining as the hub has it: vit.* encoder, decoder.*; the CLI imports it without --model."""
  tm = tiny_timm("vit_small_patch16_224")
  sd = npy(tm.state_dict())
  sd["pos_embed"] = np.asarray(create_model("vit_tiny_patch16", img_size=32, patch_size=16, embed_dim=64, depth=1,
                                            num_heads=4).pos_embed[...])  # ViTMAE's fixed sin-cos table
  tm.pos_embed.data = torch.from_numpy(sd["pos_embed"].copy())
  weights = hf_layout(sd, prefix="vit.")
  rs = np.random.RandomState(1)
  dec = {"decoder.mask_token": (1, 1, 32), "decoder.decoder_pos_embed": (1, 5, 32),
         "decoder.decoder_embed.weight": (32, 64), "decoder.decoder_embed.bias": (32,),
         "decoder.decoder_norm.weight": (32,), "decoder.decoder_norm.bias": (32,),
         "decoder.decoder_pred.weight": (768, 32), "decoder.decoder_pred.bias": (768,)}
  for n, s in [("attention.attention.query", 32), ("attention.attention.key", 32), ("attention.attention.value", 32),
               ("attention.output.dense", 32), ("intermediate.dense", 128), ("output.dense", 32)]:
    fan_in = 128 if n == "output.dense" else 32
    dec[f"decoder.decoder_layers.0.{n}.weight"], dec[f"decoder.decoder_layers.0.{n}.bias"] = (s, fan_in), (s,)
  for n in ("layernorm_before", "layernorm_after"):
    dec[f"decoder.decoder_layers.0.{n}.weight"], dec[f"decoder.decoder_layers.0.{n}.bias"] = (32,), (32,)
  weights.update({k: rs.randn(*s).astype(np.float32) for k, s in dec.items()})
  folder = snapshot(tmp_path, weights, hf_config("vit_mae", tm, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                                 decoder_num_attention_heads=4, decoder_intermediate_size=128))
  assert convert_cli.main(["inspect", folder]) == 0
  text = capsys.readouterr().out
  assert "layout: Hugging Face transformers ViTMAE, under 'vit.' (as timm names: MAE pretrain" in text
  assert "model:  custom (D 64, depth 2, patch 16, grid 2x2 = img 32)" in text
  out = str(tmp_path / "mae.safetensors")
  assert convert_cli.main(["import", folder, "--out", out]) == 0
  text = capsys.readouterr().out
  assert "[Hugging Face transformers ViTMAE" in text and "skipped" not in text
  side = json.loads((tmp_path / "mae.config.json").read_text())
  assert side["architecture"].startswith("mae_") and side["decoder_args"]["embed_dim"] == 32
  written = convert.read_checkpoint(out).weights
  # MAE's names for the same arrays: q / k / v concatenated in that order.
  q = [weights[f"decoder.decoder_layers.0.attention.attention.{n}.weight"] for n in ("query", "key", "value")]
  np.testing.assert_array_equal(written["decoder_blocks.0.attn.qkv.weight"], np.concatenate(q))
  np.testing.assert_array_equal(written["decoder_pred.weight"], weights["decoder.decoder_pred.weight"])
  model = nnx.eval_shape(lambda: create_model("vit_small_patch16", img_size=32, patch_size=16, embed_dim=64, depth=2,
                                              num_heads=4))
  convert.load_pytorch_weights(model, out)
  tokens_close(model, tm)


# ----------------------------------------------------------------------------------------------------------
# DINOv2's own hub files and OpenAI / OpenCLIP towers: against timm's checkpoint_filter_fn on the same file.
# ----------------------------------------------------------------------------------------------------------
def dinov2_hub_file(tm, registers):
  """The layout of dinov2_vits14[_reg4]_pretrain.pth: mask_token (1, D), a table with a CLS row, register_tokens."""
  rs = np.random.RandomState(3)
  sd = npy(tm.state_dict())
  d = sd["cls_token"].shape[-1]
  out = {"mask_token": rs.randn(1, d).astype(np.float32)}
  if registers:
    out["register_tokens"] = sd.pop("reg_token")
    sd["pos_embed"] = np.concatenate([rs.randn(1, 1, d).astype(np.float32), sd["pos_embed"]], 1)
  out.update(sd)
  return out


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_hub_file_matches_timm_filter(registers, tmp_path):
  from timm.models.vision_transformer import checkpoint_filter_fn
  name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
  tm = tiny_timm(name, seed=2)
  hub = dinov2_hub_file(tiny_timm(name, seed=4), registers)
  tm.load_state_dict(checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in hub.items()}, tm), strict=True)
  path = str(tmp_path / f"dinov2_vits14{'_reg4' if registers else ''}_pretrain.pth")
  torch.save({k: torch.from_numpy(v) for k, v in hub.items()}, path)
  model = nnx.eval_shape(lambda: create_model(name, img_size=28, **TINY))
  report = convert.load_pytorch_weights(model, path)
  assert report.layout.startswith("DINOv2 hub file" + (" with 4 registers" if registers else "")), report.layout
  assert report.skipped == {"mask_token": "iBOT's mask token (training only)"}
  tokens_close(model, tm)


def clip_file(tm, openai=True):
  """OpenAI CLIP's state dict (visual.* image tower + a text tower), from a timm CLIP tower's weights."""
  sd = npy(tm.state_dict())
  v = {"visual.class_embedding": sd["cls_token"][0, 0], "visual.positional_embedding": sd["pos_embed"][0],
       "visual.conv1.weight": sd["patch_embed.proj.weight"], "visual.ln_pre.weight": sd["norm_pre.weight"],
       "visual.ln_pre.bias": sd["norm_pre.bias"], "visual.ln_post.weight": sd["norm.weight"],
       "visual.ln_post.bias": sd["norm.bias"], "visual.proj": np.ascontiguousarray(sd["head.weight"].T)}
  for k, t in sd.items():
    if k.startswith("blocks."):
      i, rest = k.split(".", 2)[1:]
      rest = (rest.replace("attn.qkv.", "attn.in_proj_").replace("attn.proj", "attn.out_proj")
              .replace("norm1", "ln_1").replace("norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc")
              .replace("mlp.fc2", "mlp.c_proj"))
      v[f"visual.transformer.resblocks.{i}.{rest}"] = t
  text = {"token_embedding.weight": np.zeros((10, 8), np.float32), "positional_embedding": np.zeros((4, 8), np.float32),
          "ln_final.weight": np.ones(8, np.float32), "text_projection": np.zeros((8, 16), np.float32),
          "logit_scale": np.zeros((), np.float32), "transformer.resblocks.0.ln_1.weight": np.ones(8, np.float32)}
  return {**v, **text}


def test_openai_clip_tower_matches_timm_filter(tmp_path, capsys):
  from timm.models.vision_transformer import checkpoint_filter_fn
  name = "vit_base_patch16_clip_quickgelu_224"
  src = tiny_timm(name, seed=6, num_classes=16)
  with torch.no_grad():
    src.head.bias.zero_()  # CLIP's projection has no bias
  file = clip_file(src)
  tm = tiny_timm(name, seed=7, num_classes=16)
  tm.load_state_dict(checkpoint_filter_fn({k: torch.from_numpy(np.array(v)) for k, v in file.items()}, tm),
                     strict=True)
  path = str(tmp_path / "ViT-B-16.pt")
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in file.items()}, path)
  model = nnx.eval_shape(lambda: create_model(name, img_size=32, num_classes=16, **TINY))
  report = convert.load_pytorch_weights(model, path)
  assert report.layout.startswith("OpenAI CLIP / OpenCLIP visual tower"), report.layout
  assert sorted(k for k, r in report.skipped.items() if "text tower" in r) == sorted(
      k for k in file if not k.startswith("visual."))
  tokens_close(model, tm)
  img = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  with torch.no_grad():
    ref = tm(torch.from_numpy(img.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, img)["logits"], ref, atol=1e-5)
  assert convert_cli.main(["inspect", path]) == 0
  assert "layout: OpenAI CLIP / OpenCLIP visual tower" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# Positional tables: each family's own resampling, named in the report.
# ----------------------------------------------------------------------------------------------------------
def test_resample_methods_match_their_libraries():
  import torch.nn.functional as F
  from timm.layers import resample_abs_pos_embed
  pos = np.random.RandomState(0).randn(1, 1 + 37 * 37, 8).astype(np.float32)
  grid = torch.from_numpy(pos[:, 1:]).reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
  # DINOv2's interpolate_pos_encoding (interpolate_offset 0.1, no antialias), 37x37 -> 14x14
  ref = F.interpolate(grid, scale_factor=((14 + 0.1) / 37, (14 + 0.1) / 37), mode="bicubic",
                      antialias=False).permute(0, 2, 3, 1).reshape(1, 196, 8).numpy()
  ours = resample_pos_embed(pos, 14, 1, method="dinov2")
  np.testing.assert_allclose(ours[:, 1:], ref, atol=2e-6)
  np.testing.assert_array_equal(ours[:, :1], pos[:, :1])
  # timm's checkpoint_filter_fn: antialiased bicubic
  ref = resample_abs_pos_embed(torch.from_numpy(pos), (14, 14), num_prefix_tokens=1, antialias=True).numpy()
  np.testing.assert_allclose(resample_pos_embed(pos, 14, 1, method="timm"), ref, atol=2e-6)
  # the three differ on a downsampling: the choice matters
  a, b = resample_pos_embed(pos, 14, 1, method="mae"), resample_pos_embed(pos, 14, 1, method="dinov2")
  assert np.abs(a - b).max() > 0.05


def test_dinov2_file_resamples_the_dinov2_way_unless_told(tmp_path):
  tm = tiny_timm("vit_small_patch14_dinov2", grid=5)
  path = str(tmp_path / "dinov2_vits14_pretrain.pth")
  hub = dinov2_hub_file(tm, registers=False)
  torch.save({k: torch.from_numpy(v) for k, v in hub.items()}, path)
  for method, why in [(None, "the DINOv2 family's own"), ("mae", "as asked")]:
    model = create_model("vit_small_patch14_dinov2", img_size=28, **TINY)
    report = convert.load_pytorch_weights(model, path, resample=method)
    want = resample_pos_embed(hub["pos_embed"], 2, 1, method=method or "dinov2")
    np.testing.assert_array_equal(np.asarray(model.pos_embed[...]), want)
    assert f"grid 5x5 -> 2x2 ({'DINOv2' if method is None else 'MAE'}'s bicubic" in str(report)
    assert why in str(report)
  with pytest.raises(convert.ConvertError, match="unknown resample='lanczos'"):
    convert.load_pytorch_weights(model, path, resample="lanczos")
