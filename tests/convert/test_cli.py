"""The converter's command line: import, export, inspect, help, and `python -m tinymim_jax.convert`."""

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx

from convert_testlib import assert_same, timm_vit, tiny, torch_resample
from tinymim_jax import convert, create_model
from tinymim_jax.convert import cli


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
  assert "no checkpoint under" in capsys.readouterr().err and not (tmp_path / "t.pth").exists()


@pytest.mark.parametrize("command", ["import", "export", "inspect"])
def test_cli_help_has_examples(command, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main([command, "--help"])
  assert exit_.value.code == 0
  assert "Example" in capsys.readouterr().out


def test_cli_runs_as_module(finetuned_vit_tiny):
  src, _ = finetuned_vit_tiny
  run = subprocess.run([sys.executable, "-m", "tinymim_jax.convert", "inspect", str(src)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr
  assert "vit_tiny_patch16" in run.stdout


def test_cli_top_level_help(capsys):
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  assert "Example" in capsys.readouterr().out
