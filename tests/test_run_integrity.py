"""Run integrity at the edges: a SIGTERM'd run of every objective resumes, a holder that lost its lock stops
writing, sources that change under a run, damaged metadata, outputs written through links or onto a full disk."""

import glob
import json
import logging
import os
import re
import signal
import time
import types

import pytest

from tinymim_jax import checkpoint, config_base, lock as lock_lib, main as trainer, workdir
from tinymim_jax.study import load_config_module

from tests.test_main import NO_EVALS, ROOT, tiny_config

LINPROBE = os.path.join(ROOT, "configs", "linprobe.py")
_SHORT = {"total_steps": 3, "ckpt_every_steps": 100, "eval.knn.enabled": False, "eval.fewshot.enabled": False,
          "eval.max_train": 256}


def objective_config(objective, root):
  """A tiny run of `objective` whose model's or teacher's head count comes from a source workdir (root's MAE
  teacher: 4 heads, where its variant, vit_tiny_patch16, has 3), built as the command line builds it."""
  teacher = os.path.join(root, "teacher_mae")
  if objective == "mae_pretrain":
    return tiny_config("baseline_mae", root, **_SHORT)
  if objective == "distill":  # the demo's stage, the teacher's heads left to its workdir
    return tiny_config("student_distill", root, **_SHORT, **{"teacher.num_heads": None})
  if objective == "finetune":  # the teacher fine-tuned, its heads from the init workdir
    return tiny_config("baseline_finetune", root, **_SHORT, init=teacher, **{
        "model.embed_dim": 128, "model.depth": 6, "model.num_heads": None})
  if objective == "linprobe":  # the README's linear-probe command
    c = load_config_module(LINPROBE).get_config(f"init={teacher},data=digits")
    c.total_steps, c.log_every_steps, c.eval.max_train = 3, 1, 256
    return config_base.finalize(c)
  raise ValueError(objective)


def sigterm_after_lock(monkeypatch):
  """A real SIGTERM to this process once the run holds its workdir (its handler is in place by then): the run
  saves after its first step and returns {'preempted': True}."""
  acquire = lock_lib.acquire_for_job

  def acquire_then_sigterm(*args, **kwargs):
    lock = acquire(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return lock

  monkeypatch.setattr(lock_lib, "acquire_for_job", acquire_then_sigterm)


# finetune / linprobe: the same SIGTERM path as the other two, slow only (test_main covers their resume in CI)
@pytest.mark.parametrize("objective", ["mae_pretrain", "distill", pytest.param("finetune", marks=pytest.mark.slow),
                                       pytest.param("linprobe", marks=pytest.mark.slow)])
def test_sigterm_then_the_same_command_resumes_every_objective(teacher_root, tmp_path, monkeypatch, objective):
  wd = str(tmp_path / objective)
  with monkeypatch.context() as m:
    sigterm_after_lock(m)
    res = trainer.train_and_evaluate(objective_config(objective, teacher_root), wd)
  assert res == {"preempted": True, "step": 1}
  assert glob.glob(os.path.join(wd, "checkpoints", "1")) and not os.path.exists(os.path.join(wd, workdir.DONE))
  res = trainer.train_and_evaluate(objective_config(objective, teacher_root), wd)  # the same command again
  assert res["step"] == 3 and json.load(open(os.path.join(wd, workdir.DONE)))["step"] == 3
  assert not os.path.exists(os.path.join(wd, workdir.HISTORY))  # the resolved configs are the same


# ---------------------------------------------------------------------------------------------------------
# A holder that lost its lock (paused past the staleness limit, taken over meanwhile) stops writing.
# ---------------------------------------------------------------------------------------------------------
def take_over_as_if_paused(wd):
  """Another run takes the workdir over from its holder as from one paused past the staleness limit: the holder's
  lock rewritten to name another host, its heartbeat 10 minutes old (as the takeover tests of test_workdir.py).
  -> the new holder's lock."""
  path = os.path.join(wd, workdir.LOCK)
  held = json.load(open(path))
  with open(path, "w") as f:
    json.dump({**held, "host": "paused-host"}, f)
  old = time.time() - 600
  os.utime(path, (old, old))
  other = lock_lib.LocalFileLock(wd)
  other.acquire()
  return other


@pytest.mark.parametrize("then", ["train", "sigterm"])
def test_a_holder_that_lost_its_lock_stops_and_writes_nothing_more(teacher_root, tmp_path, monkeypatch, caplog,
                                                                   then):
  wd = str(tmp_path / "wd")
  save = checkpoint.Checkpointer.save
  taken = {}

  def save_then_lose_the_lock(self, step, state, meta):
    save(self, step, state, meta)
    if not taken:
      self.wait()
      taken["lock"] = take_over_as_if_paused(wd)
      taken["ckpts"] = sorted(os.listdir(os.path.join(wd, "checkpoints")))
      taken["metrics"] = open(os.path.join(wd, workdir.METRICS)).read()
      if then == "sigterm":  # the save it makes for a SIGTERM must not land either
        os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_lose_the_lock)
  config = tiny_config("baseline_mae", teacher_root, total_steps=8, ckpt_every_steps=2,
                       log_every_steps=1 if then == "train" else 100)
  with caplog.at_level(logging.WARNING), pytest.raises(workdir.WorkdirLockLostError) as e:
    trainer.train_and_evaluate(config, wd)
  assert f"this run lost the lock of {os.path.abspath(wd)} (it is now held by host" in str(e.value)
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == taken["ckpts"] == ["2"]
  assert open(os.path.join(wd, workdir.METRICS)).read() == taken["metrics"]
  for name in (workdir.DONE, workdir.EXPORT):
    assert not os.path.exists(os.path.join(wd, name))
  assert json.load(open(os.path.join(wd, workdir.LOCK)))["run_id"] == taken["lock"].info["run_id"]  # left alone
  taken["lock"].release()


