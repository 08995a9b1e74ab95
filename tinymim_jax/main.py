r"""The main job: one flat trainer for TinyMIM distillation, MAE pretraining, fine-tuning and evaluation.

  python -m tinymim_jax.main --config configs/tinymim_distill.py:student=small --workdir workdirs/tinymim_s \
      [--config.batch_size=1024 --config.data.data_dir=/data/tfds ...]

The config's `objective` picks the step ('distill' | 'mae_pretrain' | 'finetune' | 'eval'). A rerun with the same
workdir resumes from its newest intact checkpoint; a finished run (workdir/done.json) is not run again. One run at a
time holds the workdir (tinymim_jax/workdir.py), and a resumed run's config is checked against the workdir's.
Sections: processes & mesh, data, model & teacher, optimizer, checkpoint, loop, evals, export.

Exit statuses: 0 finished (or finished earlier); 75 (EX_TEMPFAIL) stopped by SIGTERM after saving a checkpoint:
rerun the same command to resume (launch/slurm.sbatch requeues on it); 1 failed (a one-line reason for a bad
config, a busy workdir, a forbidden config change, damaged checkpoints, a failed save or a NaN/Inf loss).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from tinymim_jax import builders, checkpoint, config_base, data, knn, writers
from tinymim_jax import workdir as workdir_lib
from tinymim_jax import sharding as sh
from tinymim_jax import train_steps as ts

DONE = "done.json"
EXIT_PREEMPTED = os.EX_TEMPFAIL  # 75: saved, needs a rerun
EXIT_FAILED = 1


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/Inf; the state was not updated and nothing was saved after it."""


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. called from a test thread): no handler
      self._old = None

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def check(self, save_failed: bool = False) -> tuple[bool, bool]:
    """-> (SIGTERM seen, a checkpoint save failed), each on any process."""
    flags = np.asarray([self.requested, save_failed])
    if jax.process_count() > 1:  # every process must agree, or a lone save would hang
      from jax.experimental import multihost_utils
      flags = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, 2).any(0)
    return bool(flags[0]), bool(flags[1])

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _schedule_lengths(config, steps_per_epoch: int) -> tuple[int, int]:
  total = config.total_steps if config.total_steps is not None else int(config.total_epochs * steps_per_epoch)
  warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_epochs * steps_per_epoch)
  if total < 1:
    raise ValueError(f"the run has {total} steps: check config.total_steps / total_epochs / batch_size")
  return total, warmup


def _mean_metrics(buffer: list[dict]) -> dict[str, float]:
  return {k: float(np.mean([m[k] for m in buffer])) for k in buffer[0]}


def _versions() -> dict[str, str]:
  import flax
  import optax
  return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "python": sys.version.split()[0], "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the job `config` describes in `workdir`; returns the final metrics, or {'preempted': True,
  'step'} after a SIGTERM. Raises workdir.WorkdirLockedError (another run holds the workdir),
  workdir.ConfigChangeError, checkpoint.CheckpointError (no intact checkpoint, a checkpoint that does not fit, a
  failed save), config_base.ConfigError (data that cannot work) or NonFiniteLossError."""
  os.makedirs(workdir, exist_ok=True)
  done_path = os.path.join(workdir, DONE)
  if os.path.exists(done_path):
    with open(done_path) as f:
      done = json.load(f)
    logging.info("%s: finished earlier (step %s); nothing to do", workdir, done.get("step"))
    return done
  preemption = _Preemption()  # first: a SIGTERM during set-up is honoured after the first step
  lock = None
  try:
    lock = workdir_lib.acquire_for_job(workdir, process_index=jax.process_index(),
                                       agree=_all_processes if jax.process_count() > 1 else None)
    res = _train_and_evaluate(config, workdir, preemption, _config_changes(config, workdir))
    if lock is not None:
      lock.release()
    if jax.process_count() > 1:  # no process exits (and a launcher stops the others) before the lock is free
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("tinymim_workdir_released")
    return res
  finally:
    if lock is not None:
      lock.release()
    preemption.restore()


def _all_processes(ok: bool) -> bool:
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray(ok))).all())


def _config_changes(config, workdir: str) -> dict:
  """How `config` differs from the one the workdir's checkpoints were trained with ({} for a fresh run); raises
  workdir.ConfigChangeError for a change to the model or the checkpoint's meaning (workdir.FIXED, FIXED_FOR)."""
  saved = workdir_lib.saved_config(workdir)
  if saved is None or config.objective == "eval" or not checkpoint.has_checkpoint(workdir):
    return {}
  return workdir_lib.check_config_change(saved, config, allow=config.allow_config_change)


