"""PyTorch checkpoint import / export: every real file layout, strict accounting, resampling, safety."""

import argparse
import builtins
import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from timm.layers import resample_abs_pos_embed

from convert_testlib import (MAE_DECODER, TINY, as_torch, assert_close, assert_same, forward, images, nchw,
                             random_weights, timm_vit, tiny, torch_resample)
from tinymim_jax import convert, create_model
from tinymim_jax import convert_cli as cli


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


def test_float64_file_keeps_its_precision_up_to_the_param_dtype(tmp_path):
  import jax
  sd64 = {k: v.astype(np.float64) + 1e-12 for k, v in random_weights(tiny()).items()}  # not float32 values
  convert.save_pytorch_weights(sd64, tmp_path / "w64.pth")
  convert.save_pytorch_weights(sd64, tmp_path / "w64.safetensors")
  with jax.enable_x64(True):
    for source in (sd64, as_torch(sd64), tmp_path / "w64.pth", tmp_path / "w64.safetensors"):
      model = tiny(dtype="float64", param_dtype="float64")
      report = convert.load_pytorch_weights(model, source)
      assert not any("rounded" in n for n in report.notes)
      assert_same(convert.export_pytorch_weights(model), sd64)  # float64 in, float64 out, bit for bit
  # Into a float32 model: rounded as before, and said so.
  model = tiny()
  report = convert.load_pytorch_weights(model, tmp_path / "w64.pth")
  assert any("rounded to the model's param_dtype" in n and "float64 -> float32" in n for n in report.notes)
  assert_same(convert.export_pytorch_weights(model), {k: v.astype(np.float32) for k, v in sd64.items()})


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
# Half precision: the file's dtype is kept until the model's parameters take the values.
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_file_dtype_is_kept_and_cast_into_the_model(tmp_path, dtype, ext):
  model = tiny()
  weights = convert.cast_weights(random_weights(model, seed=7), dtype)
  path = tmp_path / f"w{ext}"
  convert.save_pytorch_weights(weights, path)
  read = convert.read_pytorch_weights(path)[0]
  assert {v.dtype.name for v in read.values()} == {dtype}
  assert_same(read, weights)  # bit for bit, bfloat16 too
  report = convert.load_pytorch_weights(model, path)
  assert report.dtypes == (dtype if dtype == "float32" else f"{dtype} -> float32") and f"({report.dtypes})" in str(report)
  exported = convert.export_pytorch_weights(model)
  assert all(v.dtype == np.float32 for v in exported.values())
  # Widening is exact; float64 rounds to the float32 parameters.
  assert_same(exported, {k: v.astype(np.float32) for k, v in weights.items()})
  if ext == ".pth" and dtype == "bfloat16":  # torch reads it as its own bfloat16
    sd = torch.load(path, weights_only=True)["model"]
    assert sd["cls_token"].dtype == torch.bfloat16
    np.testing.assert_array_equal(sd["cls_token"].float().numpy(), weights["cls_token"].astype(np.float32))


def test_cast_weights_refuses_overflow():
  with pytest.raises(convert.ConvertError, match=r"big: values up to 70000 overflow float16"):
    convert.cast_weights({"big": np.array([70000.0], np.float32)}, "float16")
  out = convert.cast_weights({"n": np.array([1, 2], np.int64), "x": np.ones(2, np.float64)}, "bfloat16")
  assert out["n"].dtype == np.int64 and out["x"].dtype.name == "bfloat16"


