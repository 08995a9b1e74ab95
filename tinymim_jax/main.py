r"""The main job: one flat trainer for TinyMIM distillation, MAE pretraining, fine-tuning and evaluation.

  python -m tinymim_jax.main --config configs/tinymim_distill.py:student=small --workdir workdirs/tinymim_s \
      [--config.batch_size=1024 --config.data.data_dir=/data/tfds ...]

The config's `objective` picks the step ('distill' | 'mae_pretrain' | 'finetune' | 'linprobe' | 'eval'). A rerun
with the same workdir resumes from its newest intact checkpoint; a finished run (workdir/done.json) is not run
again. One run at a time holds the workdir (tinymim_jax/workdir.py), and a resumed run's config is checked against
the workdir's. Sections: processes & mesh, data, model & teacher, optimizer, checkpoint, loop, evals, export.

'linprobe' trains a linear probe on a frozen encoder (linprobe.py); 'eval' reports every eval of a trained
model (`init`: a workdir or a .pth / .safetensors file) without training: k-NN, few-shot and a linear probe on
cached features, plus the head's top-1 if it has one.

Exit statuses: 0 finished (or finished earlier); 75 (EX_TEMPFAIL) stopped by SIGTERM after saving a checkpoint:
rerun the same command to resume (launch/slurm.sbatch requeues on it); 1 failed (a one-line reason for a bad
config, a busy workdir, a forbidden config change, damaged checkpoints, a failed save, a NaN/Inf loss or a
weights source that cannot be read).
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

from tinymim_jax import builders, checkpoint, config_base, convert, data, features, fewshot, knn, linprobe, optim
from tinymim_jax import config_identity, paths
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


def _linprobe_recipe(config):
  """The run's batch size, epochs and lr from config.linprobe (the recipe the eval objective's probe uses too)."""
  config = config.copy_and_resolve_references()
  lp = config.linprobe
  config.batch_size, config.total_epochs, config.warmup_epochs = lp.batch_size, lp.epochs, lp.warmup_epochs
  config.optim.base_lr, config.optim.weight_decay = lp.base_lr, lp.weight_decay
  return config


def _at_resolution(config, img_size: int):
  """A frozen encoder sees its own resolution: data.image_size follows the model's."""
  if config.data.image_size != img_size:
    logging.info("data.image_size %d -> %d (the frozen model's resolution)", config.data.image_size, img_size)
    config = config.copy_and_resolve_references()
    config.data.image_size = img_size
  return config


def _all_processes(ok: bool) -> bool:
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray(ok))).all())