def test_a_lost_lock_is_seen_by_the_heartbeat_and_verify(tmp_path, caplog):
  lock = lock_lib.LocalFileLock(str(tmp_path), heartbeat_s=3600)
  lock.acquire()
  lock.verify()  # held: no error
  other = take_over_as_if_paused(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    lock.heartbeat()
  assert "this run lost the lock of" in caplog.text and "is now held by host" in caplog.text
  with pytest.raises(workdir.WorkdirLockLostError):
    lock.verify()
  lock.release()
  assert json.load(open(tmp_path / workdir.LOCK))["run_id"] == other.info["run_id"]
  other.release()


# ---------------------------------------------------------------------------------------------------------
# The study runner and SIGTERM.
# ---------------------------------------------------------------------------------------------------------
def test_study_stops_after_the_run_in_progress_on_a_sigterm_in_its_final_evals(tmp_path, monkeypatch):
  from tinymim_jax import study
  root = str(tmp_path / "study")

  def get_config(arg):
    a = config_base.parse_arg(arg, stage="", root="", quick=False)
    return tiny_config(a.stage, a.root, total_steps=2, ckpt_every_steps=100, **{"eval.knn.enabled": False,
                                                                                 "eval.fewshot.enabled": False})

  module = types.SimpleNamespace(plan=lambda quick: [("a", "stage=baseline_mae"), ("b", "stage=baseline_mae")],
                                 get_config=get_config)
  finish = trainer._finish_run

  def sigterm_then_finish(*args, **kwargs):  # lands after the final evals, before the export
    os.kill(os.getpid(), signal.SIGTERM)
    return finish(*args, **kwargs)

  monkeypatch.setattr(trainer, "_finish_run", sigterm_then_finish)
  before = signal.getsignal(signal.SIGTERM)
  assert study.run_plan(module, root) is False  # stopped
  assert signal.getsignal(signal.SIGTERM) == before
  assert os.path.exists(os.path.join(root, "a", workdir.DONE)) and not os.path.exists(os.path.join(root, "b"))
  # The command line exits 75, as the main job does.
  monkeypatch.setattr(study, "run_plan", lambda *a, **k: False)
  monkeypatch.setattr(study, "write_report", lambda *a, **k: None)
  monkeypatch.setattr(study, "load_config_module", lambda path: module)
  assert study.main(["--config", "study.py", "--workdir", root]) == 75


# ---------------------------------------------------------------------------------------------------------
# Sources that change under a run: their weights are part of its identity.
# ---------------------------------------------------------------------------------------------------------
def test_a_changed_or_older_source_is_a_config_change_and_the_probe_records_its_encoder(teacher_root, tmp_path,
                                                                                          monkeypatch):
  from tests.helpers.faults import copy_run, damage
  source = tmp_path / "teacher_mae"
  copy_run(os.path.join(teacher_root, "teacher_mae"), source)
  wd = str(tmp_path / "probe")
  config = objective_config("linprobe", str(tmp_path))
  with monkeypatch.context() as m:
    sigterm_after_lock(m)
    assert trainer.train_and_evaluate(config, wd)["preempted"]
  recorded = json.load(open(os.path.join(wd, workdir.RUN)))["encoder"]
  assert recorded["source"] == str(source) and len(recorded["sha256"]) == 64
  damage(str(source), 12, "flip1")  # the source's newest checkpoint: an older one is read instead
  with pytest.raises(workdir.ConfigChangeError, match=r"(?s)other weights from these sources:\n  encoder \("
                                                      + re.escape(str(source)) + r"\): sha256 " + recorded["sha256"][:12]):
    trainer.train_and_evaluate(objective_config("linprobe", str(tmp_path)), wd)
  from tinymim_jax import config_identity
  saved = {"teachers": {"teacher": {"source": "t", "sha256": "a" * 64}}}
  with pytest.raises(workdir.ConfigChangeError, match="teacher 'teacher' \\(t\\): sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb"):
    config_identity.check_source_change(saved, {"teachers": {"teacher": {"source": "t", "sha256": "b" * 64}}})
  config_identity.check_source_change(saved, {"teachers": {"teacher": {"source": "t", "sha256": "b" * 64}}},
                                      allow=True)  # forced: a warning


# ---------------------------------------------------------------------------------------------------------
# Identity and metadata edges.
# ---------------------------------------------------------------------------------------------------------
def test_identity_from_the_checkpoint_without_config_json_and_damaged_metadata_is_damage(teacher_root, tmp_path,
                                                                                          caplog):
  from tests.helpers.faults import copy_run
  wd = copy_run(os.path.join(teacher_root, "teacher_mae"), tmp_path / "teacher_mae")
  os.remove(os.path.join(wd, workdir.CONFIG))
  with pytest.raises(workdir.ConfigChangeError, match="model.num_heads: 4 -> 8"):
    trainer.train_and_evaluate(tiny_config("teacher_mae", teacher_root, total_steps=12, **{"model.num_heads": 8}),
                               wd)
  # The newest checkpoint's _METADATA loses one entry: damaged (moved aside), and the one before it resumes.
  path = os.path.join(wd, "checkpoints", "12", "model", "_METADATA")
  md = json.load(open(path))
  del md["tree_metadata"][sorted(md["tree_metadata"])[0]]
  json.dump(md, open(path, "w"))
  with caplog.at_level(logging.WARNING):
    res = trainer.train_and_evaluate(tiny_config("teacher_mae", teacher_root, total_steps=12, ckpt_every_steps=4,
                                                 **NO_EVALS), wd)
  assert res["step"] == 12
  assert "checkpoint step 12" in caplog.text and "does not list what was saved with it" in caplog.text
  assert "resuming from step 8" in caplog.text and glob.glob(os.path.join(wd, "checkpoints", "12.damaged-*"))


# ---------------------------------------------------------------------------------------------------------
# Outputs: new files (never through a link), and a failed export is one line that leaves everything intact.
# ---------------------------------------------------------------------------------------------------------
def test_outputs_replace_links_instead_of_writing_through_them(tmp_path):
  import numpy as np
  from tinymim_jax import convert
  victim = tmp_path / "victim.txt"
  victim.write_text("keep me")
  out = tmp_path / "out.safetensors"
  os.symlink(victim, tmp_path / "out.config.json")
  os.symlink(victim, out)
  convert.save_pytorch_weights({"w": np.ones((2, 3), np.float32)}, str(out), sidecar={"architecture": "x"})
  assert victim.read_text() == "keep me"
  assert not os.path.islink(out) and not os.path.islink(tmp_path / "out.config.json")
  assert json.load(open(tmp_path / "out.config.json"))["architecture"] == "x"  # (+ the file it describes)
  assert sorted(os.listdir(tmp_path)) == ["out.config.json", "out.safetensors", "victim.txt"]


def test_a_full_disk_during_the_final_export_is_one_line_and_leaves_everything_intact(teacher_root, tmp_path,
                                                                                      monkeypatch):
  import errno
  import io
  from tests.helpers.faults import copy_run
  wd = copy_run(os.path.join(teacher_root, "teacher_mae"), tmp_path / "teacher_mae")
  before = open(os.path.join(wd, workdir.EXPORT), "rb").read()
  real_open = io.open

  class FullDisk:
    def __init__(self, f):
      self.f = f

    def write(self, data):
      self.f.write(data[:len(data) // 2])
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

  def full_disk_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if "w" in mode and os.path.basename(str(file)).startswith("." + workdir.EXPORT):
      return FullDisk(f)
    return f

  monkeypatch.setattr("builtins.open", full_disk_open)
  with pytest.raises(workdir.ExportError) as e:
    trainer.train_and_evaluate(tiny_config("teacher_mae", teacher_root, total_steps=12, ckpt_every_steps=4,
                                           **NO_EVALS), wd)
  monkeypatch.undo()
  msg = str(e.value)
  assert "\n" not in msg and f"{wd}/{workdir.EXPORT}: [Errno 28] No space left on device" in msg, msg
  assert "rerun the same command" in msg
  assert open(os.path.join(wd, workdir.EXPORT), "rb").read() == before  # the previous export, whole
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["12", "4", "8"]
  assert not os.path.exists(os.path.join(wd, workdir.DONE))
  assert not [n for n in os.listdir(wd) if n.endswith(".tmp")]