# --------------------------------------------------------------------------------------------------------
# EMA copies: timm's choice (load_checkpoint(use_ema=True) by default).
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ema_files(tmp_path_factory):
  """A timm train.py checkpoint (state_dict + state_dict_ema) and a DeiT one (model + model_ema)."""
  raw = timm_vit(seed=1).state_dict()
  ema = timm_vit(seed=2).state_dict()
  d = tmp_path_factory.mktemp("ema")
  timm_ckpt = {"epoch": 9, "arch": "vit_tiny_patch16_224", "state_dict": raw, "optimizer": {}, "version": 2,
               "args": argparse.Namespace(model_ema=True), "metric": 0.5, "state_dict_ema": ema}
  deit_ckpt = {"model": raw, "optimizer": {}, "lr_scheduler": {}, "epoch": 9, "model_ema": ema, "scaler": {},
               "args": argparse.Namespace(model_ema=True)}
  torch.save(timm_ckpt, d / "timm_train.pth.tar")
  torch.save(deit_ckpt, d / "deit.pth")
  return d, raw, ema


@pytest.mark.parametrize("name,ema_entry,raw_entry", [("timm_train.pth.tar", "state_dict_ema", "state_dict"),
                                                      ("deit.pth", "model_ema", "model")])
def test_ema_copy_is_loaded_by_default_as_timm_does(ema_files, name, ema_entry, raw_entry):
  from timm.models import load_checkpoint
  d, raw, ema = ema_files
  for use_ema, want, entry, other in ((True, ema, ema_entry, raw_entry), (False, raw, raw_entry, ema_entry)):
    tm = timm_vit(seed=3)
    load_checkpoint(tm, str(d / name), use_ema=use_ema)  # timm's own choice is the reference
    assert_same({k: v.numpy() for k, v in tm.state_dict().items()}, {k: v.numpy() for k, v in want.items()})
    model = tiny()
    report = (convert.load_pytorch_weights(model, d / name) if use_ema else
              convert.load_pytorch_weights(model, d / name, ema=False))
    assert_same(convert.export_pytorch_weights(model), {k: v.numpy() for k, v in tm.state_dict().items()})
    line = f"weights: {entry!r} ({'the EMA copy' if use_ema else 'the raw weights, not the EMA copy'}; " \
           f"ema={not use_ema} loads {other!r})"
    assert line in str(report), str(report)
    assert report.skipped[other].startswith("the EMA copy" if not use_ema else "the raw weights")
  # In the main job's words: the config field that flips it.
  report = convert.load_pytorch_weights(tiny(), d / name, hint_context={"ema": "teacher.ema"})
  assert f"--config.teacher.ema=false loads {raw_entry!r}" in str(report)


def test_only_an_ema_copy_with_ema_false_is_an_error(tmp_path):
  torch.save({"model_ema": timm_vit().state_dict(), "epoch": 1}, tmp_path / "ema_only.pth")
  assert convert.load_pytorch_weights(tiny(), tmp_path / "ema_only.pth").loaded
  with pytest.raises(convert.ConvertError, match=r"only the EMA copy 'model_ema'.*ema=True"):
    convert.load_pytorch_weights(tiny(), tmp_path / "ema_only.pth", ema=False)


# --------------------------------------------------------------------------------------------------------
# Wrapper prefixes.
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["module.", "model.", "backbone.", "encoder.", "student.", "_orig_mod.module.",
                                    "model.backbone."])
def test_wrapper_prefix_is_found_removed_and_reported(prefix):
  weights = random_weights(tiny(), seed=8)
  wrapped = {prefix + k: v for k, v in weights.items()}
  wrapped["neck.proj.weight"] = np.zeros((2, 2), np.float32)  # another part of the wrapper
  model = tiny()
  report = convert.load_pytorch_weights(model, wrapped)
  assert set(report.loaded) == set(weights)
  assert f"prefix: {prefix!r} removed from every key" in str(report)
  assert report.skipped["neck.proj.weight"] == f"outside the model's key prefix {prefix!r}"
  assert_same(convert.export_pytorch_weights(model), weights)


