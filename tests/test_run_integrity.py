"""Run integrity at the edges: a SIGTERM'd run of every objective resumes, a holder that lost its lock stops
writing, sources that change under a run, damaged metadata, outputs written through links or onto a full disk."""

import glob
import json
import logging
import os
import signal
import time

import pytest

from tinymim_jax import checkpoint, config_base, lock as lock_lib, main as trainer, workdir
from tinymim_jax.demo import load_config_module

from tests.test_main import ROOT, tiny_config

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


@pytest.mark.parametrize("objective", ["mae_pretrain", "distill", "finetune", "linprobe"])
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