def _check_data(config, info) -> None:
  """Data that can only give garbage stops the run here, before anything is compiled."""
  where = f"data.name={config.data.name!r}" + (f", data.folder={config.data.folder!r}"
                                                 if config.data.name == "folder" else "")
  if config.objective in ("finetune", "eval"):
    if config.model.num_classes and config.model.num_classes != info.num_classes:
      raise config_base.ConfigError(
          f"config.model.num_classes={config.model.num_classes}, but the data ({where}) has {info.num_classes} "
          f"classes: set --config.model.num_classes={info.num_classes}, or 0 to take the data's count")
    if config.objective == "finetune" and info.num_classes < 2:
      raise config_base.ConfigError(f"fine-tuning needs at least 2 classes; the data ({where}) has "
                                    f"{info.num_classes}")
  if not info.num_eval:  # every run ends with an eval on the held-out split (and monitors on it)
    raise config_base.ConfigError(
        f"the data ({where}) has no held-out split, which the evals read (the final eval, eval_every_steps, "
        "k-NN): for data.name='folder' add <folder>/val/<class>/*")


def _train_and_evaluate(config, workdir: str, preemption: _Preemption, config_changes: dict) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  objective = config.objective

  # ---------------------------------------------------------------------------------------------------
  # Mesh. (Processes were started by main() through sharding.initialize_distributed().)
  # ---------------------------------------------------------------------------------------------------
  mesh = sh.make_mesh(fsdp=config.mesh.fsdp)
  n_batch_shards = mesh.devices.size
  if config.batch_size % n_batch_shards or config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must divide evenly over {n_batch_shards} devices")

  # ---------------------------------------------------------------------------------------------------
  # Data.
  # ---------------------------------------------------------------------------------------------------
  info = data.dataset_info(config.data)
  _check_data(config, info)
  steps_per_epoch = data.steps_per_epoch(config.data, global_batch_size=config.batch_size)
  total_steps, warmup_steps = _schedule_lengths(config, steps_per_epoch)

  # ---------------------------------------------------------------------------------------------------
  # Model and teacher.
  # ---------------------------------------------------------------------------------------------------
  model, extras = builders.make_trainable(config, num_classes=info.num_classes)
  meta: dict[str, Any] = {"objective": objective, "num_classes": info.num_classes, "seed": config.seed}
  if config.init:
    # Fine-tuning starts from a pretrained / distilled encoder: a fresh fc_norm + head, `norm` dropped.
    report = builders.load_weights(model, config.init, skip=config.init_skip,
                                   allow_missing=(r"fc_norm\..*", r"head\..*") if objective != "eval" else ())
    logging.info("init from %s:\n%s", config.init, report)
    meta["init"] = os.path.abspath(config.init)
  teacher = None
  if objective == "distill":
    teacher = builders.make_teacher(config)
    report = builders.load_weights(teacher, config.teacher.source)
    logging.info("teacher from %s:\n%s", config.teacher.source, report)
    meta["teacher"] = {"source": os.path.abspath(config.teacher.source), "sha256": builders.weights_hash(teacher),
                       "name": config.teacher.name, "block": config.distill.teacher_block}
  if objective == "eval":
    return _final_evals(config, workdir, model, mesh, meta, step=0)

  # ---------------------------------------------------------------------------------------------------
  # Optimizer.
  # ---------------------------------------------------------------------------------------------------
  spec = builders.distill_spec(config) if objective == "distill" else None
  tx, schedule, rules_table = builders.make_optimizer(config, ts.split_model(model, extras)[1], spec=spec,
                                                      total_steps=total_steps, warmup_steps=warmup_steps)
  if is_main:
    logging.info("optimizer:\n%s", rules_table)
  modeldef, teacher_graphdef, state = ts.init_state(model, tx, teacher=teacher, extras=extras)
  del model, teacher, extras

  # ---------------------------------------------------------------------------------------------------
  # Checkpoint: resume from the latest one, onto this mesh.
  # ---------------------------------------------------------------------------------------------------
  state_sharding = sh.tree_sharding(state, mesh)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_ckpts, keep_every=config.keep_every_steps)
  if ckpt.all_steps():  # the newest intact one; damaged ones are moved aside with a warning
    restored, saved_meta = ckpt.restore(checkpoint.abstract(ts.checkpointable(state),
                                                            ts.checkpointable(state_sharding)))
    if saved_meta.get("teacher", {}).get("sha256") not in (None, meta.get("teacher", {}).get("sha256")):
      logging.warning("the teacher's weights differ from the ones this run started with (%s)",
                      saved_meta["teacher"]["source"])
    state.update(restored)
    logging.info("resumed from %s at step %d", ckpt.directory, int(state["step"]))
    if is_main:
      workdir_lib.record_config_change(workdir, config, config_changes, step=int(state["step"]))
  state = jax.device_put(state, state_sharding)
  start_step = int(state["step"])
  meta["config"] = json.loads(config.to_json_best_effort())
  meta["versions"] = _versions()

  # ---------------------------------------------------------------------------------------------------
  # Steps.
  # ---------------------------------------------------------------------------------------------------
  if objective == "distill":
    step_fn = ts.make_distill_step(modeldef, teacher_graphdef, tx, schedule, spec)
  elif objective == "mae_pretrain":
    step_fn = ts.make_mae_step(modeldef, tx, schedule, mask_ratio=config.mae.mask_ratio,
                               norm_pix=config.mae.norm_pix)
  else:
    f = config.finetune
    step_fn = ts.make_finetune_step(modeldef, tx, schedule, num_classes=info.num_classes, mixup=f.mixup,
                                    cutmix=f.cutmix, switch_prob=f.switch_prob, label_smoothing=f.label_smoothing)
  train_step = ts.jit_step(step_fn, state_sharding, mesh)
  rng = jax.random.PRNGKey(config.seed)

  # ---------------------------------------------------------------------------------------------------
  # Loop.
  # ---------------------------------------------------------------------------------------------------
  writer = writers.MetricWriter(workdir, enabled=is_main, resume_step=start_step)
  if is_main and start_step == 0:
    writer.write_config(config)
    with open(os.path.join(workdir, "run.json"), "w") as f:
      json.dump({k: v for k, v in meta.items() if k != "config"}, f, indent=2)
  it = data.make_train_iterator(config.data, mode=objective, global_batch_size=config.batch_size,
                                seed=config.seed, start_step=start_step)
  progress = writers.Progress(total_steps, initial_step=start_step, enabled=is_main, desc=objective)
  pending, buffer, last_saved = None, [], ckpt.latest_step()
  evaluator = _Evaluator(config, modeldef, mesh, state_sharding, info)
  step = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = data.to_global(next(it), mesh, jax.sharding.PartitionSpec(sh.BATCH_AXES))
      state, metrics = train_step(state, batch, rng)
      if step == start_step + 1:  # the step is compiled now
        ts.trim_host_memory()
      # Metrics are fetched one step late so the host never waits for the device.
      if pending is not None:
        buffer.append(_check_finite(jax.device_get(pending[1]), pending[0], last_saved))
      pending = (step, metrics)
      progress.update(step, images_per_step=config.batch_size,  # shows the latest fetched loss / lr
                      loss=buffer[-1]["loss"] if buffer else None, lr=buffer[-1]["lr"] if buffer else None)
      last = step == total_steps
      if step % config.log_every_steps == 0 or last:
        buffer.append(_check_finite(jax.device_get(pending[1]), step, last_saved))
        pending = None
        train = {f"train/{k}": v for k, v in _mean_metrics(buffer).items()}
        train["train/skipped_images"] = float(getattr(it, "skipped", 0))
        writer.write(step, train)
        buffer = []
      if (config.eval_every_steps and step % config.eval_every_steps == 0) and not last:
        writer.write(step, evaluator(state))
      save_error = _poll_saves(ckpt)
      preempted, save_failed = preemption.check(save_error is not None)
      if save_failed:  # stop at once, on every process, with the earlier checkpoints intact
        raise save_error or checkpoint.CheckpointSaveError("a checkpoint save failed on another process")
      if step % config.ckpt_every_steps == 0 or last or preempted:
        if pending is not None:  # the NaN guard sees every step before it is saved
          buffer.append(_check_finite(jax.device_get(pending[1]), pending[0], last_saved))
          pending = None
        ckpt.save(step, ts.checkpointable(state), {**meta, "step": step})
        last_saved = step
      if preempted:
        ckpt.wait()
        logging.warning("SIGTERM: saved step %d in %s; rerun the same command to resume (exit status %d)", step,
                        workdir, EXIT_PREEMPTED)
        return {"preempted": True, "step": step}
  finally:
    progress.close()
    ckpt.wait()

  # ---------------------------------------------------------------------------------------------------
  # Final evals and export.
  # ---------------------------------------------------------------------------------------------------
  final = evaluator(state)
  writer.write(total_steps, final)
  writer.close()
  ckpt.close()
  model = ts.merge_model(modeldef, jax.device_get(state["params"]), jax.device_get(state["consts"]))
  return _finish_run(config, workdir, model, {**final, "step": total_steps})


