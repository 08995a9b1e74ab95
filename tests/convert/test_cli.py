"""The converter's command line: import, export, inspect, help (in-process; `python -m tinymim_jax.convert` runs in
subprocesses in tests/test_main.py::test_finetune_from_distilled_student_then_eval_and_export and tests/test_gcs.py)."""

import argparse
import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from convert_testlib import assert_same, random_weights, timm_vit, tiny, torch_resample
from tinymim_jax import convert, create_model
from tinymim_jax import convert_cli as cli


@pytest.fixture(scope="module")
def finetuned_vit_tiny(tmp_path_factory):
  """A fine-tuned ViT-T/16 training checkpoint, as MAE's main_finetune writes it."""
  shape = dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3)
  tm = timm_vit(shape, pooling="avg", num_classes=1000)
  path = tmp_path_factory.mktemp("cli") / "mae_finetuned_vit_tiny.pth"
  torch.save({"model": tm.state_dict(), "epoch": 99, "args": argparse.Namespace(nb_classes=1000)}, path)
  return path, {k: v.numpy() for k, v in tm.state_dict().items()}


def test_cli_import(finetuned_vit_tiny, tmp_path, capsys):
  src, weights = finetuned_vit_tiny
  out = tmp_path / "vit_t_256.safetensors"
  rc = cli.main(["import", str(src), "--model", "vit_tiny_patch16", "--img-size", "256",
                     "--pos-embed", "learn", "--out", str(out)])
  printed = capsys.readouterr().out
  assert rc == 0 and "resampled pos_embed: grid 14x14 -> 16x16" in printed and "skipped 2" in printed
  from safetensors.numpy import load_file
  written = load_file(out)
  assert set(written) == set(weights)  # (safetensors stores keys sorted)
  assert written["pos_embed"].shape == (1, 257, 192)
  np.testing.assert_allclose(written["pos_embed"], torch_resample(weights["pos_embed"], 16), atol=1e-6)
  for k in weights:
    if k != "pos_embed":
      np.testing.assert_array_equal(written[k], weights[k], err_msg=k)
  # The written file loads into the 256 model as is.
  model = nnx.eval_shape(lambda: create_model("vit_tiny_patch16", img_size=256, pooling="avg", num_classes=1000))
  assert not convert.load_pytorch_weights(model, out).resampled


def test_cli_import_reports_mismatch(finetuned_vit_tiny, tmp_path, capsys):
  src, _ = finetuned_vit_tiny
  rc = cli.main(["import", str(src), "--model", "vit_small_patch16", "--out", str(tmp_path / "x.safetensors")])
  err = capsys.readouterr().err
  assert rc == 1 and "mae_finetuned_vit_tiny.pth" in err and "cls_token: file (1, 1, 192), model expects (1, 1, 384)" in err
  assert not (tmp_path / "x.safetensors").exists()


def test_cli_inspect(finetuned_vit_tiny, capsys):
  src, weights = finetuned_vit_tiny
  assert cli.main(["inspect", str(src)]) == 0
  printed = capsys.readouterr().out
  assert "vit_tiny_patch16 (D 192, depth 12, patch 16, grid 14x14 = img 224, 1000 classes)" in printed
  assert "fine-tuned" in printed and "entry:  args" in printed
  assert "blocks.0.attn.qkv.weight" in printed and "(576, 192)" in printed


def test_cli_export_weights_and_workdir(finetuned_vit_tiny, tmp_path, monkeypatch, capsys):
  src, weights = finetuned_vit_tiny
  out = tmp_path / "converted.safetensors"
  assert cli.main(["export", "--weights", str(src), "--out", str(out)]) == 0
  back = tmp_path / "back.pth"
  assert cli.main(["export", "--safetensors", str(out), "--out", str(back)]) == 0
  assert_same(convert.read_pytorch_weights(back)[0], weights)

  # --workdir restores through builders.restore_model (stubbed here; tests/test_main.py runs the real one).
  student = tiny()
  monkeypatch.setattr(cli.builders, "restore_model", lambda d: student)
  assert cli.main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "s.pth")]) == 0
  assert_same(convert.read_pytorch_weights(tmp_path / "s.pth")[0], convert.export_pytorch_weights(student))
  monkeypatch.undo()
  capsys.readouterr()
  assert cli.main(["export", "--workdir", str(tmp_path / "not_a_run"), "--out", str(tmp_path / "t.pth")]) == 1
  assert "not a tinymim-jax workdir" in capsys.readouterr().err and not (tmp_path / "t.pth").exists()


