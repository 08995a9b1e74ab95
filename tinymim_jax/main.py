r"""The main job: one flat trainer for TinyMIM distillation, MAE pretraining, fine-tuning and evaluation.

  python -m tinymim_jax.main --config configs/tinymim_distill.py:student=small --workdir workdirs/tinymim_s \
      [--config.batch_size=1024 --config.data.data_dir=/data/tfds ...]

The config's `objective` picks the step ('distill' | 'mae_pretrain' | 'finetune' | 'linprobe' | 'eval' |
'segment': UperNet on the ViT, configs/segment.py). A rerun
with the same workdir resumes from its newest intact checkpoint; a finished run (workdir/done.json) is not run
again. One run at a time holds the workdir (tinymim_jax/workdir.py), and a resumed run's config is checked against
the workdir's. Sections: processes & mesh, data, model & teacher, optimizer, checkpoint, loop, evals, export.

'linprobe' trains a linear probe on a frozen encoder (linprobe.py); 'eval' reports every eval of a trained
model (`init`: a workdir or a .pth / .safetensors file) without training: k-NN, few-shot and a linear probe on
cached features, plus the head's top-1 if it has one.

Exit statuses: 0 finished (or finished earlier); 75 (EX_TEMPFAIL) stopped by SIGTERM after saving a checkpoint:
rerun the same command to resume (launch/slurm.sbatch requeues on it); 1 failed (a one-line reason for a bad
config, a busy workdir, a lost workdir lock, a forbidden config change (incl. a source whose weights changed),
damaged checkpoints, a failed save or export, a NaN/Inf loss or a weights source that cannot be read).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from tinymim_jax import builders, checkpoint, config_base, convert, data, errors, evals, features, objectives
from tinymim_jax import config_identity, environment, paths, periodic
from tinymim_jax import lock as lock_lib
from tinymim_jax import workdir as workdir_lib
from tinymim_jax import writers
from tinymim_jax import sharding as sh
from tinymim_jax import train_steps as ts

EXIT_PREEMPTED = os.EX_TEMPFAIL  # 75: saved, needs a rerun
EXIT_FAILED = 1


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/Inf; the state was not updated and nothing was saved after it."""


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly. A Python handler that was in
  place before (an application running several runs, e.g. the study) is called too, so that it stops after this
  run."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. called from a test thread): no handler
      self._old = None

  def _handler(self, signum, frame):
    self.requested = True
    if callable(self._old):
      self._old(signum, frame)

  def check(self, save_failed: bool = False) -> tuple[bool, bool]:
    """-> (SIGTERM seen, a checkpoint save failed), each on any process."""
    return sh.any_process(self.requested, save_failed)  # every process must agree, or a lone save would hang

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _mean_metrics(buffer: list[dict]) -> dict[str, float]:
  return {k: float(np.mean([m[k] for m in buffer])) for k in buffer[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the job `config` describes in `workdir`; returns the final metrics, or {'preempted': True,
  'step'} after a SIGTERM. Raises workdir.WorkdirLockedError (another run holds the workdir),
  workdir.ConfigChangeError, checkpoint.CheckpointError (no intact checkpoint, a checkpoint that does not fit, a
  failed save), config_base.ConfigError (data that cannot work) or NonFiniteLossError."""
  paths.makedirs(workdir)
  done_path = os.path.join(workdir, workdir_lib.DONE)
  if paths.exists(done_path):
    done = json.loads(paths.read_text(done_path))
    logging.info("%s: finished earlier (step %s); nothing to do", workdir, done.get("step"))
    return done
  preemption = _Preemption()  # first: a SIGTERM during set-up is honoured after the first step
  lock = None
  try:
    lock = lock_lib.acquire_for_job(workdir, process_index=jax.process_index(),
                                       agree=sh.all_processes if jax.process_count() > 1 else None)
    config = objectives.resolve_run(config)  # the run's description: nothing changes it from here on
    res = _train_and_evaluate(config, workdir, preemption, _config_changes(config, workdir), lock)
    if lock is not None:
      lock.release()
    sh.barrier("tinymim_workdir_released")  # no process exits (and a launcher stops the others) before the lock is free
    return res
  finally:
    if lock is not None:
      lock.release()
    preemption.restore()


def _config_changes(config, workdir: str) -> dict:
  """How `config` differs from the one the workdir's checkpoints were trained with ({} for a fresh run); raises
  workdir.ConfigChangeError for a change to the model or the checkpoint's meaning (config_identity.FIXED and the objective's fixed fields)."""
  if not objectives.get(config.objective).trains or not checkpoint.has_checkpoint(workdir):
    return {}
  saved = workdir_lib.saved_config(workdir)
  if saved is None:  # config.json deleted: every checkpoint records the config it was trained with
    saved = checkpoint.saved_config(workdir)
    if saved is None:
      raise checkpoint.NoIntactCheckpointError(
          f"{workdir} has checkpoints but neither {workdir_lib.CONFIG} nor a checkpoint that records its config: "
          "its identity cannot be checked. Use a new workdir.")
    logging.warning("%s: no %s; checking the config against the one its newest checkpoint records", workdir,
                    workdir_lib.CONFIG)
  return config_identity.check_config_change(saved, config, allow=config.allow_config_change)


def _check_data(objective, config, info) -> None:
  """Data that can only give garbage stops the run here, before anything is compiled."""
  where = f"data.name={config.data.name!r}" + (f", data.folder={config.data.folder!r}"
                                                 if config.data.name == "folder" else "")
  objective.check_data(config, info, where)
  if not info.num_eval:  # every run ends with an eval on the held-out split (and monitors on it)
    raise config_base.ConfigError(
        f"the data ({where}) has no held-out split, which the evals read (the final eval, eval_every_steps, "
        "k-NN): for data.name='folder' add <folder>/val/<class>/*")


def _check_lock(lock) -> None:
  """Raises workdir.WorkdirLockLostError on every process once process 0's lock is another run's (a holder paused
  past the staleness limit, taken over meanwhile): called before every checkpoint save, so that none lands."""
  error = None
  if lock is not None:
    try:
      lock.verify()
    except workdir_lib.WorkdirLockLostError as e:
      error = e
  if sh.any_process(error is not None)[0]:
    raise error or workdir_lib.WorkdirLockLostError("process 0 lost the workdir's lock to another run (its log "
                                                    "says which); stopped without writing anything more")


def _train_and_evaluate(config, workdir: str, preemption: _Preemption, config_changes: dict,
                        lock=None) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  guard = lock.verify if lock is not None else None  # before every write into the workdir
  objective = objectives.get(config.objective)

  # Mesh (processes were started by main() through sharding.initialize_distributed()), data, schedule.
  mesh = sh.make_mesh(fsdp=config.mesh.fsdp)
  if config.batch_size % mesh.devices.size or config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must divide evenly over {mesh.devices.size} devices")
  info = objective.dataset_info(config)
  _check_data(objective, config, info)
  steps_per_epoch = objective.steps_per_epoch(config, info)
  total_steps, warmup_steps = periodic.run_length(config, steps_per_epoch)

  # What the objective trains, with what, and what its evals read.
  run = objective.setup(config, info, total_steps=total_steps, warmup_steps=warmup_steps, is_main=is_main)
  state = run.state
  meta: dict[str, Any] = {"objective": config.objective, "num_classes": info.num_classes, "seed": config.seed,
                          **run.meta, "feature": run.feature_spec.to_dict()}
  if run.record is not None:
    meta[builders.MODEL_KEY] = run.record
  if run.step is None:
    return _final_evals(config, run, workdir, mesh, meta, info, lock)

  # Checkpoint: resume from the newest intact one, onto this mesh.
  state_sharding = sh.tree_sharding(state, mesh)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_ckpts, keep_every=config.keep_every_steps)
  saved = lambda tree: {k: v for k, v in tree.items() if k not in run.frozen}
  if ckpt.all_steps():  # damaged ones are moved aside with a warning
    restored, saved_meta = ckpt.restore(checkpoint.abstract(saved(state), saved(state_sharding)))
    config_identity.check_source_change(saved_meta, meta, allow=config.allow_config_change)
    state.update(restored)
    logging.info("resumed from %s at step %d", ckpt.directory, int(state["step"]))
    if is_main:
      config_identity.record_config_change(workdir, config, config_changes, step=int(state["step"]))
      if workdir_lib.saved_config(workdir) is None:  # deleted: the identity came from the checkpoint
        writers.write_config(workdir, config)
  state = jax.device_put(state, state_sharding)
  start_step = int(state["step"])
  meta["config"] = json.loads(config.to_json_best_effort())
  meta["versions"] = {**environment.versions(("jax", "flax", "optax")), "devices": environment.jax_devices()}
  train_step = ts.jit_step(run.step, state_sharding, mesh)
  rng = jax.random.PRNGKey(config.seed)

  # Loop.
  writer = writers.MetricWriter(workdir, enabled=is_main, resume_step=start_step, guard=guard)
  if is_main and start_step == 0:
    writer.write_config(config)
    paths.write_atomic(os.path.join(workdir, workdir_lib.RUN),
                       json.dumps({k: v for k, v in meta.items() if k != "config"}, indent=2))
  if run.make_evaluator is not None:
    evaluator = run.make_evaluator(state_sharding, mesh, workdir)
  else:
    evaluator = evals.Evaluator(config, run.predict, state_sharding, run.predict_keys, mesh, info, head=run.head)
  others = [evals.Evaluator(config, predict, state_sharding, keys, mesh, info, head=run.head, name=name,
                            frozen_features=False) for name, (predict, keys) in run.extra_evals.items()]

  def evaluate(state):
    res = evaluator(state)
    for other in others:
      res.update(other(state))
    return res

  if run.train_iterator is not None:
    it = run.train_iterator(evaluator, state, start_step, steps_per_epoch)
  else:
    it = data.make_train_iterator(config.data, mode=objective.data_mode, global_batch_size=config.batch_size,
                                  seed=config.seed, start_step=start_step)
  progress = writers.Progress(total_steps, initial_step=start_step, enabled=is_main, desc=config.objective)
  pending, buffer, last_saved = None, [], ckpt.latest_step()
  saved_abstract = checkpoint.abstract(saved(state), saved(state_sharding))
  verify = lambda s: ckpt.verify(s, saved_abstract)  # pylint: disable=unnecessary-lambda-assignment
  step = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = data.to_global(next(it), mesh, jax.sharding.PartitionSpec(sh.BATCH_AXES))
      state, metrics = train_step(state, batch, rng)
      if step == start_step + 1:  # the step is compiled now
        ts.trim_host_memory()
      # Metrics are fetched one step late so the host never waits for the device.
      if pending is not None:
        buffer.append(_check_finite(jax.device_get(pending[1]), pending[0], last_saved, verify))
      pending = (step, metrics)
      progress.update(step, images_per_step=config.batch_size,  # shows the latest fetched loss / lr
                      loss=buffer[-1]["loss"] if buffer else None, lr=buffer[-1]["lr"] if buffer else None)
      last = step == total_steps
      if periodic.is_due(step, config.log_every_steps, last=last):
        buffer.append(_check_finite(jax.device_get(pending[1]), step, last_saved, verify))
        pending = None
        train = {f"train/{k}": v for k, v in _mean_metrics(buffer).items()}
        train["train/skipped_images"] = float(it.skipped)
        writer.write(step, train)
        buffer = []
      if periodic.is_due(step, config.eval_every_steps) and not last:  # the last step's eval is the final one
        writer.write(step, evaluate(state))
      save_error = _poll_saves(ckpt)
      preempted, save_failed = preemption.check(save_error is not None)
      if save_failed:  # stop at once, on every process, with the earlier checkpoints intact
        raise save_error or checkpoint.CheckpointSaveError("a checkpoint save failed on another process")
      if periodic.is_due(step, config.ckpt_every_steps, last=last or preempted):
        if pending is not None:  # the NaN guard sees every step before it is saved
          buffer.append(_check_finite(jax.device_get(pending[1]), pending[0], last_saved, verify))
          pending = None
        _check_lock(lock)
        writer.flush()  # an object store's metrics.jsonl holds every record up to the checkpoint
        ckpt.save(step, saved(state), {**meta, "step": step})
        last_saved = step
      if preempted:
        ckpt.wait()
        logging.warning("SIGTERM: saved step %d in %s; rerun the same command to resume (exit status %d)", step,
                        workdir, EXIT_PREEMPTED)
        return {"preempted": True, "step": step}
  finally:
    progress.close()
    ckpt.wait()

  # Final evals and export.
  final = evaluate(state)
  writer.write(total_steps, final)
  writer.close()
  ckpt.close()
  model = run.export(state) if run.export is not None else None
  if run.write_exports is not None:
    final.update(run.write_exports(state, workdir))
  return _finish_run(config, workdir, model, {**final, "step": total_steps, "feature": meta["feature"]}, lock)


def _poll_saves(ckpt) -> checkpoint.CheckpointSaveError | None:
  try:
    ckpt.poll()
  except checkpoint.CheckpointSaveError as e:
    return e
  return None


def _check_finite(metrics: dict, step: int, last_saved: int | None,
                  verify: Callable[[int], str | None] | None = None) -> dict:
  """Raises NonFiniteLossError if the step's loss or gradient was NaN/Inf. Every step is checked before a
  checkpoint after it is saved, so the checkpoints this run saved hold finite weights from before the blow-up;
  the one the message names is verified against its checksums first (`verify(step)`: None when intact, else
  what is wrong; Checkpointer.verify), since a blow-up may come from damaged weights it was resumed from."""
  if metrics.pop("nonfinite", 0):
    problem = verify(last_saved) if last_saved is not None and verify is not None else None
    if last_saved is None:
      resume = "no checkpoint was saved before it, so a rerun starts from step 0"
    elif verify is None:
      resume = f"the newest checkpoint before it is step {last_saved} (not verified)"
    elif problem is None:
      resume = (f"a rerun resumes from checkpoint step {last_saved}, saved before it (verified against its "
                f"checksums)")
    else:
      resume = (f"checkpoint step {last_saved}, the newest before it, does not verify ({problem}): a rerun moves "
                f"it aside and resumes from an older intact one")
    raise NonFiniteLossError(
        f"the loss or gradient became NaN/Inf at step {step} (loss={metrics.get('loss')}, "
        f"grad_norm={metrics.get('grad_norm')}). Stopped without saving or deleting anything: {resume}. Lower "
        "optim.base_lr or check the data, then rerun.")
  return metrics


def _final_evals(config, run, workdir, mesh, meta, info, lock=None):
  """An objective that trains nothing (eval): every eval of its frozen model, written as step 0."""
  shardings = sh.tree_sharding(run.state, mesh)
  state = jax.device_put(run.state, shardings)
  evaluator = evals.Evaluator(config, run.predict, shardings, run.predict_keys, mesh, info, head=run.head,
                              encoder=run.frozen_encoder, feature_spec=run.feature_spec)
  res = evaluator(state, cached_probe=config.eval.cached_probe)
  _check_lock(lock)
  if jax.process_index() == 0:
    paths.write_atomic(os.path.join(workdir, workdir_lib.RUN), json.dumps(meta, indent=2))
  with writers.MetricWriter(workdir, enabled=jax.process_index() == 0,
                            guard=lock.verify if lock is not None else None) as w:
    w.write_config(config)
    w.write(0, res)
  return _finish_run(config, workdir, None, {**res, "step": 0, "feature": meta["feature"]}, lock)


def _finish_run(config, workdir, model, final: dict, lock=None) -> dict:
  _check_lock(lock)  # a run that lost its lock exports nothing
  if jax.process_index() == 0:
    path = target = os.path.join(workdir, workdir_lib.EXPORT)
    try:
      if model is not None and config.export:
        # The feature spec rides in the header, so that evals of the exported file read the same features; the
        # architecture (heads, pooling, ...) goes beside it, in model.config.json. Written as new files: a failed
        # write leaves an earlier export whole.
        convert.save_pytorch_weights(model, path, metadata={features.METADATA_KEY: json.dumps(final["feature"])})
        final["export"] = path
      if lock is not None:
        lock.verify()
      target = os.path.join(workdir, workdir_lib.DONE)
      paths.write_atomic(target, json.dumps(final, indent=2))  # last: the run is complete
    except OSError as e:
      raise workdir_lib.ExportError(
          f"writing the finished run to {workdir} failed ({target}: [Errno {e.errno}] {e.strerror}). The checkpoints "
          "and any earlier export are intact: free the space / fix the problem and rerun the same command (it "
          "exports again from the last checkpoint).") from None
  return final


def quiet_library_logs() -> None:
  """Our INFO lines stay; Orbax's and TF's per-save INFO chatter does not."""
  noisy = ("/orbax/", "/tensorflow/", "/tensorflow_datasets/", "/etils/", "/jax/_src/")

  class _Filter(logging.Filter):
    def filter(self, record):
      if not any(n in record.pathname for n in noisy):
        return True
      if record.levelno >= logging.WARNING and record.exc_info:  # one line, not a library traceback
        record.msg, record.args = record.getMessage().splitlines()[0][:300], ()
        record.exc_info = record.exc_text = None
      return record.levelno >= logging.WARNING

  root = logging.getLogger()
  root.setLevel(logging.INFO)
  for handler in root.handlers or [logging.StreamHandler()]:
    handler.addFilter(_Filter())
    if handler not in root.handlers:
      root.addHandler(handler)


# -----------------------------------------------------------------------------------------------------
# Command line.
# -----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "config file, optionally with ':arg'", lock_config=True)
  flags.DEFINE_string("workdir", None, "where checkpoints, metrics, plots and exports go")
  flags.mark_flags_as_required(["config", "workdir"])

  def run(_):
    quiet_library_logs()
    sh.initialize_distributed()
    try:
      config = config_base.finalize(flags.FLAGS.config)
      res = train_and_evaluate(config, flags.FLAGS.workdir)
    except Exception as e:  # pylint: disable=broad-except  (a user's mistake is one line; anything else re-raised)
      if not errors.is_user_error(e, also=USER_ERRORS):
        raise
      print(errors.one_line(e), file=sys.stderr)
      return EXIT_FAILED
    if jax.process_index() == 0:
      print(json.dumps(res, indent=2))
    return EXIT_PREEMPTED if res.get("preempted") else 0

  app.run(run, argv=argv, flags_parser=_parse_flags)  # exits with run's status
  return 0


# Errors whose message is complete wherever they are raised: one line, no traceback (besides every ValueError /
# FileNotFoundError our own code raises about its input: errors.is_user_error).
USER_ERRORS = (config_base.ConfigError, convert.ConvertError, workdir_lib.WorkdirError, checkpoint.CheckpointError,
               NonFiniteLossError)


def _parse_flags(argv):
  """absl's flag parsing, with a misspelt or moved `--config.<field>` (or any other bad flag) as one error line
  naming it, with did-you-mean, instead of ml_collections' traceback."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (flags.Error, or KeyError / AttributeError of a path)
    print(_unknown_override(argv) or errors.one_line(e), file=sys.stderr)
    sys.exit(EXIT_FAILED)


def _unknown_override(argv) -> str | None:
  """'error: --config.knn.max_train: no such config field (moved to eval.max_train)' for the first override
  whose field the config file does not have; None when all exist (or the config itself cannot be loaded)."""
  from tinymim_jax.study import load_config_module
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  if spec is None:
    return None
  path, _, arg = spec.partition(":")
  try:
    module = load_config_module(path)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except  (the original error says what is wrong with it)
    return None
  known = set(_field_paths(config))
  for a in argv:
    if a.startswith("--config.") and "=" in a:
      field = a[len("--config."):].split("=", 1)[0]
      if field not in known:
        return f"error: --config.{field}: no such config field{errors.did_you_mean(field, sorted(known))}"
  return None


def _field_paths(config, prefix=""):
  for key, value in config.items():
    yield prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      yield from _field_paths(value, prefix + key + ".")


if __name__ == "__main__":
  sys.exit(main())