def test_two_models_in_one_file_are_chosen_by_name(tmp_path):
  student, teacher = random_weights(tiny(), seed=1), random_weights(tiny(), seed=2)
  dino = {**{f"student.backbone.{k}": v for k, v in student.items()},
          **{f"teacher.backbone.{k}": v for k, v in teacher.items()}, "student.head.mlp.0.weight": np.zeros(3)}
  path = tmp_path / "dino.pth"
  torch.save({"model": as_torch(dino)}, path)
  for context, fixes in (("api", ["prefix='student.backbone'", "prefix='teacher.backbone'"]),
                         ("cli", ["--prefix student.backbone", "--prefix teacher.backbone"]),
                         ({"prefix": "init_prefix"}, ["--config.init_prefix=student.backbone"])):
    with pytest.raises(convert.AmbiguousCheckpointError) as err:
      convert.load_pytorch_weights(tiny(), path, hint_context=context)
    assert "dino.pth holds 2 models" in str(err.value) and "'student.backbone.' (30 keys)" in str(err.value)
    assert all(f in str(err.value) for f in fixes), str(err.value)
  for name, want in (("teacher", teacher), ("student.backbone", student), ("student.backbone.", student)):
    model = tiny()
    report = convert.load_pytorch_weights(model, path, prefix=name)
    assert_same(convert.export_pytorch_weights(model), want)
  assert "student.head.mlp.0.weight" in report.skipped
  with pytest.raises(convert.ConvertError, match="prefix 'pupil' names none"):
    convert.load_pytorch_weights(tiny(), path, prefix="pupil")


# --------------------------------------------------------------------------------------------------------
# Parts the job never runs.
# --------------------------------------------------------------------------------------------------------
def test_depth_loads_only_what_runs_and_still_needs_all_of_it():
  ft = {k: v.numpy() for k, v in timm_vit(pooling="avg", num_classes=10, seed=4).state_dict().items()}
  assert "norm.weight" not in ft  # a fine-tuned tail: fc_norm + head, no final norm
  teacher = tiny(depth=1)  # what objectives.distill.make_teacher builds for teacher_block 1
  before = convert.export_pytorch_weights(teacher)
  report = convert.load_pytorch_weights(teacher, ft, depth=1)
  unused = {k for k in ft if k.startswith(("blocks.1.", "fc_norm.", "head."))}
  assert {k for k, r in report.skipped.items() if r == "not run: this job runs blocks 1..1 only"} == unused
  assert set(report.loaded) == set(ft) - unused and report.unused_kept_init == ["norm.weight", "norm.bias"]
  assert "not run by this job, kept at init (2): norm.weight, norm.bias" in str(report)
  np.testing.assert_array_equal(convert.export_pytorch_weights(teacher)["norm.weight"], before["norm.weight"])
  # Block 1 computes what the full fine-tuned model's block 1 computes.
  full = tiny(pooling="avg", num_classes=10)
  convert.load_pytorch_weights(full, ft)
  x = images()
  np.testing.assert_array_equal(teacher(x, depth=1, capture=(1,))["blocks"][1]["q"],
                                full(x, depth=1, capture=(1,))["blocks"][1]["q"])
  del ft["blocks.0.mlp.fc2.bias"]
  with pytest.raises(convert.WeightMismatchError, match=r"(?s)1 missing.*blocks\.0\.mlp\.fc2\.bias \(64,\)"):
    convert.load_pytorch_weights(tiny(depth=1), ft, depth=1)