@pytest.mark.parametrize("command", ["import", "export", "inspect"])
def test_cli_help_has_examples(command, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main([command, "--help"])
  assert exit_.value.code == 0
  assert "Example" in capsys.readouterr().out


def test_cli_top_level_help(capsys):
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  assert "Example" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------
# Half precision, EMA copies, prefixes, damaged files and heads, from the command line.
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tinymim_t_like():
  """A small ViT whose heads differ from its variant's (like TinyMIM-T: 6 heads, 12 in its relation block)."""
  model = tiny(num_heads=8, head_overrides={2: 16})
  convert.load_pytorch_weights(model, random_weights(model, seed=5))
  return model


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_cli_conversions_keep_the_dtype_or_take_dtype(tinymim_t_like, tmp_path, capsys, dtype):
  src = tmp_path / "x.safetensors"
  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  original = {k: v.astype(np_dtype) for k, v in convert.export_pytorch_weights(tinymim_t_like).items()}
  save_file(original, src)  # as a hub / timm file holds it: safetensors via numpy (bfloat16 through ml_dtypes)
  n = len(original)
  # export --weights: .safetensors -> .pth -> .safetensors, each keeping the dtype, bit for bit.
  assert cli.main(["export", "--weights", str(src), "--out", str(tmp_path / "x.pth")]) == 0
  assert f"wrote {n} tensors ({dtype}, as in the source) from x.safetensors" in capsys.readouterr().out
  sd = torch.load(tmp_path / "x.pth", weights_only=True)["model"]
  assert {str(v.dtype) for v in sd.values()} == {f"torch.{dtype}"}
  assert cli.main(["export", "--weights", str(tmp_path / "x.pth"), "--out", str(tmp_path / "y.safetensors")]) == 0
  assert_same(convert.read_checkpoint(tmp_path / "y.safetensors").weights, original)
  other = "bfloat16" if dtype != "bfloat16" else "float16"
  assert cli.main(["export", "--weights", str(src), "--out", str(tmp_path / "z.pth"), "--dtype", other]) == 0
  assert f"({other}, --dtype)" in capsys.readouterr().out
  assert {v.dtype.name for v in convert.read_checkpoint(tmp_path / "z.pth").weights.values()} == {other}
  # import: validated through the model (float32 parameters), written back in the file's dtype; the heads come
  # from the architecture beside the file.
  (tmp_path / "x.config.json").write_text(json.dumps(convert.architecture(tinymim_t_like)))
  assert cli.main(["import", str(tmp_path / "x.pth"), "--out", str(tmp_path / "i.safetensors")]) == 0
  printed = capsys.readouterr().out
  assert f"wrote {n} tensors ({dtype}, as in the file;" in printed
  assert (f"{dtype} -> float32" if dtype != "float32" else "(float32)") in printed
  assert ("were rounded to it" in printed) == (dtype == "float64")
  imported = convert.read_checkpoint(tmp_path / "i.safetensors").weights
  if dtype != "float64":
    assert_same(imported, original)
  else:
    assert_same(imported, {k: v.astype(np.float32).astype(np.float64) for k, v in original.items()})
  assert cli.main(["import", str(src), "--dtype", other, "--out", str(tmp_path / "j.pth")]) == 0
  assert f"({other}, --dtype;" in capsys.readouterr().out
  # export --workdir: the run's float32, or --dtype.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(cli.builders, "restore_model", lambda d: tinymim_t_like)
    assert cli.main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "s.pth"), "--dtype", dtype]) == 0
  assert f"({dtype}, --dtype;" in capsys.readouterr().out
  assert_same(convert.read_checkpoint(tmp_path / "s.pth").weights, original)


