"""Objectives: what a run trains and how, one module each, one registry entry each (REGISTRY).

The trainer (main.py) runs any objective the same way and never asks which one it runs: it resolves the run's
description once (resolve_run: the sources' head counts, the objective's recipe, a frozen model's resolution),
checks the data with it, asks it for a `Setup` (the train state, the step, what the evals read, what is
exported) and then restores, trains, evaluates and exports by that Setup alone (timm's TrainingTask, big_vision's
flat trainer).

An objective (a subclass of `Objective`, registered under its `name`, the config's `objective`) owns:
  data_mode       the train pipeline's mode (data.MODES): which views and labels a batch holds
  dataset_info / steps_per_epoch  what the trainer reads of its data (default: config.data's pipeline)
  trains          whether it trains (and so checkpoints): an objective that only evaluates has no identity
  build           the model it trains and the extra layers trained beside it (builders.make_trainable asks it)
  feature_block   the default feature block of a model it trained (the frozen-feature evals read it)
  fixed           config fields (fnmatch patterns) that make a workdir's identity beside config_identity.FIXED:
                  a resumed run may not change them (`fixed_fields` adds sections named by the config, e.g. the
                  teacher sections of config.teachers)
  teacher_sections  the config sections of the frozen teachers it reads
  resolve         what it derives into the run's description (a linear probe's batch size, epochs and lr; a
                  frozen encoder's resolution), before anything is built
  check_data      data that can only give garbage for it (a class count that differs, one class)
  setup           its trainable state (params, consts, opt, and extra trees such as an EMA), its frozen models
                  (teachers, an encoder: state entries listed in Setup.frozen, never checkpointed), its
                  optimizer rules, its step, the predict function and head its evals read, its metadata, what
                  it exports, and (optionally) its own train iterator
A new objective is one module here and one REGISTRY entry (README, "Extending").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from tinymim_jax import features


@dataclasses.dataclass
class Setup:
  """What the trainer runs for an objective (built from the run's description, resolve_run, which it never
  changes).

  state: the train state (train_steps: 'step', 'params', 'consts', 'opt', plus frozen trees under `frozen`).
  frozen: the state entries that are frozen models: sharded and donated with the state, never checkpointed.
  step: the pure step(state, batch, rng) -> (state, metrics) (train_steps), or None when nothing trains.
  predict / predict_keys / head: what the evals read (evals.Evaluator): predict(state entries `predict_keys`,
    images) -> {'feature', 'logits' (optional)}; head 'top1' (the model's head) or 'linprobe' (a probe).
  feature_spec: the features the frozen-feature evals and the export's header read.
  record: what every checkpoint records of the model it holds (builders.model_record: its architecture and
    extra layers), so that restoring it needs no objective code; None: the checkpoint holds no model to restore
    alone (a linear probe's).
  meta: entries of the run's metadata (run.json and every checkpoint), e.g. the teachers and their hashes.
  export: the model to export from the final state (host arrays), or None (a probe exports nothing).
  train_iterator: (evaluator, state, start_step, steps_per_epoch) -> an iterator of batches with `.skipped`; None:
    the data pipeline in the objective's data_mode.
  make_evaluator: (state_sharding, mesh, workdir) -> evaluate(state) -> metrics, in place of evals.Evaluator
    (a dense objective's own evals); None: evals.Evaluator on `predict`.
  write_exports: (state, workdir) -> {name: path} of files exported beside the timm-named one (process 0 writes;
    every process calls it), or None.
  frozen_encoder: (state) -> the frozen ViT the dense evals read (evals.DENSE_EVALS), or None (none run).
  extra_evals: {name: (predict, predict_keys)}: other weights of the state whose head's top-1 is evaluated beside
    the model's, as eval/<name>_top1 (a fine-tuning EMA: {'ema': ...}); no frozen-feature evals.
  """
  state: dict
  feature_spec: features.FeatureSpec
  predict: Callable
  predict_keys: tuple[str, ...] = ("params", "consts")
  head: str = "top1"
  frozen: tuple[str, ...] = ()
  step: Callable | None = None
  meta: dict = dataclasses.field(default_factory=dict)
  export: Callable[[dict], Any] | None = None
  train_iterator: Callable | None = None
  record: dict | None = None
  make_evaluator: Callable | None = None
  write_exports: Callable | None = None
  frozen_encoder: Callable | None = None
  extra_evals: dict[str, tuple[Callable, tuple[str, ...]]] = dataclasses.field(default_factory=dict)


class Objective:
  """The interface (see the module docstring); the defaults are those of an objective that trains a model."""
  name: str = ""
  data_mode: str | None = None
  trains: bool = True  # False: it only evaluates (no step, no checkpoints, no config identity to keep)
  fixed: tuple[str, ...] = ()

  def fixed_fields(self, teachers=()) -> tuple[str, ...]:
    """The fnmatch patterns of config fields this objective fixes (`teachers`: the config's teacher sections)."""
    del teachers
    return self.fixed

  def build(self, config, *, num_classes: int | None = None, seed: int | None = None):
    """-> (the model a run of this objective trains, {name: extra layers trained beside it}) from `config`
    (default: builders.make_classifier, no extra layers)."""
    from tinymim_jax import builders  # pylint: disable=g-import-not-at-top  (builders reads this registry)
    return builders.make_classifier(config, num_classes=num_classes, seed=seed), {}

  def feature_block(self, run_config, depth: int) -> int:
    """The block whose output is the features of a model this objective trained (`run_config`: that run's config
    or its JSON); default: the last, `depth`."""
    del run_config
    return depth

  def teacher_sections(self, config) -> tuple[str, ...]:
    """The config sections of the frozen teachers it reads (their sources' recorded head counts are taken)."""
    del config
    return ()

  def resolve(self, config) -> None:
    """Completes the run's description in place (its own recipe; a frozen model's resolution). Called once, by
    resolve_run, on the run's own copy, before anything is built."""

  def dataset_info(self, config):
    """The data's name, num_classes, num_train, num_eval, image_size (default: data.dataset_info of config.data)."""
    from tinymim_jax import data  # pylint: disable=g-import-not-at-top
    return data.dataset_info(config.data)

  def steps_per_epoch(self, config, info) -> int:
    """Training steps per epoch of the train split (default: data.steps_per_epoch of config.data)."""
    del info
    from tinymim_jax import data  # pylint: disable=g-import-not-at-top
    return data.steps_per_epoch(config.data, global_batch_size=config.batch_size)

  def check_data(self, config, info, where: str) -> None:
    """Raises config_base.ConfigError for data that can only give garbage (`where` names the data)."""

  def setup(self, config, info, *, total_steps: int, warmup_steps: int, is_main: bool) -> Setup:
    raise NotImplementedError


REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
  REGISTRY[objective.name] = objective
  return objective


def get(name: str) -> Objective:
  """The registered objective `name`; KeyError names the known ones."""
  _load_all()
  if name not in REGISTRY:
    raise KeyError(f"config.objective={name!r}: one of {sorted(REGISTRY)}")
  return REGISTRY[name]


def resolve_run(config):
  """The run's description: `config` (finalised: config_base.finalize) with everything a run derives from it
  filled in, once, before anything is built, so that the run, its config.json and its config identity all read
  the same values. -> a new locked ConfigDict (`config` is left as it is).

  Filled in: the head counts the teachers' and init's sources record where the config leaves them to the variant
  (builders.resolve_source_heads; a state dict does not store them), then the objective's own (Objective.resolve:
  a linear probe's recipe, a frozen encoder's resolution). Raises convert.ConvertError for a source that
  contradicts the config, KeyError for an unknown objective (config_base.finalize names it first).
  """
  import logging  # pylint: disable=g-import-not-at-top
  from tinymim_jax import builders  # pylint: disable=g-import-not-at-top  (builders reads this registry)
  objective = get(config.objective)
  config = config.copy_and_resolve_references()
  config.unlock()
  for note in builders.resolve_source_heads(config, objective.teacher_sections(config)):
    logging.info("%s", note)
  objective.resolve(config)
  config.lock()
  return config


def default_feature_block(run_config, depth: int) -> int:
  """The default feature block (features.resolve) of a model trained by `run_config` (a config or its JSON; None:
  a model no run of ours trained: the last block, `depth`)."""
  if run_config is None:
    return depth
  return get(run_config["objective"]).feature_block(run_config, depth)


def names() -> tuple[str, ...]:
  _load_all()
  return tuple(REGISTRY)


def _load_all() -> None:
  # The objectives' modules register themselves; they import the builders and steps, which this package's
  # importers (config_base, config_identity) need not load until an objective is asked for.
  from tinymim_jax.objectives import distill, mae_pretrain, finetune, linprobe, eval, segment  # noqa: F401