@pytest.mark.parametrize("context,skip_fix,missing_fix", [
    ("api", "skip=(r'^head\\.',)", "skip=(r'^head\\.',), allow_missing=(r'^head\\.',)"),
    ("cli", "--skip '^head\\.'", "--skip '^head\\.' --allow-missing '^head\\.'"),
    ({"skip": "init_skip"}, "--config.init_skip='^head\\.'", None),
])
def test_hints_name_what_the_user_can_type_there(context, skip_fix, missing_fix):
  ft = {k: v.numpy() for k, v in timm_vit(pooling="avg", num_classes=10).state_dict().items()}
  # A class-count mismatch (the file's head has 10 classes, the model 5).
  with pytest.raises(convert.WeightMismatchError) as err:
    convert.load_pytorch_weights(tiny(pooling="avg", num_classes=5), ft, hint_context=context)
  msg = str(err.value)
  assert (f"another number of classes; to start a fresh head: {missing_fix}" in msg) == (missing_fix is not None)
  assert "skip=" not in msg if context != "api" else True
  # With the head allowed missing (as the trainer does for fine-tuning), skipping it is the whole fix.
  with pytest.raises(convert.WeightMismatchError) as err:
    convert.load_pytorch_weights(tiny(pooling="avg", num_classes=5), ft, allow_missing=[r"head\..*"],
                                 hint_context=context)
  assert f"to start a fresh head: {skip_fix}" in str(err.value)
  # A part the model does not have (DeiT's distillation token).
  weights = random_weights(tiny())
  weights["dist_token"] = np.zeros((1, 1, 64), np.float32)
  with pytest.raises(convert.WeightMismatchError) as err:
    convert.load_pytorch_weights(tiny(), weights, hint_context=context)
  want = skip_fix.replace("head\\.", "dist_token$")
  assert f"to ignore the file's dist_token (the model has no such part): {want}" in str(err.value)


# --------------------------------------------------------------------------------------------------------
# Damaged and foreign files.
# --------------------------------------------------------------------------------------------------------
def _safetensors_parts():
  from safetensors.numpy import save
  blob = save({"a": np.zeros(10, np.float32)})
  n = int.from_bytes(blob[:8], "little")
  return blob, n, blob[8:8 + n], blob[8 + n:]


