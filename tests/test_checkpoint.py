"""Checkpoints: retention, checksums, damaged checkpoints (bit flips, truncation, missing metadata), failed saves.

The damage is done to a copy of a real finished run (the session's tiny MAE teacher, checkpoints 4, 8, 12).
"""

import glob
import logging
import os

from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest

from tinymim_jax import builders, checkpoint, convert
from tinymim_jax import train_steps as ts

from tests.helpers.faults import copy_run, damage, fail_json_saves_at


@pytest.fixture
def run_copy(teacher_root, tmp_path):
  return copy_run(os.path.join(teacher_root, "teacher_mae"), tmp_path / "teacher_mae")


def _weights(wd):
  return convert.export_pytorch_weights(builders.restore_model(wd))


def _model_item(meta):
  """What restore_model restores: the 'model' item of the model the checkpoint's config builds."""
  config = ml_collections.ConfigDict(meta["config"])
  model, extras = nnx.eval_shape(lambda: builders.make_trainable(config, num_classes=meta.get("num_classes")))
  _, params, consts = ts.split_model(model, extras)
  target = {"params": params, "consts": consts}
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return {"model": checkpoint.abstract(target, jax.tree.map(lambda _: local, target))}


def _steps(wd):
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(wd, "checkpoints", "[0-9]*"))
                if os.path.basename(p).isdigit())


# ---------------------------------------------------------------------------------------------------------
# Retention.
# ---------------------------------------------------------------------------------------------------------
def _tiny_state(k=0.0):
  return {"params": {"w": np.full((4, 3), k, np.float32)}, "consts": {}, "opt": {"m": np.arange(5, dtype=np.int32)}}


def test_the_latest_checkpoint_is_never_deleted(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, keep_every=4)
  for step in (2, 3, 4, 5, 6, 8, 9):
    ckpt.save(step, _tiny_state(step), {"step": step})
  ckpt.close()
  assert _steps(str(tmp_path)) == [4, 8, 9]  # Orbax's max_to_keep counts the newest; keep_period keeps 4, 8
  for keep, keep_every in ((0, None), (-1, None), (1, 0), (1, -2)):
    with pytest.raises(ValueError, match="keep_ckpts" if keep < 1 else "keep_every_steps"):
      checkpoint.Checkpointer(str(tmp_path / "x"), keep=keep, keep_every=keep_every)


# ---------------------------------------------------------------------------------------------------------
# Checksums.
# ---------------------------------------------------------------------------------------------------------
def test_checksums_do_not_depend_on_the_mesh_and_see_one_bit():
  from jax.sharding import NamedSharding, PartitionSpec as P
  x = np.random.default_rng(0).normal(size=(16, 24)).astype(np.float32)
  tree = {"a": x, "b": np.arange(6, dtype=np.int32), "c": np.float32(2.0), "h": x.astype(np.float16)}
  ref = checkpoint.array_checksums(tree)
  mesh = jax.make_mesh((4, 2), ("i", "j"))
  for spec in (P("i", "j"), P("j", None), P(None, "i")):
    sharded = dict(tree, a=jax.device_put(x, NamedSharding(mesh, spec)))
    assert checkpoint.array_checksums(sharded) == ref, spec
  flipped = x.copy()
  flipped.view(np.uint32)[5, 7] ^= 1 << 31
  assert checkpoint.array_checksums(dict(tree, a=flipped))["a"] != ref["a"]
  two = x.copy()
  two.view(np.uint32)[0, 0] ^= 1 << 31
  two.view(np.uint32)[3, 3] ^= 1 << 31  # the same bit twice: a plain weighted sum would cancel
  assert checkpoint.array_checksums(dict(tree, a=two))["a"] != ref["a"]
  assert checkpoint.array_checksums(dict(tree, a=x.T.copy().T))["a"] == ref["a"]


