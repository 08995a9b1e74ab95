"""PyTorch checkpoint import / export: every real file layout, strict accounting, resampling, safety."""

import argparse
import builtins
import os
import re

import numpy as np
import pytest
import torch
from flax import nnx
from timm.layers import resample_abs_pos_embed

from convert_testlib import (MAE_DECODER, TINY, as_torch, assert_close, assert_same, forward, images, nchw,
                             random_weights, timm_vit, tiny, torch_resample)
from tinymim_jax import convert, create_model
from tinymim_jax.convert import cli


# --------------------------------------------------------------------------------------------------------
# Export and round trips.
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling,num_classes", [("cls", 0), ("avg", 10), ("avg", 0), ("cls", 10)])
def test_export_loads_into_timm_with_same_outputs(pooling, num_classes):
  model = tiny(pooling=pooling, num_classes=num_classes)
  convert.load_pytorch_weights(model, random_weights(model))
  exported = convert.export_pytorch_weights(model)
  assert all(v.dtype == np.float32 and v.flags["C_CONTIGUOUS"] for v in exported.values())
  tm = timm_vit(pooling=pooling, num_classes=num_classes, seed=9)
  tm.load_state_dict(as_torch(exported), strict=True)
  assert list(exported) == list(tm.state_dict())  # timm's parameter order, too
  x = images()
  out = forward(model, x)
  with torch.no_grad():
    feats = tm.forward_features(nchw(x))
    assert_close(out["tokens"], feats.numpy())
    assert_close(out["pooled"], tm.forward_head(feats, pre_logits=True).numpy())
    if num_classes:
      assert_close(out["logits"], tm.forward_head(feats).numpy())


def test_import_export_round_trip_is_bit_exact(tmp_path):
  sd = {k: v.numpy() for k, v in timm_vit(pooling="avg", num_classes=10).state_dict().items()}
  model = tiny(pooling="avg", num_classes=10)
  report = convert.load_pytorch_weights(model, sd)
  assert sorted(report.loaded) == sorted(sd) and not report.skipped and not report.missing_kept_init
  assert_same(convert.export_pytorch_weights(model), sd)
  # ... and through both file formats.
  for name in ("w.safetensors", "w.pth"):
    convert.save_pytorch_weights(model, tmp_path / name)
    again = tiny(pooling="avg", num_classes=10, seed=5)
    convert.load_pytorch_weights(again, tmp_path / name)
    assert_same(convert.export_pytorch_weights(again), sd)


def test_head_overrides_load_the_same_file():
  sd = {k: v.numpy() for k, v in timm_vit().state_dict().items()}
  plain, split = tiny(), tiny(head_overrides={2: 8})
  convert.load_pytorch_weights(plain, sd)
  convert.load_pytorch_weights(split, sd)
  assert_same(convert.export_pytorch_weights(split), sd)
  x = images()
  # Same weights: block 1 is identical; the relation block re-splits the same qkv output into 8 heads.
  a, b = plain(x, capture=(1, 2)), split(x, capture=(1, 2))
  np.testing.assert_array_equal(a["blocks"][1]["hidden"], b["blocks"][1]["hidden"])
  q4, q8 = np.asarray(a["blocks"][2]["q"]), np.asarray(b["blocks"][2]["q"])  # (B, H, N, dh)
  np.testing.assert_array_equal(q4.transpose(0, 2, 1, 3).reshape(2, 17, 64), q8.transpose(0, 2, 1, 3).reshape(2, 17, 64))


def test_abstract_model_needs_every_key():
  make = lambda: tiny(pooling="avg", num_classes=10)
  sd = random_weights(make())
  model = nnx.eval_shape(make)  # no random init at all
  convert.load_pytorch_weights(model, sd)
  assert_same(convert.export_pytorch_weights(model), sd)
  del sd["head.bias"]
  with pytest.raises(convert.WeightMismatchError, match=r"head\.bias \(10,\) \(the model is abstract"):
    convert.load_pytorch_weights(nnx.eval_shape(make), sd, allow_missing=[r"^head\."])


# --------------------------------------------------------------------------------------------------------
# Real file layouts.
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mae_file(tmp_path_factory):
  """An MAE pretraining file: {'model': encoder + decoder} (what mae_visualize_vit_*.pth hold)."""
  mae = create_model("mae_vit_tiny_patch16", **TINY, decoder=MAE_DECODER)
  weights = random_weights(mae, seed=1)
  # The fixed tables are not trained: keep them as MAE writes them (float32 sin-cos).
  exported = convert.export_pytorch_weights(mae)
  weights["pos_embed"], weights["decoder_pos_embed"] = exported["pos_embed"], exported["decoder_pos_embed"]
  path = tmp_path_factory.mktemp("mae") / "mae_pretrain_vit_tiny.pth"
  torch.save({"model": as_torch(weights)}, path)
  return path, weights


