"""Evaluation of a trained model without training: k-NN, few-shot and a linear probe on cached features of its
frozen encoder, plus its head's top-1 if it has one (`init`: a workdir or a .pth / .safetensors file)."""

from __future__ import annotations

import logging

from tinymim_jax import builders, features, objectives, paths
from tinymim_jax import train_steps as ts
from tinymim_jax.objectives import Objective, Setup, register
from tinymim_jax.objectives.finetune import check_class_count


def frozen_encoder(config):
  """-> (the frozen model of config.init (builders.frozen_model), its feature spec, the config at its resolution,
  metadata). The spec: config.eval.feature's fields, else the one the init workdir / export recorded, else the
  default of the run that trained it. A frozen encoder sees its own resolution: data.image_size follows it."""
  model, trained = builders.frozen_model(config)
  vit = features.vit_of(model)
  spec = features.resolve(config.eval.feature, depth=vit.config.depth, recorded=trained.get("feature"),
                          default_block=objectives.default_feature_block(trained.get("config"), vit.config.depth))
  if config.data.image_size != vit.config.img_size:
    logging.info("data.image_size %d -> %d (the frozen model's resolution)", config.data.image_size,
                 vit.config.img_size)
    config = config.copy_and_resolve_references()
    config.data.image_size = vit.config.img_size
  return model, spec, config, {"init": paths.abspath(config.init)}


class Eval(Objective):
  name = "eval"
  data_mode = None
  trains = False

  def check_data(self, config, info, where: str) -> None:
    check_class_count(config, info, where)

  def setup(self, config, info, *, total_steps: int, warmup_steps: int, is_main: bool) -> Setup:
    model, spec, config, meta = frozen_encoder(config)
    modeldef, params, consts = ts.split_model(features.vit_of(model))
    return Setup(config=config, state={"params": params, "consts": consts}, feature_spec=spec,
                 predict=ts.make_predict_fn(modeldef, spec), meta=meta)


register(Eval())