def _config_changes(config, workdir: str) -> dict:
  """How `config` differs from the one the workdir's checkpoints were trained with ({} for a fresh run); raises
  workdir.ConfigChangeError for a change to the model or the checkpoint's meaning (config_identity.FIXED, FIXED_FOR)."""
  saved = workdir_lib.saved_config(workdir)
  if saved is None or config.objective == "eval" or not checkpoint.has_checkpoint(workdir):
    return {}
  return config_identity.check_config_change(saved, config, allow=config.allow_config_change)


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
  if objective == "linprobe":
    config = _linprobe_recipe(config)

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
  for note in builders.resolve_source_heads(config):  # a state dict does not store head counts
    logging.info("%s", note)
  meta: dict[str, Any] = {"objective": objective, "num_classes": info.num_classes, "seed": config.seed}
  extras: dict = {}  # a distillation target's layers trained beside the model
  if objective in ("eval", "linprobe"):
    # A frozen model: a workdir's as it was trained (its features as that workdir recorded them, unless
    # config.eval.feature says otherwise), or config.model with a file's weights.
    model, trained = builders.frozen_model(config)
    vit = features.vit_of(model)
    feature_spec = features.resolve(config.eval.feature, depth=vit.config.depth, recorded=trained.get("feature"),
                                    run_config=trained.get("config"))
    config = _at_resolution(config, vit.config.img_size)
    meta["init"] = paths.abspath(config.init)
  else:
    model, extras = builders.make_trainable(config, num_classes=info.num_classes)
    if config.init:
      report = builders.load_init(model, config)
      logging.info("init from %s:\n%s", config.init, report)
      meta["init"] = paths.abspath(config.init)
    vit = features.vit_of(model)
    feature_spec = features.resolve(config.eval.feature, depth=vit.config.depth, run_config=config)
  meta["feature"] = feature_spec.to_dict()  # what evals and exports of this run's model read
  teachers = {}
  if objective == "distill":
    meta["teachers"] = {}
    for name in config.teachers:
      teachers[name] = builders.make_teacher(config, name)
      report = builders.load_teacher(teachers[name], config, name)
      logging.info("teacher %r from %s:\n%s", name, config[name].source, report)
      meta["teachers"][name] = {"source": paths.abspath(config[name].source), "name": config[name].name,
                                "sha256": builders.weights_hash(teachers[name]),
                                "block": builders.teacher_block(config, name), "weight": config[name].weight}
  if objective == "eval":
    return _final_evals(config, workdir, vit, mesh, meta, feature_spec, info)

  # ---------------------------------------------------------------------------------------------------
  # Optimizer.
  # ---------------------------------------------------------------------------------------------------
  distill_spec = builders.distill_spec(config) if objective == "distill" else None
  if objective == "linprobe":
    # Only the probe trains (LARS); the encoder rides in the state like a teacher, frozen and never saved.
    o = config.optim
    schedule = optim.lr_schedule(base_lr=o.base_lr, global_batch_size=config.batch_size, total_steps=total_steps,
                                 warmup_steps=warmup_steps, min_lr=o.min_lr, lr_scaling_batch=o.lr_scaling_batch)
    lp = config.linprobe
    tx = linprobe.lars(schedule, momentum=lp.momentum, trust_coefficient=lp.trust_coefficient,
                       weight_decay=lp.weight_decay)
    modeldef, state = linprobe.init_state(vit, tx, dim=vit.config.embed_dim, num_classes=info.num_classes,
                                          seed=config.seed)
    teacher_graphdefs = {}
  else:
    tx, schedule, rules_table = builders.make_optimizer(config, ts.split_model(model, extras)[1], spec=distill_spec,
                                                        total_steps=total_steps, warmup_steps=warmup_steps)
    if is_main:
      logging.info("optimizer:\n%s", rules_table)
    modeldef, teacher_graphdefs, state = ts.init_state(model, tx, teachers=teachers, extras=extras)
  del model, teachers, vit, extras

  # ---------------------------------------------------------------------------------------------------
  # Checkpoint: resume from the latest one, onto this mesh.
  # ---------------------------------------------------------------------------------------------------
  state_sharding = sh.tree_sharding(state, mesh)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_ckpts, keep_every=config.keep_every_steps)
  if ckpt.all_steps():  # the newest intact one; damaged ones are moved aside with a warning
    restored, saved_meta = ckpt.restore(checkpoint.abstract(ts.checkpointable(state),
                                                            ts.checkpointable(state_sharding)))
    for name, saved in saved_meta.get("teachers", {}).items():
      if saved.get("sha256") != meta.get("teachers", {}).get(name, {}).get("sha256"):
        logging.warning("teacher %r: its weights differ from the ones this run started with (%s)", name,
                        saved["source"])
    state.update(restored)
    logging.info("resumed from %s at step %d", ckpt.directory, int(state["step"]))
    if is_main:
      config_identity.record_config_change(workdir, config, config_changes, step=int(state["step"]))
  state = jax.device_put(state, state_sharding)
  start_step = int(state["step"])
  meta["config"] = json.loads(config.to_json_best_effort())
  meta["versions"] = _versions()

  # ---------------------------------------------------------------------------------------------------
  # Steps.
  # ---------------------------------------------------------------------------------------------------
  if objective == "distill":
    step_fn = ts.make_distill_step(modeldef, teacher_graphdefs, tx, schedule, distill_spec,
                                   builders.teacher_specs(config))
  elif objective == "mae_pretrain":
    step_fn = ts.make_mae_step(modeldef, tx, schedule, mask_ratio=config.mae.mask_ratio,
                               norm_pix=config.mae.norm_pix)
  elif objective == "linprobe":
    step_fn = linprobe.make_step(modeldef, tx, schedule, feature_spec)
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
    paths.write_atomic(os.path.join(workdir, workdir_lib.RUN),
                       json.dumps({k: v for k, v in meta.items() if k != "config"}, indent=2))
  if objective == "linprobe":
    evaluator = _Evaluator(config, linprobe.make_predict_fn(modeldef, feature_spec), state_sharding,
                           ("params", "consts", "encoder"), mesh, info, head="linprobe")
  else:
    evaluator = _Evaluator(config, ts.make_predict_fn(modeldef, feature_spec), state_sharding, ("params", "consts"),
                           mesh, info)
  if objective == "linprobe" and not config.linprobe.augment:
    # Without augmentation the features never change: one pass over each split, then the probe trains (and is
    # evaluated) on them alone.
    f_train, y_train = evaluator.cache_features(state)
    it = linprobe.CacheIterator({"feature": f_train, "label": y_train}, global_batch_size=config.batch_size,
                                seed=config.seed, start_step=start_step, steps_per_epoch=steps_per_epoch)
  else:
    it = data.make_train_iterator(config.data, mode=objective, global_batch_size=config.batch_size,
                                  seed=config.seed, start_step=start_step)
  progress = writers.Progress(total_steps, initial_step=start_step, enabled=is_main, desc=objective)
  pending, buffer, last_saved = None, [], ckpt.latest_step()
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
        writer.flush()  # an object store's metrics.jsonl holds every record up to the checkpoint
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
  model = None  # a probe exports nothing
  if objective != "linprobe":
    model = ts.merge_model(modeldef, jax.device_get(state["params"]), jax.device_get(state["consts"]))
  return _finish_run(config, workdir, model, {**final, "step": total_steps, "feature": meta["feature"]})


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
  """The evals of a run, every eval_every_steps and at the end: the top-1 of the model's head (`head='top1'`:
  eval/top1) or of a linear probe (`head='linprobe'`: eval/linprobe_top1, eval/linprobe_top5) on the held-out
  split, and k-NN and few-shot on frozen features (config.eval; up to eval.max_train train images).

  predict(sub_state, images) -> {'feature', 'logits' (optional)} reads the state entries named in `keys`.
  After cache_features() (a probe on fixed features) both splits come from the cache and only the probe runs.
  """

  def __init__(self, config, predict, state_sharding, keys, mesh, info, *, head: str = "top1"):
    self.config, self.mesh, self.info, self.keys, self.head = config, mesh, info, tuple(keys), head
    sub = {k: state_sharding[k] for k in self.keys}

    def fn(state, batch):  # labels and masks ride along so every process sees the global batch
      return {**predict(state, batch["image"]), "label": batch["label"], "mask": batch["mask"]}

    self.predict = jax.jit(fn, in_shardings=(sub, sh.batch_sharding(mesh)), out_shardings=sh.replicated(mesh))
    self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def features(self, state, split: str, limit: int | None = None):
    """-> (features (n, D), logits (n, C) or None, labels (n,)) of the first `limit` examples of `split`."""
    sub = {k: state[k] for k in self.keys}
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
    cat = {k: np.concatenate([o[k] for o in outs])[:limit] for k in outs[0]}
    return cat["feature"], cat.get("logits"), cat["label"]

  def cache_features(self, state) -> tuple[np.ndarray, np.ndarray]:
    """Features of both splits, computed once and kept; -> the train split's (features, labels)."""
    for split in ("train", "test"):
      f, _, y = self.features(state, split)
      self.cache[split] = (f, y.astype(np.int32))
    return self.cache["train"]

  def __call__(self, state, *, cached_probe: bool = False) -> dict[str, float]:
    """The metrics; `cached_probe` (the eval objective) adds a linear probe on cached features of the whole
    train split (config.linprobe's recipe, no augmentation)."""
    t0 = time.time()
    e = self.config.eval
    res: dict[str, float] = {}
    if "test" in self.cache:
      f_test, y_test = self.cache["test"]
      logits = linprobe.predict_on_cache(*_host((state["params"], state["consts"])), f_test)
    else:
      f_test, logits, y_test = self.features(state, "test")
    if logits is not None:
      res.update(_head_metrics(logits, y_test, self.head))
    if e.knn.enabled or e.fewshot.enabled or cached_probe:
      if "train" in self.cache:
        f_train, y_train = self.cache["train"]
      else:
        f_train, _, y_train = self.features(state, "train", None if cached_probe else e.max_train)
      res.update(_frozen_feature_metrics(e, f_train[:e.max_train], y_train[:e.max_train], f_test, y_test,
                                         self.info.num_classes))
      if cached_probe:
        lp = self.config.linprobe
        params, consts = linprobe.fit_on_cache(
            f_train, y_train, num_classes=self.info.num_classes, batch_size=lp.batch_size, epochs=lp.epochs,
            warmup_epochs=lp.warmup_epochs, base_lr=lp.base_lr, weight_decay=lp.weight_decay,
            momentum=lp.momentum, trust_coefficient=lp.trust_coefficient, seed=self.config.seed,
            lr_scaling_batch=self.config.optim.lr_scaling_batch, min_lr=self.config.optim.min_lr)
        res.update(_head_metrics(linprobe.predict_on_cache(params, consts, f_test), y_test, "linprobe"))
    res["time/eval_seconds"] = time.time() - t0
    return res


