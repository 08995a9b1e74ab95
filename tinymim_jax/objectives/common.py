"""What the objectives that train a model (distill, mae_pretrain, finetune) share: the model a run trains, its
init, its feature spec, AdamW with the config's rules, and the train state."""

from __future__ import annotations

import logging

import jax

from tinymim_jax import builders, features, paths
from tinymim_jax import train_steps as ts
from tinymim_jax.objectives import Setup


def setup_trained_model(objective, config, info, *, total_steps: int, warmup_steps: int, is_main: bool, make_step,
                        frozen_patterns=None, make_teachers=None, meta: dict | None = None) -> Setup:
  """The Setup of a run that trains `objective.build`'s model (and its extra layers) with AdamW.

  make_step(modeldef, teacher_graphdefs, tx, schedule) -> the pure step; `frozen_patterns(params)` -> the
  param patterns the objective leaves untrained beside config.optim.frozen (a distillation target's);
  `make_teachers()` -> ({name: frozen model}, their metadata): the teachers, built after the student, that ride
  in the state under 'teachers'; `meta`: entries for the run's metadata. Raises convert.ConvertError for an
  init that cannot be read or does not fit.
  """
  meta = dict(meta or {})
  model, extras = objective.build(config, num_classes=info.num_classes)
  if config.init:
    report = builders.load_init(model, config)
    logging.info("init from %s:\n%s", config.init, report)
    meta["init"] = paths.abspath(config.init)
  vit = features.vit_of(model)
  feature_spec = features.resolve(config.eval.feature, depth=vit.config.depth,
                                  default_block=objective.feature_block(config, vit.config.depth))
  teachers = None
  if make_teachers is not None:
    teachers, meta["teachers"] = make_teachers()
  params = ts.split_model(model, extras)[1]
  tx, schedule, rules_table = builders.make_optimizer(
      config, params, total_steps=total_steps, warmup_steps=warmup_steps,
      frozen=frozen_patterns(params) if frozen_patterns is not None else ())
  if is_main:
    logging.info("optimizer:\n%s", rules_table)
  modeldef, teacher_graphdefs, state = ts.init_state(model, tx, teachers=teachers, extras=extras)

  def export(state):
    return ts.merge_model(modeldef, jax.device_get(state["params"]), jax.device_get(state["consts"]))

  return Setup(state=state, feature_spec=feature_spec,
               predict=ts.make_predict_fn(modeldef, feature_spec), frozen=("teachers",) if teachers else (),
               step=make_step(modeldef, teacher_graphdefs, tx, schedule), meta=meta, export=export,
               record=builders.model_record(model, extras))
