"""From a config to what a run needs: models, the teacher, weights, the optimizer, a finished run's model.

The one place each of these is built, shared by the trainer, the converter CLI, the benchmarks and the tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from tinymim_jax import checkpoint, convert, features, optim, paths
from tinymim_jax import workdir as workdir_lib
from tinymim_jax import train_steps as ts
from tinymim_jax.models import MAE_PREFIX, ViTConfig, create_model, vit_config


def vit_kwargs(mc) -> dict:
  """The ViTConfig fields a `config_base.model_config()` section sets (None = keep the variant's value)."""
  return {f.name: mc[f.name] for f in dataclasses.fields(ViTConfig) if f.name in mc and mc[f.name] is not None}


def teacher_vit_config(config, name: str = "teacher") -> ViTConfig:
  """The full ViTConfig of the teacher in section config.<name> (before make_teacher truncates it)."""
  return vit_config(config[name].name, **vit_kwargs(config[name]))


def teacher_block(config, name: str = "teacher") -> int:
  """The 1-based block of teacher `name` that the target reads: config.<name>.block, else distill.teacher_block.
  Raises ValueError naming the field when the teacher has no such block."""
  section = config[name]
  block = config.distill.teacher_block if section.block is None else section.block
  depth = teacher_vit_config(config, name).depth
  if not 1 <= block <= depth:
    field = "distill.teacher_block" if section.block is None else f"{name}.block"
    raise ValueError(f"config.{field}={block}, but config.{name} ({section.name}) has blocks 1..{depth}")
  return block


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
    # The relation block uses the teachers' head count and no drop path (docs/method.md sections 2, 3).
    kw["head_overrides"] = {config.distill.student_block: relation_heads(config)}
    kw["drop_path_overrides"] = {config.distill.student_block: 0.0}
    return create_model(config.model.name, seed=seed, **kw)
  if num_classes and not kw.get("num_classes"):
    kw["num_classes"] = num_classes
  return create_model(config.model.name, seed=seed, **kw)


def relation_heads(config) -> int:
  """The head count of the student's relation block: distill.relation_heads, else the teachers' at their blocks.
  With a relation target, teachers whose heads differ there are a ValueError (their maps cannot be compared)."""
  heads = {name: teacher_vit_config(config, name).block_heads(teacher_block(config, name))
           for name in config.teachers}
  if config.distill.target == "relation" and config.distill.relation_heads is None and len(set(heads.values())) > 1:
    raise ValueError(f"the teachers' blocks have {heads} heads: relation maps per head need one count; set "
                     f"--config.distill.relation_heads or pick blocks with equal head counts")
  return config.distill.relation_heads or heads[config.teachers[0]]


def make_trainable(config, *, num_classes: int | None = None) -> tuple[nnx.Module, dict[str, nnx.Module]]:
  """-> (the model a run trains, {name: extra layers trained beside it}): a distillation target's extra layers
  (ts.TARGETS), e.g. the feature target's width projection, one set per teacher (teacher_specs names them);
  none for the other objectives."""
  model = make_model(config, num_classes=num_classes)
  if config.objective != "distill":
    return model, {}
  target, extras = ts.TARGETS[config.distill.target], {}
  for i, name in enumerate(config.teachers):
    own = target.extra_layers(model.config, teacher_vit_config(config, name), nnx.Rngs(config.seed + i))
    extras.update({_extra_name(k, name, i): layer for k, layer in own.items()})
  return model, extras


def _extra_name(key: str, teacher: str, index: int) -> str:
  """A target's extra layer `key` for the teacher at `index` of config.teachers: its own name for the first
  (a single-teacher run's names), '<key>_<teacher>' for the others."""
  return key if index == 0 else f"{key}_{teacher}"


def make_teachers(config) -> dict[str, nnx.Module]:
  """{name: make_teacher(config, name)} over config.teachers (models only; load_teacher loads each)."""
  return {name: make_teacher(config, name) for name in config.teachers}


def make_teacher(config, name: str = "teacher") -> nnx.Module:
  """The frozen teacher of section config.<name>: only what it runs, the embeddings and blocks 1..its block
  (teacher_block; eval mode, CLS layout; its final norm is built but never run)."""
  kw = vit_kwargs(config[name])
  kw.update(drop_path=0.0, num_classes=0, pooling="cls", depth=teacher_block(config, name),
            img_size=teacher_img_size(config, name))
  return create_model(config[name].name, seed=0, **kw)


def teacher_img_size(config, name: str = "teacher") -> int:
  """The teacher's input resolution: the student's patch grid times the teacher's patch size, so that both see
  the same grid (196 px for a patch-14 teacher beside a 224 px patch-16 student)."""
  student, teacher = vit_config(config.model.name, **vit_kwargs(config.model)), teacher_vit_config(config, name)
  return (student.img_size // student.patch_size) * teacher.patch_size


def teacher_input(config, name: str = "teacher") -> ts.TeacherInput:
  """How teacher `name` reads the data's teacher view: its resolution (teacher_img_size), its input statistics
  (models.variants.INPUT_NORM by its variant name; the view comes normalised with config.data.teacher_norm),
  and the register tokens dropped from the relation maps."""
  from tinymim_jax.models.variants import INPUT_NORM, IMAGENET_NORM
  t = teacher_vit_config(config, name)
  return ts.TeacherInput(img_size=teacher_img_size(config, name),
                         view_norm=tuple(map(tuple, config.data.teacher_norm)),
                         norm=INPUT_NORM.get(config[name].name, IMAGENET_NORM), reg_tokens=t.reg_tokens)


def teacher_specs(config) -> dict[str, ts.TeacherSpec]:
  """{name: ts.TeacherSpec} over config.teachers: its block, weight, input, and (several teachers) the names
  of its own extra layers among make_trainable's."""
  student, target = vit_config(config.model.name, **vit_kwargs(config.model)), ts.TARGETS[config.distill.target]
  specs = {}
  for i, name in enumerate(config.teachers):
    own = None
    if len(config.teachers) > 1:
      keys = nnx.eval_shape(lambda n=name: target.extra_layers(student, teacher_vit_config(config, n), nnx.Rngs(0)))
      own = tuple((k, _extra_name(k, name, i)) for k in keys)
    specs[name] = ts.TeacherSpec(block=teacher_block(config, name), weight=float(config[name].weight),
                                 input=teacher_input(config, name), extras=own)
  return specs


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
def _open_run(workdir: str) -> checkpoint.Checkpointer:
  """A finished or running run's checkpoints, read-only: nothing is created in a directory that is not one."""
  if not paths.isdir(os.path.join(workdir, workdir_lib.CHECKPOINTS)):
    raise convert.MissingSourceError(f"{workdir!r} is not a tinymim-jax workdir: it has no {workdir_lib.CHECKPOINTS}/ "
                                     f"directory")
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  if ckpt.latest_step() is None:
    ckpt.close()
    raise convert.MissingSourceError(f"no checkpoint under {ckpt.directory}: is {workdir!r} a tinymim-jax workdir?")
  return ckpt


def _saved_trainable(meta: dict):
  config = ml_collections.ConfigDict(meta["config"])
  return nnx.eval_shape(lambda: make_trainable(config, num_classes=meta.get("num_classes")))


def restore_model(workdir: str) -> nnx.Module:
  """The trained model of a tinymim-jax run (its newest intact checkpoint, without a target's extra layers),
  rebuilt from the config it saved, on this process's first device whatever mesh saved it. Reads only.

  Raises convert.MissingSourceError (a FileNotFoundError) when `workdir` holds no checkpoint,
  checkpoint.NoIntactCheckpointError when every checkpoint is damaged (a damaged one is skipped with a warning,
  and left where it is).
  """
  return _restore(workdir)[0]


def _restore(workdir: str) -> tuple[nnx.Module, dict]:
  """-> (restore_model(workdir), the checkpoint's metadata)."""
  ckpt = _open_run(workdir)
  try:
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    built = {}

    def abstract_model(meta):
      built["modeldef"], params, consts = ts.split_model(*_saved_trainable(meta))
      target = {"params": params, "consts": consts}
      return {"model": checkpoint.abstract(target, jax.tree.map(lambda _: local, target))}

    _, restored, meta = ckpt.restore_intact(abstract_model)
  finally:
    ckpt.close()
  return ts.merge_model(built["modeldef"], restored["model"]["params"], restored["model"]["consts"]), meta


def source_architecture(source: str) -> tuple[dict, str] | None:
  """-> (convert.architecture of the model `source` holds, where it was read) or None when nothing records it:
  a workdir's saved config, or the `<name>.config.json` beside a weight file."""
  if paths.isdir(source):
    ckpt = _open_run(source)
    try:
      model, _ = _saved_trainable(ckpt.restore_meta())
    finally:
      ckpt.close()
    return convert.architecture(model), f"the config saved in {source}"
  if paths.isfile(source):
    side = convert.read_sidecar(source)
    return (side, os.path.basename(convert.sidecar_path(source))) if side is not None else None
  return None


def load_weights(model: nnx.Module, source: str, *, skip=(), allow_missing=(), ema: bool = True,
                 prefix: str | None = None, depth: int | None = None,
                 hint_context: convert.HintContext = "api") -> convert.LoadReport:
  """Loads a .pth / .safetensors file or a tinymim-jax workdir into `model` (strict, via timm names); the
  arguments are convert.load_pytorch_weights'. Raises convert.MissingSourceError for a source that is neither."""
  if paths.isdir(source):
    restored = restore_model(source)
    src = convert.Checkpoint(weights=convert.export_pytorch_weights(restored), extras={}, label=source,
                             sidecar=convert.architecture(restored), sidecar_label=f"the config saved in {source}")
  elif paths.exists(source):
    src = source
  else:
    raise convert.MissingSourceError(f"weights source {source!r} is neither a file nor a tinymim-jax workdir")
  return convert.load_pytorch_weights(model, src, skip=tuple(skip), allow_missing=tuple(allow_missing), ema=ema,
                                      prefix=prefix, depth=depth, hint_context=hint_context)


# How the main job's user sets the loader's options (config fields), for the hints of its errors and reports.
INIT_OPTIONS = {"skip": "init_skip", "ema": "init_ema", "prefix": "init_prefix"}

def teacher_options(name: str = "teacher") -> dict[str, str]:
  return {k: f"{name}.{k}" for k in ("skip", "ema", "prefix")}


def load_init(model: nnx.Module, config) -> convert.LoadReport:
  """config.init into the model a run trains. Fine-tuning starts from a pretrained / distilled encoder: a fresh
  fc_norm + head, the file's `norm` dropped; objective 'eval' needs every key."""
  return load_weights(model, config.init, skip=config.init_skip, ema=config.init_ema, prefix=config.init_prefix,
                      allow_missing=(r"fc_norm\..*", r"head\..*") if config.objective != "eval" else (),
                      hint_context=INIT_OPTIONS)


def load_teacher(teacher: nnx.Module, config, name: str = "teacher") -> convert.LoadReport:
  """config.<name>.source into make_teacher's model: exactly what the teacher runs (the embeddings and blocks
  1..teacher_block) is required and loaded; the rest of the file is reported as not run."""
  t = config[name]
  return load_weights(teacher, t.source, skip=t.skip, ema=t.ema, prefix=t.prefix,
                      depth=teacher_block(config, name), hint_context=teacher_options(name))


def resolve_source_heads(config) -> list[str]:
  """Takes the head counts the sources record where the config leaves them to the variant; -> log lines.

  A state dict does not store head counts. Where a teacher's source (each of config.teachers) / config.init
  records its model (source_architecture) and that section's num_heads is None (the variant's), the recorded
  count is written into the config, so the run is built, saved and restored with it. An explicit teacher
  num_heads that differs raises convert.ConvertError: the teacher's relations depend on its head split. An explicit
  model.num_heads that differs is kept and noted: fine-tuning regroups the same weights into the standard heads
  (docs/method.md 2.3). Per-block overrides (a distilled student's relation block) are not carried over: the
  builders set the relation block's heads from config.distill.
  """
  notes = []
  teachers = config.teachers if config.objective == "distill" else ()
  sections = [(name, config[name].source) for name in teachers if config[name].source]
  sections += [("model", config.init)] if config.init else []
  for field, source in sections:
    found = source_architecture(source)
    if found is None:
      continue
    side, origin = found
    recorded, section = int(side["model_args"]["num_heads"]), config[field]
    if section.num_heads is None:
      section.num_heads = recorded
      notes.append(f"config.{field}.num_heads = {recorded}: the count {origin} records for {source}")
    elif section.num_heads != recorded and field != "model":
      raise convert.ConvertError(
          f"config.{field}.num_heads={section.num_heads}, but {origin} records {recorded} heads per block for "
          f"{source}; the teacher's relations depend on its head split. Leave the field unset to use the recorded "
          f"count, or set --config.{field}.num_heads={recorded}")
    elif section.num_heads != recorded:
      notes.append(f"config.model.num_heads = {section.num_heads}, while {origin} records {recorded}: the same "
                   f"weights regrouped into {section.num_heads} heads (docs/method.md 2.3)")
  return notes


def frozen_model(config) -> tuple[nnx.Module, dict]:
  """The model the `eval` and `linprobe` objectives read features from, and the metadata of the run behind it.

  `config.init` a tinymim-jax workdir: its model exactly as trained (its own layout and head), and its
  checkpoint metadata ({'config', 'feature', ...}: how it was trained and the feature spec it recorded).
  A .pth / .safetensors file: `config.model` (its size, heads, resolution) in the file's layout (pooling 'avg'
  when it holds fc_norm, a head when it holds one), loaded strictly; metadata: the feature spec a tinymim-jax
  export recorded in its .safetensors header, else {}.
  """
  source = config.init
  if paths.isdir(source):
    return _restore(source)
  if not paths.exists(source):
    raise FileNotFoundError(f"config.init={source!r} is neither a file nor a tinymim-jax workdir")
  weights, extras, label = convert.read_pytorch_weights(source, ema=config.init_ema, prefix=config.init_prefix,
                                                        hint_context=INIT_OPTIONS)
  kw = vit_kwargs(config.model)
  kw.update(drop_path=0.0, pos_embed="learn",  # whatever table the file holds (frozen all the same)
            pooling="avg" if "fc_norm.weight" in weights else "cls",
            num_classes=int(weights["head.weight"].shape[0]) if "head.weight" in weights else 0)
  model = create_model(config.model.name, seed=config.seed, **kw)
  report = convert.load_pytorch_weights(model, weights, skip=tuple(config.init_skip), hint_context=INIT_OPTIONS)
  logging.info("frozen model from %s [%s]:\n%s", label, convert.detect_layout(weights, extras), report)
  return model, _exported_meta(source)


def _exported_meta(path: str) -> dict:
  """{'feature': spec} from the header of a .safetensors that tinymim-jax exported, else {}."""
  if not path.endswith(".safetensors"):
    return {}
  header = convert.read_safetensors_metadata(path)
  return {"feature": json.loads(header[features.METADATA_KEY])} if features.METADATA_KEY in header else {}


def weights_hash(model: nnx.Module) -> str:
  """sha256 over the model's arrays in name order: identifies a teacher in the run's metadata."""
  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
  for path, x in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(x, np.float32)).tobytes())
  return h.hexdigest()