def _host(tree):
  """A replicated (possibly multi-process) pytree as numpy."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def _head_metrics(logits, labels, head: str) -> dict[str, float]:
  if head == "top1":
    return {"eval/top1": linprobe.topk_accuracy(logits, labels, 1)}
  return {f"eval/{head}_top1": linprobe.topk_accuracy(logits, labels, 1),
          f"eval/{head}_top5": linprobe.topk_accuracy(logits, labels, 5)}


def _frozen_feature_metrics(e, f_train, y_train, f_test, y_test, num_classes) -> dict[str, float]:
  """k-NN and few-shot top-1 (config.eval.knn / .fewshot) of train -> test features."""
  res = {}
  if e.knn.enabled:
    res["eval/knn_top1"] = knn.knn_top1(f_train, y_train, f_test, y_test, k=min(e.knn.k, len(y_train)),
                                        temperature=e.knn.temperature, num_classes=num_classes)
  if e.fewshot.enabled:
    f = e.fewshot
    accs = fewshot.fewshot_top1(f_train, y_train, f_test, y_test, num_classes=num_classes, shots=tuple(f.shots),
                                draws=f.draws, val_per_class=f.val_per_class, l2_regs=tuple(f.l2_regs))
    res.update({f"eval/fewshot_{k}shot_top1": v for k, v in accs.items()})
  return res


def _final_evals(config, workdir, vit, mesh, meta, feature_spec, info):
  """The eval objective: every eval of a frozen model, written as step 0."""
  modeldef, params, consts = ts.split_model(vit)
  state = {"params": params, "consts": consts}
  shardings = sh.tree_sharding(state, mesh)
  state = jax.device_put(state, shardings)
  evaluator = _Evaluator(config, ts.make_predict_fn(modeldef, feature_spec), shardings, ("params", "consts"), mesh,
                         info)
  res = evaluator(state, cached_probe=config.eval.cached_probe)
  if jax.process_index() == 0:
    paths.write_atomic(os.path.join(workdir, workdir_lib.RUN), json.dumps(meta, indent=2))
  with writers.MetricWriter(workdir, enabled=jax.process_index() == 0) as w:
    w.write_config(config)
    w.write(0, res)
  return _finish_run(config, workdir, None, {**res, "step": 0, "feature": meta["feature"]})


def _finish_run(config, workdir, model, final: dict) -> dict:
  if jax.process_index() == 0:
    if model is not None and config.export:
      path = os.path.join(workdir, workdir_lib.EXPORT)
      # The feature spec rides in the header, so that evals of the exported file read the same features; the
      # architecture (heads, pooling, ...) goes beside it, in model.config.json.
      convert.save_pytorch_weights(model, path, metadata={features.METADATA_KEY: json.dumps(final["feature"])})
      final["export"] = path
    paths.write_atomic(os.path.join(workdir, workdir_lib.DONE), json.dumps(final, indent=2))  # last: the run is complete
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
    except convert.ConvertError as e:  # a weights source that cannot be read or does not fit: the message says why
      print(f"error: {e}", file=sys.stderr)
      return EXIT_FAILED
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
