"""The main job end to end on tiny configs: resume (SIGKILL / SIGTERM), NaN stop, evals, export, configs, and
what survives which fault (a second run, damaged checkpoints, a changed config, a failed save, bad data)."""

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from tinymim_jax import builders, checkpoint, config_base, main as trainer, workdir, writers
from tinymim_jax.study import load_config_module

from tests.helpers.faults import copy_run, damage, fail_json_saves_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "digits_demo.py")


def tiny_args(stage, root, steps=12, ckpt=4):
  return [f"--config={DEMO}:stage={stage},root={root}", f"--config.total_steps={steps}",
          f"--config.ckpt_every_steps={ckpt}", "--config.log_every_steps=2", "--config.eval_every_steps=0",
          "--config.batch_size=32", "--config.eval.max_train=256"]


# For runs whose test reads no final eval (a changed eval config is allowed on resume: tinymim_jax/config_identity.py).
NO_EVALS = {"eval.knn.enabled": False, "eval.fewshot.enabled": False}


NO_EVALS_ARGS = [f"--config.{k}={v}" for k, v in NO_EVALS.items()]


def tiny_config(stage, root, **overrides):
  c = load_config_module(DEMO).get_config(f"stage={stage},root={root}")
  c.batch_size, c.log_every_steps, c.eval_every_steps, c.eval.max_train = 32, 2, 0, 256
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config_base.finalize(c)


def run_cli(args, workdir, **popen):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": ROOT}
  return subprocess.Popen([sys.executable, "-m", "tinymim_jax.main", *args, f"--workdir={workdir}"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, **popen)


def wait_for(path_glob, proc, timeout=300):
  t = time.time()
  while time.time() - t < timeout:
    found = [p for p in glob.glob(path_glob) if not p.endswith("tmp")]
    if found:
      return found
    if proc.poll() is not None:
      raise AssertionError(f"process ended before {path_glob} appeared:\n{proc.stdout.read()[-3000:]}")
    time.sleep(0.02)
  raise AssertionError(f"timeout waiting for {path_glob}")


def test_run_leaves_checkpoints_metrics_plots_and_export(teacher_root):
  wd = os.path.join(teacher_root, "teacher_mae")
  for name in ("config.json", "metrics.jsonl", "curves.png", "model.safetensors", "done.json", "run.json"):
    assert os.path.exists(os.path.join(wd, name)), name
  assert not os.path.exists(os.path.join(wd, workdir.LOCK))  # released at the end
  assert glob.glob(os.path.join(wd, "tensorboard", "events.out.tfevents.*"))
  assert sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(wd, "checkpoints", "[0-9]*"))) == [4, 8, 12]
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  losses = [l["train/loss"] for l in lines if "train/loss" in l]
  assert len(losses) == 6 and losses[-1] < losses[0]
  # A rerun of a finished run does nothing.
  t = time.time()
  again = trainer.train_and_evaluate(tiny_config("teacher_mae", teacher_root, total_steps=12), wd)
  assert again["step"] == 12 and time.time() - t < 5