def test_mae_pretrain_file_into_vit(mae_file):
  path, weights = mae_file
  model = tiny()
  report = convert.load_pytorch_weights(model, path)
  decoder = {k for k in weights if k.startswith("decoder_") or k == "mask_token"}
  assert decoder and set(report.skipped) == decoder
  assert all("decoder" in reason for reason in report.skipped.values())
  assert set(report.loaded) == set(weights) - decoder and not report.missing_kept_init
  assert not report.notes  # the file's sin-cos table equals ours
  assert "MAE pretrain" in report.layout and f"skipped {len(decoder)} (MAE decoder" in str(report)
  assert_same(convert.export_pytorch_weights(model), {k: weights[k] for k in weights if k not in decoder})


def test_mae_pretrain_file_into_mae(mae_file):
  path, weights = mae_file
  mae = create_model("mae_vit_tiny_patch16", **TINY, decoder=MAE_DECODER, seed=4)
  report = convert.load_pytorch_weights(mae, path)
  assert set(report.loaded) == set(weights) and not report.skipped and not report.missing_kept_init
  assert_same(convert.export_pytorch_weights(mae), weights)
  x = images()
  plain = tiny()
  convert.load_pytorch_weights(plain, path)
  np.testing.assert_allclose(plain(x)["tokens"], mae.encoder(x)["tokens"], atol=1e-6)


def test_mae_pretrain_file_as_finetuning_start(mae_file):
  path, weights = mae_file
  model = tiny(pooling="avg", num_classes=10, pos_embed="learn")
  before = convert.export_pytorch_weights(model)
  with pytest.raises(convert.WeightMismatchError) as err:
    convert.load_pytorch_weights(model, path)
  msg = str(err.value)
  for key in ("fc_norm.weight (64,)", "head.weight (10, 64)", "norm.weight (64,)", "allow_missing"):
    assert key in msg
  report = convert.load_pytorch_weights(model, path, allow_missing=[r"^fc_norm\.", r"^head\."])
  assert sorted(report.missing_kept_init) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
  assert {k for k, r in report.skipped.items() if "norm" in r} == {"norm.weight", "norm.bias"}
  after = convert.export_pytorch_weights(model)
  for k in report.missing_kept_init:
    np.testing.assert_array_equal(after[k], before[k])  # kept at init
  np.testing.assert_array_equal(after["pos_embed"], weights["pos_embed"])  # now a learnable Param


def test_mae_finetuned_file(tmp_path):
  tm = timm_vit(pooling="avg", num_classes=10)
  path = tmp_path / "mae_finetuned_vit_tiny.pth"
  torch.save({"model": tm.state_dict()}, path)
  model = tiny(pooling="avg", num_classes=10)
  report = convert.load_pytorch_weights(model, path)
  assert "fine-tuned" in report.layout and not report.skipped
  x = images()
  with torch.no_grad():
    ref = tm(nchw(x)).numpy()
  assert_close(forward(model, x)["logits"], ref)
  assert report.notes and "sin-cos" in report.notes[0]  # a learned table in a fixed-table model is flagged


def tinymim_checkpoint(weights):
  """What TinyMIM's / MAE's misc.save_model writes during training."""
  tm = timm_vit()
  opt = torch.optim.AdamW(tm.parameters(), lr=2.4e-3, betas=(0.9, 0.95))
  tm(torch.zeros(1, 3, 32, 32)).sum().backward()
  opt.step()
  args = argparse.Namespace(model="tinymim_vit_small_patch16", teacher_model="vit_base_patch16",
                            teacher_path="/ckpt/tinymim_base.pth", intermediate=18, batch_size=64, lr=2.4e-3,
                            blr=1.5e-4, min_lr=0.0, weight_decay=0.05, output_dir="./output_dir", log_dir=None,
                            distributed=True, rank=0, gpu=0, world_size=64, dist_backend="nccl", pin_mem=True,
                            cutmix_minmax=None, input_size=224, resume="")
  scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
            "_growth_tracker": 17}
  return {"model": as_torch(weights), "optimizer": opt.state_dict(), "epoch": 299, "scaler": scaler, "args": args}


def test_tinymim_training_checkpoint(tmp_path):
  weights = random_weights(tiny(), seed=2)
  path = tmp_path / "checkpoint-299.pth"
  torch.save(tinymim_checkpoint(weights), path)
  model = tiny(head_overrides={2: 8})  # a student as distilled: 8 heads in the relation block
  report = convert.load_pytorch_weights(model, path)
  assert set(report.skipped) == {"optimizer", "epoch", "scaler", "args"}
  assert all("training state" in r for r in report.skipped.values())
  assert report.layout.startswith("training checkpoint") and set(report.loaded) == set(weights)
  assert_same(convert.export_pytorch_weights(model), weights)