def test_saved_checkpoint_records_a_checksum_of_every_array(run_copy):
  ckpt = checkpoint.Checkpointer(run_copy, async_save=False)
  meta = ckpt.restore_meta()
  for item in ("model", "opt"):
    saved = {checkpoint._key_name(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(ckpt.mngr.item_metadata(12)[item].tree)[0]}
    assert len(saved) > 10 and set(meta["checksums"][item]) == saved, item
  ckpt.close()


# ---------------------------------------------------------------------------------------------------------
# Damaged checkpoints.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights_at(teacher_root, tmp_path_factory):
  """{step: exported weights} of the intact run's checkpoints 8 and 12."""
  wd = copy_run(os.path.join(teacher_root, "teacher_mae"), tmp_path_factory.mktemp("ref") / "teacher_mae")
  out = {12: _weights(wd)}
  os.rename(os.path.join(wd, "checkpoints", "12"), os.path.join(wd, "twelve"))
  out[8] = _weights(wd)
  return out


# One case per kind of damage: a bit flip (the checksum; 1 bit, the least a checksum must see: 2 flipped bits take
# the same path in test_the_trainer_moves_a_damaged_checkpoint_aside), a truncated data file, lost metadata.
@pytest.mark.parametrize("how", ["flip1", "truncate", "no_metadata"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(run_copy, weights_at, how, caplog):
  damage(run_copy, 12, how)
  with caplog.at_level(logging.WARNING):
    restored = _weights(run_copy)  # restore_model (a teacher / init / export): skips it, leaves it in place
  assert "checkpoint step 12" in caplog.text and "damaged" in caplog.text, caplog.text
  assert all(np.array_equal(restored[k], weights_at[8][k]) for k in restored)
  assert any(not np.array_equal(restored[k], weights_at[12][k]) for k in restored)
  assert "Traceback" not in caplog.text and max(len(r.getMessage()) for r in caplog.records) < 1000
  assert _steps(run_copy) == [4, 8, 12]


def test_the_trainer_moves_a_damaged_checkpoint_aside(run_copy, caplog):
  damage(run_copy, 12, "flip2")
  ckpt = checkpoint.Checkpointer(run_copy)
  with caplog.at_level(logging.WARNING):
    step, _, meta = ckpt.restore_intact(_model_item, move_aside=True)
  ckpt.close()
  assert step == meta["step"] == 8 and _steps(run_copy) == [4, 8]
  (aside,) = glob.glob(os.path.join(run_copy, "checkpoints", "12.damaged-*"))  # renamed, never deleted
  assert f"moved aside to {aside}" in caplog.text


def test_no_intact_checkpoint_is_a_short_error_listing_what_was_found(run_copy):
  for step, how in ((4, "flip1"), (8, "truncate"), (12, "no_metadata")):
    damage(run_copy, step, how)
  with pytest.raises(checkpoint.NoIntactCheckpointError) as e:
    builders.restore_model(run_copy)
  msg = str(e.value)
  assert all(f"step {s}:" in msg for s in (4, 8, 12)) and len(msg.splitlines()) < 10, msg
  assert "checksum mismatch" in msg and "Traceback" not in msg
  assert _steps(run_copy) == [4, 8, 12]  # nothing moved when nothing is intact


# ---------------------------------------------------------------------------------------------------------
# Failed saves.
# ---------------------------------------------------------------------------------------------------------
def test_failed_save_is_one_line_with_path_and_errno_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
  fail_json_saves_at(monkeypatch, 3)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  ckpt.save(2, _tiny_state(2), {"step": 2})
  ckpt.save(3, _tiny_state(3), {"step": 3})
  with pytest.raises(checkpoint.CheckpointSaveError) as e:
    ckpt.wait()
  msg = str(e.value)
  assert "[Errno 28] No space left on device" in msg and "3.orbax-checkpoint-tmp" in msg and "\n" not in msg
  assert _steps(str(tmp_path)) == [2] and not glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))
  ckpt.close()


# ---------------------------------------------------------------------------------------------------------
# A checkpoint that lost its checksums; the NaN stop names a checkpoint only after verifying it.
# ---------------------------------------------------------------------------------------------------------
def _drop_checksums(wd, step):
  import json
  (path,) = [p for p in glob.glob(os.path.join(wd, "checkpoints", str(step), "meta", "*")) if os.path.isfile(p)
             and "checksums" in open(p).read()]
  meta = json.load(open(path))
  del meta["checksums"]
  json.dump(meta, open(path, "w"))


def test_a_checkpoint_that_lost_its_checksums_is_damaged(tmp_path, caplog):
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  for step in (2, 3):
    ckpt.save(step, _tiny_state(step), {"step": step})
  ckpt.close()
  _drop_checksums(str(tmp_path), 3)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    state, meta = ckpt.restore(checkpoint.abstract(_tiny_state()), move_aside=False)
  assert meta["step"] == 2 and float(state["params"]["w"][0, 0]) == 2.0
  assert "checkpoint step 3" in caplog.text and "checksum record is missing" in caplog.text
  abstract = checkpoint.abstract(_tiny_state())
  assert ckpt.verify(2, abstract) is None and "checksum record is missing" in ckpt.verify(3, abstract)
  ckpt.close()


def test_the_nan_stop_names_a_checkpoint_only_after_verifying_it():
  from tinymim_jax import main as trainer
  nan = lambda: {"nonfinite": 1, "loss": float("nan")}  # pylint: disable=unnecessary-lambda-assignment
  with pytest.raises(trainer.NonFiniteLossError, match=r"resumes from checkpoint step 4, saved before it "
                                                         r"\(verified against its checksums\)"):
    trainer._check_finite(nan(), 7, 4, verify=lambda s: None)
  with pytest.raises(trainer.NonFiniteLossError) as e:
    trainer._check_finite(nan(), 7, 4, verify=lambda s: "checksum mismatch in 1 array(s): model/w")
  assert "checkpoint step 4, the newest before it, does not verify (checksum mismatch" in str(e.value)
  assert "finite weights" not in str(e.value)


def test_read_only_restores_and_damaged_fallbacks_log_no_library_noise(run_copy):
  """What a user sees on stderr (absl / Python logging as a script sets it up): the warning, not Orbax's notices
  or library tracebacks."""
  import subprocess
  import sys
  damage(run_copy, 12, "truncate")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import logging; logging.basicConfig(level=logging.INFO); from tinymim_jax import builders; "
          f"builders.restore_model({str(run_copy)!r}); print('restored')")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root})
  err = res.stderr
  assert res.returncode == 0 and "restored" in res.stdout, err[-3000:]
  assert "read only" not in err and "Traceback" not in err, err[-3000:]
  assert err.count("is damaged") == 1