@pytest.mark.slow  # in CI: test_gcs.py::test_sigkill_resume_export_and_eval_on_gcs (the same kill, takeover, resume)
def test_sigkill_between_saves_then_resume_equals_uninterrupted(teacher_root, tmp_path):
  ref_root, cut_root = tmp_path / "ref", tmp_path / "cut"
  args = tiny_args("student_distill", teacher_root, steps=60, ckpt=5) + NO_EVALS_ARGS  # margin: the kill lands mid-run
  ref = run_cli(args, ref_root / "student_distill")
  cut = run_cli(args, cut_root / "student_distill")
  wait_for(str(cut_root / "student_distill/checkpoints/10"), cut)
  cut.send_signal(signal.SIGKILL)
  cut.wait()
  assert not os.path.exists(cut_root / "student_distill/done.json")
  resumed = run_cli(args, cut_root / "student_distill")
  out = resumed.communicate(timeout=600)[0]
  assert resumed.returncode == 0, out[-3000:]
  assert "resumed from" in out
  assert "taking over the lock" in out and "is gone" in out  # the SIGKILLed run's lock is not stuck
  assert ref.wait(timeout=600) == 0, ref.stdout.read()[-3000:]
  a = load_file(str(ref_root / "student_distill/model.safetensors"))
  b = load_file(str(cut_root / "student_distill/model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigterm_saves_and_exits_75_and_a_second_run_stops_at_once(teacher_root, tmp_path):
  wd = tmp_path / "student_distill"
  proc = run_cli(tiny_args("student_distill", teacher_root, steps=400, ckpt=1000) + ["--config.keep_ckpts=1"], wd)
  wait_for(str(wd / "metrics.jsonl"), proc)
  # A second run on the same workdir stops at once, naming the holder.
  t = time.time()
  with pytest.raises(workdir.WorkdirLockedError, match=f"pid {proc.pid}, started "):
    trainer.train_and_evaluate(tiny_config("student_distill", teacher_root, total_steps=400), str(wd))
  assert time.time() - t < 10
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == trainer.EXIT_PREEMPTED == 75, out[-3000:]
  assert "SIGTERM: saved step" in out and "rerun the same command to resume" in out
  steps = [int(os.path.basename(p)) for p in glob.glob(str(wd / "checkpoints/[0-9]*"))]
  assert len(steps) == 1 and 0 < steps[0] < 400 and not os.path.exists(wd / "done.json")
  assert not os.path.exists(wd / workdir.LOCK)


def test_nonfinite_loss_stops_saving_and_deleting_nothing(teacher_root, tmp_path):
  wd = str(tmp_path / "nan")
  trainer.train_and_evaluate(tiny_config("student_distill", teacher_root, total_steps=4, ckpt_every_steps=4,
                                         export=False, **NO_EVALS), wd)
  os.remove(os.path.join(wd, "done.json"))  # continue the run, now with an lr that blows it up
  # A save every step and a log line only at the end: the non-finite step must be checked before any save.
  config = tiny_config("student_distill", teacher_root, total_steps=30, ckpt_every_steps=1, log_every_steps=1000,
                       warmup_steps=0, **{"optim.base_lr": 1e12}, **NO_EVALS)
  with pytest.raises(trainer.NonFiniteLossError, match="NaN/Inf at step") as e:
    trainer.train_and_evaluate(config, wd)
  bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
  saved = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(wd, "checkpoints", "[0-9]*")))
  assert saved and max(saved) < bad, (saved, bad)  # nothing saved at or after the blow-up
  assert f"a rerun resumes from checkpoint step {max(saved)}" in str(e.value)
  assert not os.path.exists(os.path.join(wd, "done.json")) and not os.path.exists(os.path.join(wd, "run.lock"))
  from flax import nnx
  from tinymim_jax import builders
  model = builders.restore_model(wd)  # the checkpoint a rerun starts from is complete and finite
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))
  # Before any checkpoint (sparse saves), the message says where a rerun starts.
  with pytest.raises(trainer.NonFiniteLossError, match="no checkpoint was saved before it, so a rerun starts "
                                                         "from step 0"):
    trainer._check_finite({"nonfinite": 1, "loss": float("nan")}, 7, None)


def test_unknown_config_field_is_an_error_naming_it(tmp_path):
  proc = run_cli([f"--config={DEMO}:stage=teacher_mae", "--config.optim.bse_lr=1.0"], tmp_path / "x")
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode != 0 and "bse_lr" in out
  # A value that would crash later is a one-line error when the config is finalised, before anything runs.
  proc = run_cli([f"--config={DEMO}:stage=teacher_mae", "--config.batch_size=0"], tmp_path / "x")
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == trainer.EXIT_FAILED and "config.batch_size=0: expected an integer in [1, inf)" in out
  assert "Traceback" not in out and not os.path.exists(tmp_path / "x" / "checkpoints")
  with pytest.raises(ValueError, match="unknown config argument 'stag'"):
    load_config_module(DEMO).get_config("stag=x")


def _on_the_distilled_student(distilled_root, tmp_path):
  """A root of the test's own holding (links to) the session's teacher and distilled student; -> (root, the
  student's final metrics)."""
  root = str(tmp_path)
  for stage in ("teacher_mae", "student_distill"):
    os.symlink(os.path.realpath(os.path.join(distilled_root, stage)), os.path.join(root, stage))
  return root, trainer.train_and_evaluate(tiny_config("student_distill", root, total_steps=6, ckpt_every_steps=6),
                                          os.path.join(root, "student_distill"))


