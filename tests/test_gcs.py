"""gs:// end to end against a real GCS JSON-API server on localhost (the `gcs` fixture of tests/conftest.py):
the path layer, the writers, checkpoints and the workdir lock on an object store; the main job run to the end with its workdir
on GCS (the same weights as on local disk), SIGKILLed and resumed from GCS, a teacher from a gs:// workdir and from
gs:// weight files, `convert export` from and to gs://, and the eval objective on a GCS workdir.

Not covered here: data on gs:// (TFDS data_dir, image folders), which tinymim_jax/data reads with tf.io.gfile and
tf.data, whose GCS client has no endpoint override and cannot be pointed at a local server.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import load_file

from tinymim_jax import builders, convert, main as trainer, paths, workdir, writers
from tinymim_jax import lock as lock_lib
from tinymim_jax.objectives import distill

from test_main import ROOT, run_cli, tiny_args, tiny_config
from test_workdir import _dead_pid


def _blob(uri):
  """The object at gs://bucket/name through the google-cloud-storage client (no listing cache), or None."""
  from google.cloud import storage
  bucket, name = uri[len("gs://"):].split("/", 1)
  return storage.Client(project=None).bucket(bucket).get_blob(name)


def _weights(path):
  return load_safetensors(paths.read_bytes(path)) if paths.is_remote(path) else load_file(path)