def damaged_files(d):
  """{file name: what the error says} for every kind of damage."""
  blob, n, header, data = _safetensors_parts()
  good = d / "good.pth"
  torch.save({"model": {"a": torch.zeros(1000)}}, good)
  raw = good.read_bytes()
  bad_offsets = header.replace(b"[0,40]", b"[0,4000]")
  assert bad_offsets != header
  files = {
      "empty.pth": (b"", "the file is empty"),
      "notes.pth": (b"hello world\n", "not a PyTorch checkpoint (neither a zip archive nor a pickle"),
      "truncated.pth": (raw[:len(raw) // 2], "damaged or truncated PyTorch checkpoint"),
      "garbage_pickle.pth": (b"\x80\x02garbage", "damaged"),
      "short.safetensors": (b"abc", "shorter than the 8-byte header length"),
      "huge_header.safetensors": ((2 ** 62).to_bytes(8, "little") + header + data,
                                  f"header length {2 ** 62} runs past the end of the file"),
      "past_end.safetensors": ((len(blob)).to_bytes(8, "little") + header + data, "runs past the end of the file"),
      "not_utf8.safetensors": ((4).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc" + data, "header is not UTF-8"),
      "not_json.safetensors": ((4).to_bytes(8, "little") + b"{{{{" + data, "header is not JSON"),
      "offsets.safetensors": (len(bad_offsets).to_bytes(8, "little") + bad_offsets + data,
                              "tensor 'a': data_offsets [0, 4000] outside the 40 data bytes"),
  }
  for name, (content, _) in files.items():
    (d / name).write_bytes(content)
  return {name: what for name, (_, what) in files.items()}


def test_damaged_files_are_one_clear_error(tmp_path):
  for name, what in damaged_files(tmp_path).items():
    with pytest.raises(convert.UnreadableFileError) as err:
      convert.read_checkpoint(tmp_path / name)
    msg = str(err.value)
    assert msg.startswith(f"cannot read {tmp_path / name}: ") and what in msg and "\n" not in msg, msg
  with pytest.raises(convert.MissingSourceError, match="no such checkpoint file"):
    convert.read_checkpoint(tmp_path / "absent.pth")


# --------------------------------------------------------------------------------------------------------
# What the weights cannot say: the architecture beside them.
# --------------------------------------------------------------------------------------------------------
def test_sidecar_records_every_vit_field_and_the_heads(tmp_path):
  from tinymim_jax.models import ViTConfig
  model = tiny(num_heads=8, head_overrides={2: 16}, pooling="avg", num_classes=10)
  convert.save_pytorch_weights(model, tmp_path / "tinymim_t.safetensors")
  side = json.loads((tmp_path / "tinymim_t.config.json").read_text())
  assert set(side["model_args"]) == {f.name for f in dataclasses.fields(ViTConfig)}
  assert side["heads_per_block"] == [8, 16] and side["model_args"]["head_overrides"] == {"2": 16}
  assert (side["img_size"], side["patch_size"], side["embed_dim"], side["depth"], side["num_classes"],
          side["global_pool"], side["library"]) == (32, 8, 64, 2, 10, "avg", "tinymim_jax")
  name, overrides, decoder = convert.sidecar_model(side)
  assert create_model(name, **overrides).config == model.config and decoder is None
  # The load report says where the heads came from, or that they were assumed.
  assert "heads: 8 per block (block 2: 16), as tinymim_t.config.json records" in str(
      convert.load_pytorch_weights(tiny(num_heads=8, head_overrides={2: 16}, pooling="avg", num_classes=10),
                                   tmp_path / "tinymim_t.safetensors"))
  report = convert.load_pytorch_weights(tiny(pooling="avg", num_classes=10), tmp_path / "tinymim_t.safetensors")
  assert ("heads: the model's 4 per block, but tinymim_t.config.json records 8 per block (block 2: 16): the same "
          "weights split into other heads") in str(report)
  sd = convert.export_pytorch_weights(model)
  assert "heads: not stored in the file; assumed the model's 4 per block" in str(
      convert.load_pytorch_weights(tiny(pooling="avg", num_classes=10), sd))
  # An MAE's sidecar carries its decoder too.
  mae = create_model("mae_vit_tiny_patch16", **TINY, decoder=MAE_DECODER)
  convert.save_pytorch_weights(mae, tmp_path / "mae.pth")
  side = convert.read_sidecar(tmp_path / "mae.pth")
  name, overrides, decoder = convert.sidecar_model(side)
  assert name == "mae_vit_tiny_patch16" and create_model(name, decoder=decoder, **overrides).config == mae.config


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


def test_authors_segmentation_backbone_keys():
  """BEiT-style keys of the authors' segmentation backbone: relative_position_bias_table (loaded),
  relative_position_index (checked against ours, skipped), gamma_1 / gamma_2 (loaded as ls1 / ls2 gamma)."""
  from timm.models.beit import gen_relative_position_index
  shape = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
  kw = dict(**shape, use_rel_pos_bias=True, init_values=1.0, pos_embed="learn")
  src = create_model("vit_tiny_patch16", **kw)
  rng = np.random.RandomState(0)
  for blk in src.blocks:  # non-trivial values: zero tables and unit gammas would hide a missed key
    blk.attn.relative_position_bias_table[...] = rng.randn(*blk.attn.relative_position_bias_table.shape)
    blk.ls1.gamma[...] = rng.randn(64)
    blk.ls2.gamma[...] = rng.randn(64)
  weights = {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): torch.from_numpy(np.array(v))
             for k, v in convert.export_pytorch_weights(src).items()}
  assert "blocks.1.gamma_2" in weights and "blocks.1.attn.relative_position_bias_table" in weights
  for i in range(2):
    weights[f"blocks.{i}.attn.relative_position_index"] = gen_relative_position_index((4, 4))
  dst = create_model("vit_tiny_patch16", **kw)
  report = convert.load_pytorch_weights(dst, weights)
  assert "blocks.0.ls1.gamma" in report.loaded and "blocks.0.attn.relative_position_bias_table" in report.loaded
  assert "fixed index" in report.skipped["blocks.1.attn.relative_position_index"]
  for a, b in zip(jax.tree.leaves(nnx.state(src, nnx.Param)), jax.tree.leaves(nnx.state(dst, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  weights["blocks.0.attn.relative_position_index"] = gen_relative_position_index((4, 4)).flip(0)
  with pytest.raises(convert.WeightMismatchError, match="differs from BEiT's index"):
    convert.load_pytorch_weights(create_model("vit_tiny_patch16", **kw), weights)