def test_finetune_from_distilled_student_then_eval_and_export(distilled_root, tmp_path):
  root, _ = _on_the_distilled_student(distilled_root, tmp_path)
  res = trainer.train_and_evaluate(tiny_config("student_finetune", root, total_steps=8, ckpt_every_steps=8),
                                   os.path.join(root, "student_finetune"))
  assert 0 <= res["eval/top1"] <= 1
  ev = tiny_config("student_finetune", root, objective="eval", init=os.path.join(root, "student_finetune"))
  res2 = trainer.train_and_evaluate(ev, os.path.join(root, "eval"))
  assert res2["eval/top1"] == pytest.approx(res["eval/top1"])
  # The export loads into timm's fine-tuning layout with strict=True (see tests/test_convert.py for parity).
  sd = load_file(os.path.join(root, "student_finetune", "model.safetensors"))
  assert "fc_norm.weight" in sd and "head.weight" in sd and "norm.weight" not in sd
  # ...and the converter CLI exports the same weights from the workdir.
  out = os.path.join(root, "cli.safetensors")
  subprocess.run([sys.executable, "-m", "tinymim_jax.convert", "export", "--workdir",
                  os.path.join(root, "student_finetune"), "--out", out], check=True, cwd=ROOT,
                 env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}, capture_output=True)
  sd2 = load_file(out)
  assert sd.keys() == sd2.keys() and all(np.array_equal(sd[k], sd2[k]) for k in sd)


@pytest.mark.slow  # in CI: test_launch.py (the slurm path), test_train_steps.py::test_two_processes_equal_one
def test_two_process_run_through_the_slurm_code_path(teacher_root, tmp_path):
  wd = tmp_path / "mp"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes", "2", "--",
         sys.executable, "-m", "tinymim_jax.main", *tiny_args("teacher_mae", teacher_root, steps=6, ckpt=3),
         *NO_EVALS_ARGS, f"--workdir={wd}"]
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  done = json.load(open(wd / "done.json"))
  assert done["step"] == 6
  meta = json.load(open(wd / "run.json"))
  assert meta["versions"]["devices"].startswith("2 x")


