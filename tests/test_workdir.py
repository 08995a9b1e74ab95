"""One writer per workdir (the lock file) and the config as the run's identity (tinymim_jax/workdir.py)."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from tinymim_jax import config_base, workdir
from tinymim_jax import lock as lock_lib
from tinymim_jax import config_identity


def _holder(tmp_path, **fields):
  info = {"host": "somehost", "pid": 12345, "pid_start": "1", "start": "2026-01-01T00:00:00+00:00",
          "run_id": "feedbeef", **fields}
  path = tmp_path / workdir.LOCK
  path.write_text(json.dumps(info))
  return path


def _assert_taken_over(tmp_path, lock):
  """The lock file now names `lock`'s run (this process), and releasing it removes it."""
  held = json.loads((tmp_path / workdir.LOCK).read_text())
  assert (held["run_id"], held["pid"]) == (lock.info["run_id"], os.getpid()) != ("feedbeef", 12345)
  lock.release()
  assert not (tmp_path / workdir.LOCK).exists()


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


# ---------------------------------------------------------------------------------------------------------
# Lock.
# ---------------------------------------------------------------------------------------------------------
def test_second_run_stops_at_once_naming_the_holder(tmp_path):
  first = lock_lib.LocalFileLock(str(tmp_path))
  first.acquire()
  try:
    held = json.loads((tmp_path / workdir.LOCK).read_text())
    assert held["pid"] == os.getpid() and held["run_id"] == first.info["run_id"] and held["host"]
    second = lock_lib.LocalFileLock(str(tmp_path))
    t = time.time()
    with pytest.raises(workdir.WorkdirLockedError) as e:
      second.acquire()
    assert time.time() - t < 5
    msg = str(e.value)
    for part in (f"host {held['host']}", f"pid {os.getpid()}", f"started {held['start']}"):
      assert part in msg, msg
  finally:
    first.release()
  assert not (tmp_path / workdir.LOCK).exists()
  first.release()  # idempotent


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
  import socket
  _holder(tmp_path, host=socket.gethostname(), pid=_dead_pid())
  lock = lock_lib.LocalFileLock(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  try:
    assert "taking over the lock" in caplog.text and "is gone" in caplog.text
    assert json.loads((tmp_path / workdir.LOCK).read_text())["run_id"] == lock.info["run_id"]
  finally:
    lock.release()


def test_reused_pid_is_not_a_live_holder(tmp_path):
  import socket
  _holder(tmp_path, host=socket.gethostname(), pid=os.getppid(), pid_start="not its start time")
  lock = lock_lib.LocalFileLock(str(tmp_path))
  lock.acquire()
  _assert_taken_over(tmp_path, lock)


def test_other_host_lock_is_stale_only_without_heartbeat(tmp_path):
  path = _holder(tmp_path, host="elsewhere")
  lock = lock_lib.LocalFileLock(str(tmp_path), stale_after_s=60)
  with pytest.raises(workdir.WorkdirLockedError, match="host elsewhere, pid 12345"):
    lock.acquire()  # fresh heartbeat: alive
  old = time.time() - 120
  os.utime(path, (old, old))
  lock.acquire()  # 120 s without a heartbeat: taken over
  _assert_taken_over(tmp_path, lock)


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
  _holder(tmp_path, host="node7", slurm_job="4242", slurm_restart=0)
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same incarnation (another task of it): still held
  with pytest.raises(workdir.WorkdirLockedError, match="SLURM job 4242"):
    lock_lib.LocalFileLock(str(tmp_path)).acquire()
  monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
  lock = lock_lib.LocalFileLock(str(tmp_path))
  lock.acquire()
  _assert_taken_over(tmp_path, lock)


def test_heartbeat_refreshes_the_lock_and_release_removes_it(tmp_path):
  lock = lock_lib.LocalFileLock(str(tmp_path), heartbeat_s=0.05)
  lock.acquire()
  path = tmp_path / workdir.LOCK
  old = time.time() - 1000
  os.utime(path, (old, old))
  time.sleep(0.5)
  assert time.time() - os.stat(path).st_mtime < 100
  lock.release()
  assert not path.exists()


def test_only_process_zero_takes_the_lock(tmp_path):
  agreed = []
  assert lock_lib.acquire_for_job(str(tmp_path), process_index=1, agree=lambda ok: agreed.append(ok) or True) is None
  assert agreed == [True] and not (tmp_path / workdir.LOCK).exists()
  _holder(tmp_path, host="elsewhere")  # process 0 fails: every process raises
  with pytest.raises(workdir.WorkdirLockedError):
    lock_lib.acquire_for_job(str(tmp_path), process_index=1, agree=lambda ok: False)
  with pytest.raises(workdir.WorkdirLockedError, match="elsewhere"):
    lock_lib.acquire_for_job(str(tmp_path), process_index=0, agree=lambda ok: ok)


# ---------------------------------------------------------------------------------------------------------
# Config identity.
# ---------------------------------------------------------------------------------------------------------
def _config(**overrides):
  c = config_base.base_config()
  c.teacher.source = "teacher.pth"
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def test_changes_to_the_model_or_checkpoint_meaning_are_an_error():
  for objective, field, value in [("distill", "model.num_heads", 8), ("distill", "teacher.source", "other.pth"),
                                  ("distill", "distill.teacher_block", 9), ("distill", "objective", "mae_pretrain"),
                                  ("mae_pretrain", "mae.decoder_depth", 2), ("finetune", "init", "w.pth")]:
    old = json.loads(_config(objective=objective).to_json_best_effort())
    new = _config(**{"objective": objective, field: value})
    with pytest.raises(workdir.ConfigChangeError) as e:
      config_identity.check_config_change(old, new)
    assert field in str(e.value) and repr(value) in str(e.value) and "--config.allow_config_change=True" in str(e.value)
    assert config_identity.check_config_change(old, new, allow=True) == config_identity.config_changes(old, new)
  # Every teacher section a distillation names is fixed, and so is the list.
  def two(**fields):
    c = _config()
    c.teacher2 = config_base.teacher_config("vit_small_patch14_dinov2", source="dinov2.safetensors", block=9)
    c.teachers = ("teacher", "teacher2")
    for k, v in fields.items():
      c.teacher2[k] = v
    return c
  old = json.loads(two().to_json_best_effort())
  for field, value in [("block", 12), ("weight", 0.5), ("source", "other.safetensors")]:
    with pytest.raises(workdir.ConfigChangeError, match=rf"teacher2.{field}: "):
      config_identity.check_config_change(old, two(**{field: value}))
  with pytest.raises(workdir.ConfigChangeError, match="teachers: "):
    config_identity.check_config_change(old, _config())
  # The teacher and the distillation target belong to a distillation run only.
  mae = json.loads(_config(objective="mae_pretrain").to_json_best_effort())
  assert set(config_identity.check_config_change(mae, _config(**{"objective": "mae_pretrain", "teacher.source": "x.pth",
                                                         "distill.teacher_block": 9}))) == {"teacher.source",
                                                                                          "distill.teacher_block"}


def test_other_changes_are_allowed_and_recorded(tmp_path):
  old = json.loads(_config().to_json_best_effort())
  new = _config(**{"optim.base_lr": 1e-3, "batch_size": 64, "total_steps": 10, "log_every_steps": 5,
                   "eval_every_steps": 0, "ckpt_every_steps": 7, "seed": 3, "allow_config_change": True})
  changes = config_identity.check_config_change(old, new)
  assert set(changes) == {"optim.base_lr", "batch_size", "total_steps", "log_every_steps", "eval_every_steps",
                          "ckpt_every_steps", "seed"}  # allow_config_change is not part of the identity
  assert changes["optim.base_lr"] == (1.5e-4, 1e-3)
  config_identity.record_config_change(str(tmp_path), new, changes, step=12)
  (rec,) = [json.loads(line) for line in (tmp_path / workdir.HISTORY).read_text().splitlines()]
  assert rec["step"] == 12 and rec["changes"]["batch_size"] == [4096, 64] and rec["forced"] == []
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["base_lr"] == 1e-3


def test_a_field_added_to_the_schema_since_is_not_a_change():
  old = json.loads(_config().to_json_best_effort())
  del old["model"]["attention"], old["data"]["max_image_pixels"]  # as saved before these fields existed
  assert config_identity.check_config_change(old, _config()) == {}
  changes = config_identity.config_changes(old, _config(**{"data.max_image_pixels": 1000}))
  assert changes == {"data.max_image_pixels": (None, 1000)}
  with pytest.raises(workdir.ConfigChangeError, match="model.attention"):
    config_identity.check_config_change(old, _config(**{"model.attention": "xla"}))


def test_a_field_left_to_the_variant_equals_the_variants_value():
  old = json.loads(_config().to_json_best_effort())
  old["model"]["img_size"], old["model"]["pos_embed"] = 224, "sincos"  # saved when these were not placeholders
  assert config_identity.check_config_change(old, _config()) == {}  # None: the variant's 224 / 'sincos'
  with pytest.raises(workdir.ConfigChangeError, match="model.pos_embed"):
    config_identity.check_config_change(old, _config(**{"model.pos_embed": "learn"}))