def _assert_same_weights(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -----------------------------------------------------------------------------------------------------------
# The path layer, the writers and the lock on an object store.
# -----------------------------------------------------------------------------------------------------------
def test_paths_on_gcs(gcs):
  d = f"{gcs}/paths"
  assert paths.is_remote(d) and paths.abspath(d) == d and not paths.exists(d)
  paths.makedirs(d)  # nothing to create on an object store
  paths.write_atomic(f"{d}/a.json", '{"x": 1}')
  paths.write_atomic(f"{d}/sub/b.bin", b"\x00\x01")
  assert json.loads(paths.read_text(f"{d}/a.json")) == {"x": 1} and paths.read_bytes(f"{d}/sub/b.bin") == b"\x00\x01"
  assert paths.isfile(f"{d}/a.json") and not paths.isdir(f"{d}/a.json")
  assert paths.isdir(f"{d}/sub") and not paths.isfile(f"{d}/sub") and paths.getsize(f"{d}/sub/b.bin") == 2
  assert sorted(paths.listdir(d)) == ["a.json", "sub"] and paths.glob(f"{d}/*.json") == [f"{d}/a.json"]
  paths.append_text(f"{d}/h.jsonl", "1\n")
  paths.append_text(f"{d}/h.jsonl", "2\n")
  assert paths.read_text(f"{d}/h.jsonl") == "1\n2\n"
  with pytest.raises(ValueError, match="not supported on object storage"):
    paths.open(f"{d}/h.jsonl", "a")
  paths.write_atomic(f"{d}/sub/deeper/c.txt", "c")
  paths.rename(f"{d}/sub", f"{d}/moved", marker="b.bin")  # no rename on GCS: copies, then deletes
  assert not paths.exists(f"{d}/sub") and paths.read_bytes(f"{d}/moved/b.bin") == b"\x00\x01"
  assert paths.read_text(f"{d}/moved/deeper/c.txt") == "c"
  paths.rmtree(f"{d}/moved")
  paths.remove(f"{d}/a.json")
  assert sorted(paths.listdir(d)) == ["h.jsonl"]


def test_metric_writer_on_gcs_uploads_whole_files_and_resumes(gcs):
  from tensorboard.compat.proto import event_pb2
  wd = f"{gcs}/writer"
  w = writers.MetricWriter(wd, plot_every_s=None, flush_every_s=3600)
  for step in (1, 2, 3):
    w.write(step, {"train/loss": 1.0 / step})
  assert not paths.exists(f"{wd}/{workdir.METRICS}")  # no append on GCS: the file is uploaded whole, later
  w.flush()  # (the trainer flushes before every checkpoint save)
  assert [r["step"] for r in writers.read_metrics(wd)] == [1, 2, 3]
  w.write(4, {"train/loss": 0.25})
  w.close()
  assert [r["step"] for r in writers.read_metrics(wd)] == [1, 2, 3, 4] and paths.isfile(f"{wd}/{workdir.PLOT}")
  # Resumed from a checkpoint at step 2: the later records go, the next ones follow.
  w = writers.MetricWriter(wd, plot_every_s=None, resume_step=2)
  w.write(3, {"train/loss": 0.3})
  w.close()
  assert [(r["step"], r["train/loss"]) for r in writers.read_metrics(wd)] == [(1, 1.0), (2, 0.5), (3, 0.3)]
  # Two event files (one per run), each a valid TFRecord stream with the scalars and the resume purge.
  files = sorted(paths.glob(f"{wd}/{workdir.TENSORBOARD}/events.out.tfevents.*"))
  assert len(files) == 2
  events = []
  for f in files:
    data, pos = paths.read_bytes(f), 0
    while pos < len(data):
      n = int.from_bytes(data[pos:pos + 8], "little")
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
      pos += 12 + n + 4
  scalars = [(e.step, v.tag) for e in events for v in e.summary.value]
  assert scalars == [(1, "train/loss"), (2, "train/loss"), (3, "train/loss"), (4, "train/loss"), (3, "train/loss")]
  assert [e.step for e in events if e.HasField("session_log")] == [3]


def _tiny_state(k):
  return {"params": {"w": np.full((64, 32), k, np.float32)}, "consts": {}, "opt": {"m": np.arange(5, dtype=np.int32)}}


def test_checkpoints_on_gcs_unfinished_and_damaged_steps(gcs, caplog):
  from tinymim_jax import checkpoint
  wd = f"{gcs}/ckpt"
  ckpt = checkpoint.Checkpointer(wd, keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, _tiny_state(step), {"step": step})
  ckpt.close()
  d = f"{wd}/{workdir.CHECKPOINTS}"
  assert sorted(paths.listdir(d)) == ["1", "2", "3"] and checkpoint.has_checkpoint(wd)
  # A step without Orbax's commit file (a save cut short) is not a checkpoint, and goes when a run opens the dir.
  paths.write_atomic(f"{d}/4/model/_METADATA", "{}")
  assert checkpoint.Checkpointer(wd, read_only=True).all_steps() == [1, 2, 3]
  # Bit rot in step 3: moved aside whole (with its commit file), the restore falls back to step 2.
  data = [f"{root}/{f}" for root, _, files in paths.walk(f"{d}/3/model") for f in files if "/d" in root]
  target = max(data, key=paths.getsize)
  blob = bytearray(paths.read_bytes(target))
  blob[len(blob) // 2] ^= 0x10
  paths.write_atomic(target, bytes(blob))
  ckpt = checkpoint.Checkpointer(wd, keep=3)  # (Orbax removes unfinished steps in the background)
  abstract = checkpoint.abstract({"params": _tiny_state(0)["params"], "consts": {}, "opt": _tiny_state(0)["opt"]})
  with caplog.at_level(logging.WARNING):
    state, meta = ckpt.restore(abstract)
  ckpt.close()
  assert not paths.exists(f"{d}/4")  # removed as unfinished
  assert meta["step"] == 2 and float(state["params"]["w"][0, 0]) == 2.0
  assert "checkpoint step 3 in" in caplog.text and "is damaged (" in caplog.text, caplog.text
  (aside,) = [n for n in paths.listdir(d) if n.startswith("3.damaged-")]
  assert paths.isfile(f"{d}/{aside}/commit_success.txt") and not paths.exists(f"{d}/3")
  # The copy survives the next opening (a directory without the commit file would be deleted as unfinished).
  ckpt = checkpoint.Checkpointer(wd, keep=3)
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()
  assert aside in paths.listdir(d)


def _lock_object(uri):
  b = _blob(uri)
  if b is None:
    return None, None
  generation = int(b.generation)  # (before the download, which drops it: the emulator sends no x-goog-generation)
  return json.loads(b.download_as_bytes()), generation


def test_gcs_lock_one_holder_heartbeat_release(gcs):
  wd = f"{gcs}/lock1"
  first = lock_lib.make_lock(wd, heartbeat_s=0.2)
  assert isinstance(first, lock_lib.GcsLock)
  first.acquire()
  try:
    held, generation = _lock_object(f"{wd}/{workdir.LOCK}")
    assert held["run_id"] == first.info["run_id"] and held["pid"] == os.getpid()
    t = time.time()
    with pytest.raises(workdir.WorkdirLockedError, match=f"run id {held['run_id']}"):
      lock_lib.GcsLock(wd).acquire()
    assert time.time() - t < 5
    time.sleep(1.0)  # a few heartbeats: each rewrites the object (a new generation)
    assert _lock_object(f"{wd}/{workdir.LOCK}")[1] not in (None, generation)
  finally:
    first.release()
  assert _blob(f"{wd}/{workdir.LOCK}") is None
  first.release()  # idempotent


def test_gcs_lock_created_once_under_a_race(gcs):
  """The create carries ifGenerationMatch=0: of runs that start together exactly one holds the lock."""
  for trial in range(3):
    wd = f"{gcs}/race{trial}"
    locks = [lock_lib.GcsLock(wd) for _ in range(4)]
    won, lost, barrier = [], [], threading.Barrier(len(locks))

    def go(lock):
      barrier.wait()
      try:
        lock.acquire()
        won.append(lock)
      except workdir.WorkdirLockedError:
        lost.append(lock)

    threads = [threading.Thread(target=go, args=(lock,)) for lock in locks]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert len(won) == 1 and len(lost) == 3, (len(won), len(lost))
    assert _lock_object(f"{wd}/{workdir.LOCK}")[0]["run_id"] == won[0].info["run_id"]
    won[0].release()


def _plant_lock(uri, **fields):
  info = {"host": "somehost", "pid": 12345, "pid_start": "1", "start": "2026-01-01T00:00:00+00:00",
          "run_id": "feedbeef", **fields}
  from google.cloud import storage
  bucket, name = uri[len("gs://"):].split("/", 1)
  storage.Client(project=None).bucket(bucket).blob(name).upload_from_string(json.dumps(info))


def test_gcs_lock_takeover_of_stale_locks_and_a_lost_lock(gcs, caplog):
  # A crashed run on this host (its pid is gone): taken over at once.
  wd = f"{gcs}/lock2"
  _plant_lock(f"{wd}/{workdir.LOCK}", host=socket.gethostname(), pid=_dead_pid())
  lock = lock_lib.GcsLock(wd)
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  assert "taking over the lock" in caplog.text and "is gone" in caplog.text
  assert _lock_object(f"{wd}/{workdir.LOCK}")[0]["run_id"] == lock.info["run_id"]
  lock.release()
  # Another host's lock: alive while its heartbeat is fresh by the bucket's clock, stale after stale_after_s.
  wd = f"{gcs}/lock3"
  _plant_lock(f"{wd}/{workdir.LOCK}", host="elsewhere")
  with pytest.raises(workdir.WorkdirLockedError, match="host elsewhere"):
    lock_lib.GcsLock(wd, stale_after_s=3).acquire()
  time.sleep(3.5)
  caplog.clear()
  lock = lock_lib.GcsLock(wd, stale_after_s=3, heartbeat_s=3600)
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  assert "has not refreshed it for" in caplog.text
  # A holder whose lock was taken over meanwhile finds out at its next heartbeat and leaves the new lock alone.
  _plant_lock(f"{wd}/{workdir.LOCK}", host="elsewhere", run_id="newholder")
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    lock.heartbeat()
  assert "was taken over by another run" in caplog.text
  lock.release()
  assert _lock_object(f"{wd}/{workdir.LOCK}")[0]["run_id"] == "newholder"


def test_gcs_holder_that_lost_its_lock_is_stopped_by_verify(gcs):
  wd = f"{gcs}/lost"
  lock = lock_lib.GcsLock(wd, heartbeat_s=3600)
  lock.acquire()
  lock.verify()  # held
  _plant_lock(f"{wd}/{workdir.LOCK}", host="elsewhere", run_id="newholder")  # taken over while it was paused
  with pytest.raises(workdir.WorkdirLockLostError, match="is now held by host elsewhere"):
    lock.verify()
  lock.heartbeat()  # no rewrite of the new holder's lock
  lock.release()
  assert _lock_object(f"{wd}/{workdir.LOCK}")[0]["run_id"] == "newholder"


# -----------------------------------------------------------------------------------------------------------
# The main job on GCS. Two self-contained tests (each worker of the xdist run has its own server).
# -----------------------------------------------------------------------------------------------------------
def test_run_to_the_end_on_gcs_equals_the_local_run_and_teaches_from_gcs_files(gcs, teacher_root):
  """teacher_root's tiny MAE teacher run again (the same config, in-process) with its workdir on GCS; then its
  weights as a teacher from the gs:// workdir, a gs:// .safetensors (head count from the gs:// sidecar) and .pth."""
  wd = f"{gcs}/r/teacher_mae"
  res = trainer.train_and_evaluate(tiny_config("teacher_mae", f"{gcs}/r", total_steps=12, ckpt_every_steps=4), wd)
  assert res["step"] == 12
  for name in ("config.json", "config.txt", "metrics.jsonl", "curves.png", "model.safetensors", "model.config.json",
               "run.json", "done.json"):
    assert paths.isfile(f"{wd}/{name}"), name
  assert _blob(f"{wd}/{workdir.LOCK}") is None  # released at the end
  assert paths.glob(f"{wd}/tensorboard/events.out.tfevents.*")
  assert sorted(paths.listdir(f"{wd}/checkpoints")) == ["12", "4", "8"]
  for step in (4, 8, 12):  # Orbax's mark of a complete step
    assert paths.isfile(f"{wd}/checkpoints/{step}/commit_success.txt")
  local = os.path.join(teacher_root, "teacher_mae")
  ours, theirs = writers.read_metrics(wd), writers.read_metrics(local)
  assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [2, 4, 6, 8, 10, 12, 12]
  assert [r.get("train/loss") for r in ours] == [r.get("train/loss") for r in theirs]
  _assert_same_weights(_weights(f"{wd}/model.safetensors"), _weights(os.path.join(local, "model.safetensors")))
  done = json.loads(paths.read_text(f"{wd}/done.json"))
  assert done["export"] == f"{wd}/model.safetensors" and done["step"] == 12
  # A rerun of a finished run does nothing.
  t = time.time()
  again = trainer.train_and_evaluate(tiny_config("teacher_mae", f"{gcs}/r", total_steps=12), wd)
  assert again["step"] == 12 and time.time() - t < 5

  # The teacher from GCS: its workdir, and its weights as files there.
  files = f"{gcs}/files"
  paths.write_atomic(f"{files}/teacher.safetensors", paths.read_bytes(f"{wd}/model.safetensors"))
  side = json.loads(paths.read_bytes(f"{wd}/model.config.json"))
  side["weights_file"] = "teacher.safetensors"  # a sidecar describes the file it names (copied: renamed with it)
  paths.write_atomic(f"{files}/teacher.config.json", json.dumps(side))
  # A .pth of its own stem, with its own sidecar (a sidecar describes one file, so teacher.pth would not read
  # teacher.config.json, which names teacher.safetensors).
  convert.save_pytorch_weights(_weights(f"{wd}/model.safetensors"), f"{files}/teacher_pt.pth",
                               sidecar=json.loads(paths.read_bytes(f"{wd}/model.config.json")))
  hashes = {}
  for source in (wd, f"{files}/teacher.safetensors", f"{files}/teacher_pt.pth", local):
    c = tiny_config("student_distill", f"{gcs}/r", **{"teacher.source": source, "teacher.num_heads": None})
    notes = builders.resolve_source_heads(c, teachers=c.teachers)
    if source.endswith(".safetensors"):  # recorded beside the file, on GCS
      assert c.teacher.num_heads == 4 and "teacher.config.json" in notes[0], notes
    teacher = distill.make_teacher(c)
    distill.load_teacher(teacher, c)
    hashes[source] = builders.weights_hash(teacher)
  assert len(set(hashes.values())) == 1, hashes


def _wait_for_blob(uri, proc, timeout=300):
  t = time.time()
  while time.time() - t < timeout:
    if _blob(uri) is not None:
      return
    if proc.poll() is not None:
      raise AssertionError(f"process ended before {uri} appeared:\n{proc.stdout.read()[-3000:]}")
    time.sleep(0.05)
  raise AssertionError(f"timeout waiting for {uri}")


def _upload(local_dir, uri):
  for root, _, files in os.walk(local_dir):
    for f in files:
      path = os.path.join(root, f)
      paths.write_atomic(f"{uri}/{os.path.relpath(path, local_dir)}", open(path, "rb").read())


def test_sigkill_resume_export_and_eval_on_gcs(gcs, teacher_root, tmp_path):
  """The student distilled by the command line twice from a teacher workdir copied to GCS: on local disk to the
  end, and on GCS SIGKILLed after its checkpoint at step 10, then rerun: the same weights. Then `convert export`
  from and to gs://, and the eval objective on the GCS workdir."""
  root = f"{gcs}/s"
  _upload(os.path.join(teacher_root, "teacher_mae"), f"{root}/teacher_mae")  # a local workdir copied to GCS
  ref, cut = str(tmp_path / "student_distill"), f"{root}/student_distill"
  args = tiny_args("student_distill", root, steps=40, ckpt=5)
  ref_proc, cut_proc = run_cli(args, ref), run_cli(args, cut)
  _wait_for_blob(f"{cut}/checkpoints/10/commit_success.txt", cut_proc)
  cut_proc.send_signal(signal.SIGKILL)
  cut_proc.wait()
  assert _blob(f"{cut}/done.json") is None
  resumed = run_cli(args, cut)
  out = resumed.communicate(timeout=600)[0]
  assert resumed.returncode == 0, out[-3000:]
  assert ref_proc.wait(timeout=600) == 0, ref_proc.stdout.read()[-3000:]
  assert "resumed from" in out
  assert "taking over the lock" in out and "is gone" in out  # the SIGKILLed run's lock is not stuck
  _assert_same_weights(_weights(f"{cut}/model.safetensors"), _weights(os.path.join(ref, "model.safetensors")))
  # Every record up to the resumed checkpoint reached GCS before the kill (a flush at each save), none twice.
  steps = [r["step"] for r in writers.read_metrics(cut) if "train/loss" in r]
  assert steps == list(range(2, 41, 2)), steps
  assert json.loads(paths.read_text(f"{cut}/run.json"))["teachers"]["teacher"]["source"] == f"{root}/teacher_mae"
  assert _blob(f"{cut}/{workdir.LOCK}") is None

  # convert export, from a gs:// workdir to gs://.
  out = f"{gcs}/export/student.safetensors"
  proc = subprocess.run([sys.executable, "-m", "tinymim_jax.convert", "export", "--workdir", cut, "--out", out],
                        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  _assert_same_weights(_weights(out), _weights(f"{cut}/model.safetensors"))
  exported, saved = (json.loads(paths.read_text(p)) for p in (f"{gcs}/export/student.config.json",
                                                               f"{cut}/model.config.json"))
  # The same architecture; each sidecar names the file it describes.
  assert (exported.pop("weights_file"), saved.pop("weights_file")) == ("student.safetensors", "model.safetensors")
  assert exported == saved

  # The eval objective on the GCS workdir (config.init gs://...), into a GCS workdir.
  ev = trainer.train_and_evaluate(
      tiny_config("student_eval", root, **{"eval.cached_probe": False, "eval.fewshot.enabled": False}),
      f"{root}/eval")
  distilled = json.loads(paths.read_text(f"{cut}/done.json"))
  assert ev["feature"] == distilled["feature"] == {"block": 3, "pool": "mean", "norm": True}  # read from GCS
  assert ev["eval/knn_top1"] == pytest.approx(distilled["eval/knn_top1"], abs=1e-9)
  assert json.loads(paths.read_text(f"{root}/eval/run.json"))["init"] == cut
  assert json.loads(paths.read_text(f"{root}/eval/done.json"))["eval/knn_top1"] == ev["eval/knn_top1"]