def test_resume_onto_a_different_mesh(tmp_path):
  root = str(tmp_path)
  quiet = {"total_steps": 8, "ckpt_every_steps": 4, **NO_EVALS}
  ref = trainer.train_and_evaluate(tiny_config("baseline_mae", root, **quiet), os.path.join(root, "ref"))
  # The same run stopped after step 4: the reference's workdir without its step-8 checkpoint (a rerun of the
  # same config writes the same step 4: test_sigkill_between_saves_then_resume_equals_uninterrupted).
  cut = copy_run(os.path.join(root, "ref"), os.path.join(root, "cut"))
  subprocess.run(["rm", "-rf", os.path.join(cut, "checkpoints", "8")], check=True)
  os.remove(os.path.join(cut, workdir.EXPORT))  # compared below: the resumed run's own export
  res = trainer.train_and_evaluate(tiny_config("baseline_mae", root, **quiet, **{"mesh.fsdp": 4}), cut)
  assert res["step"] == ref["step"] == 8
  a, b = load_file(os.path.join(root, "ref", "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
  for k in a:
    x, y = a[k], b[k]
    if k.endswith("attn.qkv.bias"):  # the key bias has a zero true gradient: Adam amplifies rounding noise
      d = x.shape[0] // 3
      np.testing.assert_allclose(y[d:2 * d], x[d:2 * d], atol=1e-4, err_msg=k)
      x, y = np.concatenate([x[:d], x[2 * d:]]), np.concatenate([y[:d], y[2 * d:]])
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6, err_msg=k)


def test_eval_and_linprobe_objectives_on_a_distilled_student(distilled_root, tmp_path):
  root, distilled = _on_the_distilled_student(distilled_root, tmp_path)
  student = os.path.join(root, "student_distill")
  # The distilled student's features are its relation block's input (block 4 - 1), recorded in the workdir.
  spec = {"block": 3, "pool": "mean", "norm": True}
  assert distilled["feature"] == spec and json.load(open(os.path.join(student, "run.json")))["feature"] == spec
  recipe = {"linprobe.epochs": 10.0, "linprobe.warmup_epochs": 2.0}
  ev = trainer.train_and_evaluate(tiny_config("student_eval", root, **recipe), os.path.join(root, "eval"))
  assert ev["feature"] == spec  # picked up from the workdir
  assert ev["eval/knn_top1"] == pytest.approx(distilled["eval/knn_top1"], abs=1e-9)  # the same features
  assert "eval/fewshot_1shot_top1" in ev and "eval/fewshot_25shot_top1" not in ev  # 256 images: < 10 + 25 per class
  for k in (1, 5, 10):
    key = f"eval/fewshot_{k}shot_top1"
    assert (key in ev) == (key in distilled) and ev.get(key) == pytest.approx(distilled.get(key), abs=1e-9)
  assert 0.1 < ev["eval/linprobe_top1"] <= ev["eval/linprobe_top5"] <= 1 and "eval/top1" not in ev
  assert json.load(open(os.path.join(root, "eval", "done.json")))["eval/linprobe_top1"] == ev["eval/linprobe_top1"]
  # The export carries the spec in its header: an eval of the .safetensors reads the same features.
  ex = trainer.train_and_evaluate(
      tiny_config("student_eval", root, init=os.path.join(student, "model.safetensors"),
                  **{"eval.cached_probe": False, "eval.fewshot.enabled": False}), os.path.join(root, "eval_export"))
  assert ex["feature"] == spec and ex["eval/knn_top1"] == pytest.approx(distilled["eval/knn_top1"], abs=1e-9)
  # The linprobe objective on cached features (the main loop, sharded, checkpointed) trains the probe the eval
  # objective trained on its cache.
  lp_args = dict(objective="linprobe", init=student, **recipe, **{"linprobe.augment": False, "eval.knn.enabled": False,
                                                                  "eval.fewshot.enabled": False})
  lp = trainer.train_and_evaluate(tiny_config("student_eval", root, **lp_args), os.path.join(root, "lp"))
  assert lp["step"] == 10 * (1437 // 256) and lp["feature"] == spec
  assert lp["eval/linprobe_top1"] == pytest.approx(ev["eval/linprobe_top1"], abs=1.5 / 360)
  assert lp["eval/linprobe_top5"] == pytest.approx(ev["eval/linprobe_top5"], abs=1.5 / 360)
  # With augmentation the encoder runs in the loop on RandomResizedCrop views.
  aug_config = tiny_config("student_eval", root, total_steps=2, **{**lp_args, "linprobe.augment": True})
  aug = trainer.train_and_evaluate(aug_config, os.path.join(root, "lp_aug"))
  assert aug["step"] == 2 and 0 <= aug["eval/linprobe_top1"] <= 1
  # A rerun resumes with the same resolved description (the recipe, the init's head count and resolution): its
  # config identity sees no change.
  os.remove(os.path.join(root, "lp_aug", workdir.DONE))
  assert trainer.train_and_evaluate(aug_config, os.path.join(root, "lp_aug"))["step"] == 2
  assert not os.path.exists(os.path.join(root, "lp_aug", workdir.HISTORY))


def test_final_export_writes_the_architecture_beside_the_weights(tmp_path):
  c = tiny_config("student_distill", str(tmp_path))  # the student: 2 heads, 4 in its relation block
  model = builders.make_model(c)
  res = trainer._finish_run(c, str(tmp_path), model, {"step": 1, "feature": {"block": 3, "pool": "mean", "norm": True}})
  side = json.load(open(tmp_path / "model.config.json"))
  assert res["export"] == str(tmp_path / "model.safetensors") and side["heads_per_block"] == [2, 2, 2, 4]
  assert side["model_args"]["num_heads"] == 2 and json.load(open(tmp_path / "done.json"))["step"] == 1


@pytest.mark.parametrize("kind", ["empty_file", "not_a_workdir"])
def test_main_job_names_a_bad_weights_source_in_one_error_line(tmp_path, kind):
  source = tmp_path / ("teacher.pth" if kind == "empty_file" else "photos")
  if kind == "empty_file":
    source.write_bytes(b"")
    want = f"error: cannot read {source}: the file is empty (0 bytes)"
  else:
    source.mkdir()
    want = f"error: '{source}' is not a tinymim-jax workdir: it has no checkpoints/ directory"
  proc = run_cli([f"--config={DEMO}:stage=student_distill,root={tmp_path}", f"--config.teacher.source={source}"],
                 tmp_path / "wd")
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 1 and want in out and "Traceback" not in out, out[-3000:]
  assert kind == "empty_file" or os.listdir(source) == []


# -----------------------------------------------------------------------------------------------------
# Faults: a changed config, a damaged checkpoint, a failed save, data that can only give garbage.
# -----------------------------------------------------------------------------------------------------
def test_resume_checks_the_config_and_survives_a_damaged_latest_checkpoint(teacher_root, tmp_path, caplog):
  wd = copy_run(os.path.join(teacher_root, "teacher_mae"), tmp_path / "teacher_mae")
  # The architecture is the checkpoint's meaning: an error naming the field, before anything is built.
  with pytest.raises(workdir.ConfigChangeError) as e:
    trainer.train_and_evaluate(tiny_config("teacher_mae", teacher_root, total_steps=12, **{"model.num_heads": 8}), wd)
  assert "model.num_heads: 4 -> 8" in str(e.value) and "--config.allow_config_change=True" in str(e.value)
  # Forced through, a change of shapes is a short error listing the arrays (no Orbax traceback).
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    trainer.train_and_evaluate(tiny_config("teacher_mae", teacher_root, total_steps=12, allow_config_change=True,
                                           **{"model.embed_dim": 96}), wd)
  assert "model/params.encoder.blocks.0.attn.qkv.kernel: saved (128, 384) float32, now (96, 288)" in str(e.value)
  assert len(str(e.value).splitlines()) < 20
  # Bit rot in the latest checkpoint, and changes that are allowed (lr, schedule length): the run resumes from
  # the newest intact checkpoint, moves the damaged one aside, and records the changes.
  damage(wd, 12, "flip1")
  config = tiny_config("teacher_mae", teacher_root, total_steps=14, ckpt_every_steps=4, **{"optim.base_lr": 1e-3},
                       **NO_EVALS)
  with caplog.at_level(logging.WARNING):
    res = trainer.train_and_evaluate(config, wd)
  assert res["step"] == 14
  (aside,) = glob.glob(os.path.join(wd, "checkpoints", "12.damaged-*"))
  assert f"checkpoint step 12 in {wd}/checkpoints is damaged (checksum mismatch" in caplog.text
  assert f"moved aside to {aside}" in caplog.text and "resuming from step 8" in caplog.text
  (rec,) = [json.loads(line) for line in open(os.path.join(wd, workdir.HISTORY))]
  assert rec["step"] == 8 and rec["changes"]["optim.base_lr"][1] == 1e-3 and rec["changes"]["total_steps"] == [12, 14]
  assert json.load(open(os.path.join(wd, "config.json")))["optim"]["base_lr"] == 1e-3


def test_failed_save_stops_the_run_at_once_with_earlier_checkpoints_intact(teacher_root, tmp_path, monkeypatch):
  wd = copy_run(os.path.join(teacher_root, "teacher_mae"), tmp_path / "teacher_mae")
  fail_json_saves_at(monkeypatch, 16)  # as on a full disk
  config = tiny_config("teacher_mae", teacher_root, total_steps=30, ckpt_every_steps=2)
  with pytest.raises(checkpoint.CheckpointSaveError) as e:
    trainer.train_and_evaluate(config, wd)
  msg = str(e.value)
  assert "saving checkpoint step 16" in msg and "[Errno 28] No space left on device" in msg and "\n" not in msg
  assert max(r["step"] for r in writers.read_metrics(wd)) < 20  # not at the next save, nor at the end
  names = os.listdir(os.path.join(wd, "checkpoints"))
  assert sorted(int(n) for n in names if n.isdigit()) == [8, 12, 14], names  # the failure deleted nothing
  assert not glob.glob(os.path.join(wd, "checkpoints", "*tmp*")) and not os.path.exists(os.path.join(wd, "run.lock"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Image folders: three classes with val/, three without val/, one class."""
  from PIL import Image
  root = tmp_path_factory.mktemp("folders")
  rng = np.random.default_rng(0)

  def write(path, n):
    os.makedirs(path, exist_ok=True)
    for k in range(n):
      Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(os.path.join(path, f"{k}.png"))

  for name, classes, val in (("three", "abc", True), ("no_val", "abc", False), ("one", "a", True)):
    for c in classes:
      write(root / name / "train" / c, 12)
      if val:
        write(root / name / "val" / c, 2)
  return root


@pytest.mark.parametrize("folder,stage,overrides,message", [
    ("three", "student_finetune", {}, "config.model.num_classes=10, but the data (data.name='folder', "
                                      "data.folder='{root}/three') has 3 classes"),
    ("one", "student_finetune", {"model.num_classes": 0}, "fine-tuning needs at least 2 classes"),
    ("no_val", "teacher_mae", {}, "has no held-out split"),
])
def test_data_that_can_only_give_garbage_stops_the_run_at_start(folders, tmp_path, folder, stage, overrides, message):
  config = tiny_config(stage, str(tmp_path), total_steps=4, **{"data.name": "folder",
                                                               "data.folder": str(folders / folder), **overrides})
  t = time.time()
  with pytest.raises(config_base.ConfigError, match=re.escape(message.format(root=folders))):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert time.time() - t < 60 and not os.path.exists(tmp_path / "run" / "checkpoints")
