"""The main job's fine-tuning with a distillation teacher and a weight EMA (DeiT-style, TinyMIM*-T's recipe) on the
digits demo's student_finetune_deit stage: both heads logged, the EMA evaluated and exported, and a resume that
gives the uninterrupted run's EMA bit for bit."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from tinymim_jax import main as trainer

from tests.test_main import tiny_config


@pytest.fixture(scope="module")
def deit_root(tmp_path_factory):
  """A finished tiny fine-tune (random init, 4 steps) as the teacher, and a 6-step distillation fine-tune of a
  student with a distillation token from it (checkpoints at 3 and 6)."""
  root = str(tmp_path_factory.mktemp("deit"))
  trainer.train_and_evaluate(tiny_config("baseline_finetune", root, init="", total_steps=4, ckpt_every_steps=4),
                             os.path.join(root, "baseline_finetune"))
  trainer.train_and_evaluate(deit_config(root), os.path.join(root, "student_finetune_deit"))
  return root


def deit_config(root, **overrides):
  return tiny_config("student_finetune_deit", root, init="", total_steps=6, ckpt_every_steps=3, keep_ckpts=5,
                     log_every_steps=3, **{"finetune.export_ema": True, **overrides})


def test_distillation_finetune_logs_both_heads_and_the_ema(deit_root):
  wd = os.path.join(deit_root, "student_finetune_deit")
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  train = [l for l in lines if "train/loss" in l]
  assert len(train) == 2
  for key in ("loss_cls", "loss_dist", "train_top1", "train_top1_cls", "train_top1_dist", "train_top1_teacher"):
    assert all(np.isfinite(l[f"train/{key}"]) for l in train), key
  assert train[-1]["train/loss_dist"] > 0
  done = json.load(open(os.path.join(wd, "done.json")))
  assert 0 <= done["eval/top1"] <= 1 and 0 <= done["eval/ema_top1"] <= 1
  run = json.load(open(os.path.join(wd, "run.json")))
  assert run["teachers"]["teacher"]["source"].endswith("baseline_finetune")
  sd = load_file(os.path.join(wd, "model.safetensors"))
  assert {"dist_token", "head_dist.weight", "head.weight"} <= set(sd) and sd["pos_embed"].shape[1] == 2 + 16


def test_ema_through_a_resume_is_bit_identical(deit_root, tmp_path):
  ref = os.path.join(deit_root, "student_finetune_deit")
  cut = str(tmp_path / "student_finetune_deit")
  shutil.copytree(ref, cut)
  shutil.rmtree(os.path.join(cut, "checkpoints", "6"))
  for name in ("done.json", "model.safetensors"):
    os.remove(os.path.join(cut, name))
  res = trainer.train_and_evaluate(deit_config(deit_root), cut)
  assert res["step"] == 6
  a, b = load_file(os.path.join(ref, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # the exported EMA, continued from step 3's


def test_a_workdir_with_an_ema_restores_its_raw_weights(deit_root):
  """The EMA rides in the checkpoint's model item; restore_model (a teacher or init from this workdir) reads the
  raw weights beside it, not the EMA the export holds (export_ema=True)."""
  from tinymim_jax import builders, convert
  wd = os.path.join(deit_root, "student_finetune_deit")
  raw = convert.export_pytorch_weights(builders.restore_model(wd))
  ema = load_file(os.path.join(wd, "model.safetensors"))
  assert raw.keys() == ema.keys()
  assert any(not np.array_equal(raw[k], ema[k]) for k in raw)
