"""Evaluation of a trained model without training: k-NN, few-shot and a linear probe on cached features of its
frozen encoder, plus its head's top-1 if it has one (`init`: a workdir or a .pth / .safetensors file), and the
linear segmentation probe on its patch tokens when config.eval.segprobe.enabled (segprobe.py)."""

from __future__ import annotations

import logging

from tinymim_jax import builders, config_base, features, objectives, paths
from tinymim_jax.models import vit_config
from tinymim_jax import train_steps as ts
from tinymim_jax.objectives import Objective, Setup, register
from tinymim_jax.objectives.finetune import check_class_count


def frozen_encoder(config):
  """-> (the frozen model of config.init (builders.frozen_model), its feature spec, metadata: the init and the
  encoder's source and weights hash, {'encoder': {'source', 'sha256'}}). The spec:
  config.eval.feature's fields, else the one the init workdir / export recorded, else the default of the run that
  trained it. Raises config_base.ConfigError when data.image_size is not the model's resolution (resolve_resolution
  sets it when the run is resolved)."""
  model, trained = builders.frozen_model(config)
  vit = features.vit_of(model)
  spec = features.resolve(config.eval.feature, depth=vit.config.depth, recorded=trained.get("feature"),
                          default_block=objectives.default_feature_block(trained.get("config"), vit.config.depth))
  if config.data.image_size != vit.config.img_size:
    raise config_base.ConfigError(f"data.image_size={config.data.image_size}, but the frozen model {config.init} "
                                  f"reads {vit.config.img_size} px: set --config.data.image_size="
                                  f"{vit.config.img_size}")
  # The encoder's weights hash: a probe's checkpoints mean nothing on other features (config_identity).
  return model, spec, {"init": paths.abspath(config.init),
                       "encoder": {"source": paths.abspath(config.init), "sha256": builders.weights_hash(vit)}}


def resolve_resolution(config) -> None:
  """A frozen encoder sees its own resolution: data.image_size follows the model config.init holds (the
  architecture its workdir records; a weight file is read as config.model: builders.frozen_model), in place
  (objectives.resolve_run)."""
  if paths.isdir(config.init):
    size = int(builders.source_architecture(config.init)[0]["img_size"])
  else:
    size = vit_config(config.model.name, **builders.vit_kwargs(config.model)).img_size
  if config.data.image_size != size:
    logging.info("data.image_size %d -> %d (the frozen model's resolution)", config.data.image_size, size)
    config.data.image_size = size


class Eval(Objective):
  name = "eval"
  data_mode = None
  trains = False

  def check_data(self, config, info, where: str) -> None:
    check_class_count(config, info, where)

  def resolve(self, config) -> None:
    resolve_resolution(config)

  def setup(self, config, info, *, total_steps: int, warmup_steps: int, is_main: bool) -> Setup:
    model, spec, meta = frozen_encoder(config)
    modeldef, params, consts = ts.split_model(features.vit_of(model))
    def encoder(state):
      return features.vit_of(ts.merge_model(modeldef, state["params"], state["consts"]))

    return Setup(state={"params": params, "consts": consts}, feature_spec=spec,
                 predict=ts.make_predict_fn(modeldef, spec), meta=meta, frozen_encoder=encoder)


register(Eval())