def _poll_saves(ckpt) -> checkpoint.CheckpointSaveError | None:
  try:
    ckpt.poll()
  except checkpoint.CheckpointSaveError as e:
    return e
  return None


def _check_finite(metrics: dict, step: int, last_saved: int | None) -> dict:
  """Raises NonFiniteLossError if the step's loss or gradient was NaN/Inf. Every step is checked before a
  checkpoint after it is saved, so the checkpoints on disk hold finite weights from before the blow-up."""
  if metrics.pop("nonfinite", 0):
    resume = (f"a rerun resumes from checkpoint step {last_saved}, saved before it (finite weights)"
              if last_saved is not None else "no checkpoint was saved before it, so a rerun starts from step 0")
    raise NonFiniteLossError(
        f"the loss or gradient became NaN/Inf at step {step} (loss={metrics.get('loss')}, "
        f"grad_norm={metrics.get('grad_norm')}). Stopped without saving or deleting anything: {resume}. Lower "
        "optim.base_lr or check the data, then rerun.")
  return metrics


# -----------------------------------------------------------------------------------------------------
# Evals.
# -----------------------------------------------------------------------------------------------------
class _Evaluator:
  """k-NN top-1 on features (pretraining / distillation monitor) and top-1 of the head (fine-tuning)."""

  def __init__(self, config, modeldef, mesh, state_sharding, info):
    self.config, self.mesh, self.info = config, mesh, info
    sub = {"params": state_sharding["params"], "consts": state_sharding["consts"]}
    predict = ts.make_predict_fn(modeldef)

    def fn(state, batch):  # labels and masks ride along so every process sees the global batch
      return {**predict(state, batch["image"]), "label": batch["label"], "mask": batch["mask"]}

    self.predict = jax.jit(fn, in_shardings=(sub, sh.batch_sharding(mesh)), out_shardings=sh.replicated(mesh))

  def _outputs(self, state, split: str, limit: int | None = None):
    sub = {"params": state["params"], "consts": state["consts"]}
    outs = []
    seen = 0
    for batch in data.make_eval_iterator(self.config.data, split=split, global_batch_size=self.config.batch_size):
      batch = data.to_global(batch, self.mesh, jax.sharding.PartitionSpec(sh.BATCH_AXES))
      out = jax.device_get(self.predict(sub, batch))
      mask = np.asarray(out.pop("mask"), bool)
      outs.append({k: v[mask] for k, v in out.items()})
      seen += int(mask.sum())
      if limit and seen >= limit:
        break
    cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return cat["feature"], cat.get("logits"), cat["label"]

  def __call__(self, state) -> dict[str, float]:
    t0 = time.time()
    res: dict[str, float] = {}
    f_test, logits, y_test = self._outputs(state, "test")
    if logits is not None:
      res["eval/top1"] = float((logits.argmax(-1) == y_test).mean())
    if self.config.knn.enabled:
      f_train, _, y_train = self._outputs(state, "train", self.config.knn.max_train)
      k = min(self.config.knn.k, len(y_train))
      res["eval/knn_top1"] = knn.knn_top1(f_train, y_train, f_test, y_test, k=k,
                                          temperature=self.config.knn.temperature,
                                          num_classes=self.info.num_classes)
    res["time/eval_seconds"] = time.time() - t0
    return res


