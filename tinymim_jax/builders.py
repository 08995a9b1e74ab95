"""From a config to what a run needs: models, the teacher, weights, the optimizer, a finished run's model.

The one place each of these is built, shared by the trainer, the converter CLI, the benchmarks and the tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from tinymim_jax import checkpoint, convert, optim
from tinymim_jax import train_steps as ts
from tinymim_jax.models import MAE_PREFIX, ViTConfig, create_model, vit_config


def vit_kwargs(mc) -> dict:
  """The ViTConfig fields a `config_base.model_config()` section sets (None = keep the variant's value)."""
  return {f.name: mc[f.name] for f in dataclasses.fields(ViTConfig) if f.name in mc and mc[f.name] is not None}


def teacher_vit_config(config) -> ViTConfig:
  return vit_config(config.teacher.name, **vit_kwargs(config.teacher))


def distill_spec(config) -> ts.DistillSpec:
  """config.distill as the train step reads it (the fields of ts.DistillSpec)."""
  return ts.DistillSpec(**{f.name: config.distill[f.name] for f in dataclasses.fields(ts.DistillSpec)})


# --------------------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------------------
def make_model(config, *, num_classes: int | None = None, seed: int | None = None) -> nnx.Module:
  """The model a run trains: an MAE, a TinyMIM student, or a classifier."""
  seed = config.seed if seed is None else seed
  kw = vit_kwargs(config.model)
  if config.objective == "mae_pretrain":
    m = config.mae
    return create_model(MAE_PREFIX + config.model.name, seed=seed, decoder=dict(
        embed_dim=m.decoder_embed_dim, depth=m.decoder_depth, num_heads=m.decoder_num_heads), **kw)
  if config.objective == "distill":
    d, t = config.distill, teacher_vit_config(config)
    if not 1 <= d.teacher_block <= t.depth:
      raise ValueError(f"config.distill.teacher_block={d.teacher_block}, but {config.teacher.name} has blocks "
                       f"1..{t.depth}")
    heads = d.relation_heads or t.block_heads(d.teacher_block)
    # The relation block uses the teacher's head count and no drop path (docs/method.md sections 2, 3).
    kw["head_overrides"] = {d.student_block: heads}
    kw["drop_path_overrides"] = {d.student_block: 0.0}
    return create_model(config.model.name, seed=seed, **kw)
  if num_classes and not kw.get("num_classes"):
    kw["num_classes"] = num_classes
  return create_model(config.model.name, seed=seed, **kw)


def make_trainable(config, *, num_classes: int | None = None) -> tuple[nnx.Module, dict[str, nnx.Module]]:
  """-> (the model a run trains, {name: extra layers trained beside it}): a distillation target's extra layers
  (ts.TARGETS), e.g. the feature target's width projection; none for the other objectives."""
  model = make_model(config, num_classes=num_classes)
  if config.objective != "distill":
    return model, {}
  extras = ts.TARGETS[config.distill.target].extra_layers(
      model.config.embed_dim, teacher_vit_config(config).embed_dim, nnx.Rngs(config.seed))
  return model, extras


def make_teacher(config) -> nnx.Module:
  kw = vit_kwargs(config.teacher)
  kw.update(drop_path=0.0, num_classes=0, pooling="cls")  # the teacher runs in eval mode, pretrain layout
  return create_model(config.teacher.name, seed=0, **kw)


# --------------------------------------------------------------------------------------------------------
# Optimizer.
# --------------------------------------------------------------------------------------------------------
def make_optimizer(config, params, *, total_steps: int, warmup_steps: int, spec: ts.DistillSpec | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule, str]:
  """AdamW with MAE's lr schedule and config.optim's rules over `params` (arrays or ShapeDtypeStructs, as
  ts.split_model gives them); with a distillation `spec`, the params its target leaves untrained are frozen.

  Returns (tx, schedule, a table of the rules for the log).
  """
  o = config.optim
  schedule = optim.lr_schedule(base_lr=o.base_lr, global_batch_size=config.batch_size, total_steps=total_steps,
                               warmup_steps=warmup_steps, min_lr=o.min_lr, lr_scaling_batch=o.lr_scaling_batch)
  frozen = tuple(o.frozen) + (ts.distill_frozen_patterns(spec, params) if spec is not None else ())
  rules = dict(no_decay=tuple(o.no_decay), frozen=frozen, layer_decay=o.layer_decay,
               depth=len(params["blocks"]) if "blocks" in params else None)
  tx = optim.make_optimizer(params, schedule=schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                            grad_clip_norm=o.grad_clip_norm, grad_accum_steps=o.grad_accum_steps, **rules)
  return tx, schedule, optim.describe(params, **rules)


# --------------------------------------------------------------------------------------------------------
# Weights.
# --------------------------------------------------------------------------------------------------------
def restore_model(workdir: str) -> nnx.Module:
  """The trained model of a tinymim-jax run (its newest intact checkpoint, without a target's extra layers),
  rebuilt from the config it saved, on this process's first device whatever mesh saved it.

  Raises FileNotFoundError when `workdir` holds no checkpoint, checkpoint.NoIntactCheckpointError when every
  checkpoint is damaged (a damaged one is skipped with a warning, and left where it is).
  """
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint under {ckpt.directory}: is {workdir!r} a tinymim-jax workdir?")
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    built = {}

    def abstract_model(meta):
      config = ml_collections.ConfigDict(meta["config"])
      model, extras = nnx.eval_shape(lambda: make_trainable(config, num_classes=meta.get("num_classes")))
      built["modeldef"], params, consts = ts.split_model(model, extras)
      target = {"params": params, "consts": consts}
      return {"model": checkpoint.abstract(target, jax.tree.map(lambda _: local, target))}

    _, restored, _ = ckpt.restore_intact(abstract_model)
  finally:
    ckpt.close()
  return ts.merge_model(built["modeldef"], restored["model"]["params"], restored["model"]["consts"])


def load_weights(model: nnx.Module, source: str, *, skip=(), allow_missing=()):
  """Loads a .pth / .safetensors file or a tinymim-jax workdir into `model` (strict, via timm names)."""
  if os.path.isdir(source):
    src = convert.export_pytorch_weights(restore_model(source))
  elif os.path.exists(source):
    src = source
  else:
    raise FileNotFoundError(f"weights source {source!r} is neither a file nor a tinymim-jax workdir")
  return convert.load_pytorch_weights(model, src, skip=tuple(skip), allow_missing=tuple(allow_missing))


def weights_hash(model: nnx.Module) -> str:
  """sha256 over the model's arrays in name order: identifies a teacher in the run's metadata."""
  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
  for path, x in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(x, np.float32)).tobytes())
  return h.hexdigest()