def test_safetensors_and_module_prefix(tmp_path):
  weights = random_weights(tiny(), seed=3)
  from safetensors.numpy import save_file
  save_file(weights, tmp_path / "w.safetensors")
  model = tiny()
  assert len(convert.load_pytorch_weights(model, tmp_path / "w.safetensors").loaded) == len(weights)
  assert_same(convert.export_pytorch_weights(model), weights)
  # DistributedDataParallel's prefix, in memory and in a file.
  ddp = {f"module.{k}": torch.from_numpy(v) for k, v in weights.items()}
  model = tiny(seed=1)
  report = convert.load_pytorch_weights(model, ddp)
  assert set(report.loaded) == set(weights)
  torch.save({"model": ddp}, tmp_path / "ddp.pth")
  model = tiny(seed=2)
  convert.load_pytorch_weights(model, tmp_path / "ddp.pth")
  assert_same(convert.export_pytorch_weights(model), weights)


# --------------------------------------------------------------------------------------------------------
# Strict accounting.
# --------------------------------------------------------------------------------------------------------
def test_strict_errors_list_everything_and_write_nothing(tmp_path):
  model = tiny(pooling="avg", num_classes=10)
  weights = random_weights(model, seed=4)
  del weights["blocks.0.mlp.fc1.bias"], weights["head.weight"]
  weights["blocks.0.attn.qkv.weight"] = weights["blocks.0.attn.qkv.weight"].T.copy()  # (in, out): wrong
  weights["pos_embed"] = np.zeros((1, 16, 64), np.float32)  # 15 patches: no square grid to resample
  weights["dist_token"] = np.zeros((1, 1, 64), np.float32)
  weights["blocks.5.norm1.weight"] = np.ones(64, np.float32)
  path = tmp_path / "broken.pth"
  torch.save({"model": as_torch(weights)}, path)
  before = convert.export_pytorch_weights(model)
  with pytest.raises(convert.WeightMismatchError) as err:
    convert.load_pytorch_weights(model, path)
  assert isinstance(err.value, ValueError)
  msg = str(err.value)
  for expected in ("broken.pth", "2 missing, 2 unexpected, 2 mis-shaped", "blocks.0.mlp.fc1.bias (256,)",
                   "head.weight (10, 64)", "dist_token (1, 1, 64)", "blocks.5.norm1.weight (64,)",
                   "blocks.0.attn.qkv.weight: file (64, 192), model expects (192, 64)",
                   "pos_embed: file (1, 16, 64), model expects (1, 17, 64)", "nothing was written"):
    assert expected in msg, expected
  assert_same(convert.export_pytorch_weights(model), before)  # untouched

  # strict=False reports the missing and unexpected keys but still refuses mis-shaped ones.
  with pytest.raises(convert.WeightMismatchError, match="0 missing, 0 unexpected, 2 mis-shaped"):
    convert.load_pytorch_weights(model, path, strict=False)
  assert_same(convert.export_pytorch_weights(model), before)

  # Skipping / allowing each of them by name makes it load.
  report = convert.load_pytorch_weights(
      model, path, skip=[r"^dist_token$", r"^blocks\.5\.", r"^blocks\.0\.attn\.qkv\.weight$", r"^pos_embed$"],
      allow_missing=[r"^blocks\.0\.", r"^head\.weight$", r"^pos_embed$"])
  assert report.skipped["dist_token"].startswith("matches skip pattern")
  assert sorted(report.missing_kept_init) == ["blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.bias", "head.weight",
                                               "pos_embed"]
  after = convert.export_pytorch_weights(model)
  np.testing.assert_array_equal(after["head.weight"], before["head.weight"])
  np.testing.assert_array_equal(after["head.bias"], weights["head.bias"])


def test_skipping_a_needed_key_is_missing():
  weights = random_weights(tiny())
  with pytest.raises(convert.WeightMismatchError, match=r"norm\.weight \(64,\) \(skipped by"):
    convert.load_pytorch_weights(tiny(), weights, skip=[r"^norm\.weight$"])


# --------------------------------------------------------------------------------------------------------
# Positional table resampling.
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("old,new,prefix", [(14, 16, 1), (14, 24, 1), (16, 14, 1), (14, 7, 1), (2, 5, 2), (7, 7, 1),
                                            (3, 1, 1), (16, 37, 1)])