def _final_evals(config, workdir, model, mesh, meta, step):
  modeldef, params, consts = ts.split_model(model)
  state = {"params": params, "consts": consts}
  shardings = sh.tree_sharding(state, mesh)
  state = jax.device_put(state, shardings)
  info = data.dataset_info(config.data)
  res = _Evaluator(config, modeldef, mesh, shardings, info)(state)
  with writers.MetricWriter(workdir, enabled=jax.process_index() == 0) as w:
    w.write(step, res)
  return _finish_run(config, workdir, None, {**res, "step": step})


def _finish_run(config, workdir, model, final: dict) -> dict:
  if jax.process_index() == 0:
    if model is not None and config.export:
      from tinymim_jax import convert
      path = os.path.join(workdir, "model.safetensors")
      convert.save_pytorch_weights(model, path)
      final["export"] = path
    tmp = os.path.join(workdir, DONE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(final, f, indent=2)
    os.replace(tmp, os.path.join(workdir, DONE))
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
    except (config_base.ConfigError, workdir_lib.WorkdirError, checkpoint.CheckpointError,
            NonFiniteLossError) as e:  # complete messages: no traceback
      logging.error("%s", e)
      return EXIT_FAILED
    if jax.process_index() == 0:
      print(json.dumps(res, indent=2))
    return EXIT_PREEMPTED if res.get("preempted") else 0

  app.run(run, argv=argv)  # exits with run's status
  return 0


if __name__ == "__main__":
  sys.exit(main())
