"""From a config to models and weights: shared by the trainer, checkpoint restore and the converter CLI."""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
from flax import nnx

from tinymim_jax import train_steps as ts
from tinymim_jax.models import MAE_PREFIX, create_model, vit_config

_MODEL_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "drop_path",
                 "drop_path_mode", "pooling", "num_classes", "pos_embed", "dtype",
                 "attention")


def vit_kwargs(mc) -> dict:
  """The ViTConfig overrides a `model_config()` section sets (None = keep the variant's value)."""
  return {k: mc[k] for k in _MODEL_FIELDS if k in mc and mc[k] is not None}


def teacher_vit_config(config):
  return vit_config(config.teacher.name, **vit_kwargs(config.teacher))


def distill_spec(config) -> ts.DistillSpec:
  d = config.distill
  return ts.DistillSpec(target=d.target, teacher_block=d.teacher_block, student_block=d.student_block,
                        w_qk=d.w_qk, w_vv=d.w_vv, feature_loss=d.feature_loss,
                        normalize_target=d.normalize_target, student_mask_ratio=d.student_mask_ratio)


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
    # The relation block uses the teacher's head count and no drop path (SPEC 2, 3).
    kw["head_overrides"] = {d.student_block: heads}
    kw["drop_path_overrides"] = {d.student_block: 0.0}
    return create_model(config.model.name, seed=seed, **kw)
  # 'eval' builds the layout it is told (num_classes 0: a pretrained encoder, frozen-feature evals only).
  if num_classes and not kw.get("num_classes") and config.objective != "eval":
    kw["num_classes"] = num_classes
  return create_model(config.model.name, seed=seed, **kw)


def make_teacher(config) -> nnx.Module:
  kw = vit_kwargs(config.teacher)
  kw.update(drop_path=0.0, num_classes=0, pooling="cls")  # the teacher runs in eval mode, pretrain layout
  return create_model(config.teacher.name, seed=0, **kw)


def extra_params(config, student: nnx.Module) -> dict | None:
  """Trainable params beside the student: the width projection of the feature / class-token targets."""
  if config.objective != "distill" or config.distill.target == "relation":
    return None
  return ts.distill_projection(student.config.embed_dim, teacher_vit_config(config).embed_dim, seed=config.seed)


def load_weights(model: nnx.Module, source: str, *, skip=(), allow_missing=()):
  """Loads a .pth / .safetensors file or a tinymim-jax workdir into `model` (strict, via timm names)."""
  from tinymim_jax import checkpoint, convert
  if os.path.isdir(source):
    src = convert.export_pytorch_weights(checkpoint.restore_model(source))
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