def test_resample_matches_torch_bicubic(old, new, prefix):
  # Values in [-1, 1] like a sin-cos table. torch sums the 16 taps in float32, which alone is good to a few
  # float32 ulps of the values (~3e-7 here): that, not the method, bounds the agreement.
  pos = np.random.RandomState(old * new).uniform(-1, 1, (1, prefix + old * old, 24)).astype(np.float32)
  got = convert.resample_pos_embed(pos, new, num_prefix_tokens=prefix)
  assert got.dtype == np.float32 and got.shape == (1, prefix + new * new, 24)
  np.testing.assert_allclose(got, torch_resample(pos, new, prefix), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(got[:, :prefix], pos[:, :prefix])  # prefix tokens kept as they are
  timm = resample_abs_pos_embed(torch.from_numpy(pos), [new, new], num_prefix_tokens=prefix, antialias=False)
  np.testing.assert_allclose(got, timm.numpy(), rtol=0, atol=1e-6)


def test_load_resamples_pos_embed_14_to_16():
  shape = dict(img_size=224, patch_size=16, embed_dim=64, depth=1, num_heads=4)
  src = create_model("vit_tiny_patch16", **shape, pos_embed="learn")
  weights = random_weights(src, seed=6)
  model = create_model("vit_tiny_patch16", **{**shape, "img_size": 256}, pos_embed="learn")
  report = convert.load_pytorch_weights(model, weights)
  assert report.resampled == {"pos_embed": ((14, 14), (16, 16))} and "14x14 -> 16x16" in str(report)
  got = np.asarray(model.pos_embed[...])
  np.testing.assert_allclose(got, torch_resample(weights["pos_embed"], 16), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(got[0, 0], weights["pos_embed"][0, 0])
  # Into a fixed sin-cos model the resampled table is loaded as well (it is what the file holds), and the
  # report notes that it differs from the table the model would build for its grid.
  sincos = create_model("vit_tiny_patch16", **{**shape, "img_size": 256})
  report = convert.load_pytorch_weights(sincos, weights)
  np.testing.assert_array_equal(np.asarray(sincos.pos_embed[...]), got)
  assert report.resampled and "sin-cos" in report.notes[0]


# --------------------------------------------------------------------------------------------------------
# Pickle safety.
# --------------------------------------------------------------------------------------------------------
class Payload:
  """Pickles as a call of `fn(*args)`: what a malicious checkpoint runs on torch.load(weights_only=False)."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_malicious_pickle_is_refused(tmp_path, kind):
  marker = tmp_path / "pwned"
  payload = (Payload(os.system, f"touch {marker}") if kind == "os.system" else
             Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"))
  path = tmp_path / "evil.pth"
  torch.save({"model": as_torch(random_weights(tiny())), "args": payload}, path)
  model = tiny()
  before = convert.export_pytorch_weights(model)
  with pytest.raises(convert.UnsafeCheckpointError) as err:
    convert.load_pytorch_weights(model, path)
  msg = str(err.value)
  assert "evil.pth" in msg and ("system" in msg if kind == "os.system" else "builtins.exec" in msg)
  assert not marker.exists()
  assert_same(convert.export_pytorch_weights(model), before)
  assert cli.main(["inspect", str(path)]) == 1 and not marker.exists()


def test_only_namespace_is_allowed(tmp_path):
  path = tmp_path / "np_args.pth"
  torch.save({"model": {}, "args": argparse.Namespace(lr=np.float64(1e-3))}, path)
  with pytest.raises(convert.UnsafeCheckpointError, match="numpy"):
    convert.read_pytorch_weights(path)


# --------------------------------------------------------------------------------------------------------
# The safe loader's floor.
# --------------------------------------------------------------------------------------------------------
def test_torch_with_a_weights_only_bypass_is_refused(tmp_path, monkeypatch):
  weights = random_weights(tiny())
  convert.save_pytorch_weights(weights, tmp_path / "w.pth")
  convert.save_pytorch_weights(weights, tmp_path / "w.safetensors")
  for version in ("2.5.1", "2.4.0+cu121", "1.13.1"):
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(convert.UnsafeCheckpointError, match=rf"torch {re.escape(version)}: .*CVE-2025-32434"):
      convert.read_pytorch_weights(tmp_path / "w.pth")
  assert convert.read_pytorch_weights(tmp_path / "w.safetensors")[0]  # no torch involved
  monkeypatch.setattr(torch, "__version__", "2.6.0")
  assert convert.read_pytorch_weights(tmp_path / "w.pth")[0]


def test_torch_extra_floor_excludes_known_bypasses():
  import tomllib
  from packaging.requirements import Requirement
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    extra = tomllib.load(f)["project"]["optional-dependencies"]["torch"]
  spec = next(Requirement(r) for r in extra if Requirement(r).name == "torch").specifier
  assert not any(spec.contains(v) for v in ("2.4.0", "2.5.1", "2.5.99", "1.13.1"))
  assert spec.contains("2.6.0") and spec.contains(torch.__version__.split("+")[0])
