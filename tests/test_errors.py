"""A user's mistake is one `error:` line (with did-you-mean for config fields, including moved ones), from the
main job, the converter and the study alike; a library's fault keeps its traceback."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tinymim_jax import errors, study
from tinymim_jax import convert_cli as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "digits_demo.py")


def _main_job(*args, cwd=ROOT):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", "tinymim_jax.main", *args], env=env, capture_output=True, text=True,
                        cwd=cwd, timeout=300)


def _one_error_line(res, want):
  out = (res.stdout + res.stderr).strip()
  lines = [l for l in out.splitlines() if l.startswith("error:")]
  assert res.returncode == 1 and "Traceback" not in out, out[-3000:]
  assert len(lines) == 1 and want in lines[0], out[-3000:]


def test_a_moved_config_field_is_one_line_naming_where_it_went(tmp_path):
  res = _main_job(f"--config={DEMO}:stage=teacher_mae", "--config.knn.max_train=5", f"--workdir={tmp_path}")
  _one_error_line(res, "--config.knn.max_train: no such config field (moved to eval.max_train)")


def test_a_val_class_missing_from_train_is_one_line(tmp_path):
  from PIL import Image
  for split, classes in (("train", "ab"), ("val", "abc")):
    for c in classes:
      os.makedirs(tmp_path / "f" / split / c)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "f" / split / c / "0.png")
  res = _main_job(f"--config={DEMO}:stage=teacher_mae", "--config.data.name=folder",
                  f"--config.data.folder={tmp_path / 'f'}", f"--workdir={tmp_path / 'wd'}")
  _one_error_line(res, "has class folders ['c'] that")


def test_did_you_mean():
  known = ["optim.base_lr", "eval.max_train", "eval.knn.k"]
  assert errors.did_you_mean("optim.bse_lr", known) == " (did you mean optim.base_lr?)"
  assert errors.did_you_mean("knn.k", known) == " (moved to eval.knn.k)"
  assert errors.did_you_mean("max_train", known) == " (did you mean eval.max_train?)"
  assert errors.did_you_mean("zzz", known) == ""


def test_the_converter_and_the_study_say_a_users_mistake_in_one_line(tmp_path, capsys):
  src = tmp_path / "w.safetensors"
  from safetensors.numpy import save_file
  save_file({"cls_token": np.zeros((1, 1, 8), np.float32)}, str(src))
  assert cli.main(["import", str(src), "--model", "vit_tiny_patch99", "--out", str(tmp_path / "o.safetensors")]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: unknown model 'vit_tiny_patch99'") and len(err.splitlines()) == 1
  assert study.main(["--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "s")]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "nope.py" in err and len(err.splitlines()) == 1


def test_a_library_fault_keeps_its_traceback():
  try:
    np.zeros(3).reshape(4)
  except ValueError as e:
    assert not errors.is_user_error(e)