def test_cli_ema_and_prefix_flags(tmp_path, capsys):
  raw, ema = timm_vit(seed=1).state_dict(), timm_vit(seed=2).state_dict()
  path = tmp_path / "lightning.pth"
  torch.save({"state_dict": {f"model.{k}": v for k, v in raw.items()},
              "state_dict_ema": {f"model.{k}": v for k, v in ema.items()}, "epoch": 3}, path)
  assert cli.main(["inspect", str(path)]) == 0
  printed = capsys.readouterr().out
  assert "weights: 'state_dict_ema' (the EMA copy; --no-ema loads 'state_dict')" in printed
  assert "prefix: 'model.' removed from every key (a wrapper's)" in printed
  assert "entry:  state_dict (the raw weights beside the EMA copy)" in printed
  assert cli.main(["inspect", "--no-ema", str(path)]) == 0
  assert "weights: 'state_dict' (the raw weights, not the EMA copy; --ema loads 'state_dict_ema')" in \
      capsys.readouterr().out
  for flag, want in (("--ema", ema), ("--no-ema", raw)):
    out = tmp_path / f"{flag}.safetensors"
    assert cli.main(["export", "--weights", str(path), flag, "--out", str(out)]) == 0
    assert_same(convert.read_checkpoint(out).weights, {k: v.numpy() for k, v in want.items()})
  # Two models in one file: the error lists them with the flag to choose; --prefix chooses.
  both = tmp_path / "both.pth"
  torch.save({**{f"student.{k}": v for k, v in raw.items()}, **{f"teacher.{k}": v for k, v in ema.items()}}, both)
  capsys.readouterr()
  assert cli.main(["inspect", str(both)]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: both.pth holds 2 models") and "--prefix student" in err and "--prefix teacher" in err
  assert cli.main(["export", "--weights", str(both), "--prefix", "teacher", "--out", str(tmp_path / "t.pth")]) == 0
  assert_same(convert.read_checkpoint(tmp_path / "t.pth").weights, {k: v.numpy() for k, v in ema.items()})


def test_cli_damaged_files_give_one_error_line(tmp_path, capsys):
  from test_convert import damaged_files
  for name, what in damaged_files(tmp_path).items():
    for argv in (["inspect", str(tmp_path / name)],
                 ["export", "--weights", str(tmp_path / name), "--out", str(tmp_path / "o.safetensors")],
                 ["import", str(tmp_path / name), "--model", "vit_tiny_patch16", "--out", str(tmp_path / "o.pth")]):
      assert cli.main(argv) == 1, argv
      err = capsys.readouterr().err
      assert err.count("\n") == 1 and err.startswith(f"error: cannot read {tmp_path / name}: ") and what in err, err
  assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.pth").exists()


def test_cli_not_a_workdir_is_left_untouched(tmp_path, capsys):
  plain = tmp_path / "photos"
  plain.mkdir()
  assert cli.main(["export", "--workdir", str(plain), "--out", str(tmp_path / "s.pth")]) == 1
  assert "is not a tinymim-jax workdir: it has no checkpoints/ directory" in capsys.readouterr().err
  assert os.listdir(plain) == [] and not (tmp_path / "s.pth").exists()


def test_cli_heads_round_trip_through_the_sidecar(tinymim_t_like, tmp_path, capsys):
  src = tmp_path / "tinymim_t.pth"
  convert.save_pytorch_weights(tinymim_t_like, src)
  assert cli.main(["inspect", str(src)]) == 0
  assert ("heads:  not stored in the weights; tinymim_t.config.json records 8 per block (block 2: 16) "
          "(vit_custom)") in capsys.readouterr().out
  assert cli.main(["import", str(src), "--out", str(tmp_path / "again.safetensors")]) == 0  # no --model needed
  printed = capsys.readouterr().out
  assert "heads: 8 per block (block 2: 16), as tinymim_t.config.json records" in printed
  assert "(+ again.config.json)" in printed
  name, overrides, _ = convert.sidecar_model(convert.read_sidecar(tmp_path / "again.safetensors"))
  again = create_model(name, **overrides)
  convert.load_pytorch_weights(again, tmp_path / "again.safetensors")
  x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  np.testing.assert_array_equal(again(x)["tokens"], tinymim_t_like(x)["tokens"])
  # Without the sidecar the heads are the model's guess, and inspect says so.
  os.remove(tmp_path / "tinymim_t.config.json")
  assert cli.main(["inspect", str(src)]) == 0
  assert "heads:  not stored in the weights (no tinymim_t.config.json beside them)" in capsys.readouterr().out
  assert cli.main(["import", str(src), "--out", str(tmp_path / "x.pth")]) == 1
  assert "no tinymim_t.config.json beside it: name the model with --model" in capsys.readouterr().err
