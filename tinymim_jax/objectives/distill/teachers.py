"""The teachers of a distillation: how each is built from its config section (config.teachers names them), loaded,
and read by the step (TeacherSpec: its block, weight, input and extra layers), and the student they shape (the
relation block's head count, a target's extra layers per teacher).

Each teacher's ViTConfig is derived from its section here and only here (teacher_vit_config).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tinymim_jax import builders, convert
from tinymim_jax.models import ViTConfig, create_model, vit_config
from tinymim_jax.objectives.distill.targets import TARGETS, DistillSpec

@dataclasses.dataclass(frozen=True)
class TeacherInput:
  """How a teacher reads the data pipeline's teacher view (teacher_input sets it from the config).

  img_size: the teacher's input resolution, chosen so that its patch grid equals the student's (a patch-14
    DINOv2 teacher reads 196 px beside a 224 px patch-16 student: 14 x 14 both); None = the view as it is. The
    view is resized to it inside the step (jax.image.resize, bicubic, antialiased when shrinking), from the same
    crop the student sees.
  view_norm / norm: (mean, std) in [0, 1] pixel units of the view (data.teacher_norm) and the ones the teacher
    expects (models.variants.INPUT_NORM by its name, e.g. OpenAI's for CLIP). Where they differ the step maps
    the view back to pixels and normalises it again: x * (view_std / std) + (view_mean - mean) / std.
  reg_tokens: the teacher's register tokens, dropped from what it gives the loss (see drop_registers).
  """
  img_size: int | None = None
  view_norm: tuple = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  norm: tuple = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  reg_tokens: int = 0

  def __call__(self, images):
    """(B, H, W, 3) view -> the teacher's (B, img_size, img_size, 3) input."""
    if self.img_size is not None and images.shape[1:3] != (self.img_size, self.img_size):
      images = jax.image.resize(images, (images.shape[0], self.img_size, self.img_size, images.shape[3]), "bicubic")
    if tuple(map(tuple, self.view_norm)) != tuple(map(tuple, self.norm)):
      (vm, vs), (m, s) = (jnp.asarray(a, jnp.float32) for a in self.view_norm), (
          jnp.asarray(a, jnp.float32) for a in self.norm)
      images = images * (vs / s).astype(images.dtype) + ((vm - m) / s).astype(images.dtype)
    return images


def drop_registers(block: dict, reg_tokens: int) -> dict:
  """A teacher block's outputs without its register tokens: q/k/v (B, H, N, dh) and hidden (B, N, D) keep CLS and
  the patch tokens (token 0, then tokens 1 + reg_tokens ...).

  The student has no registers, so the relation maps must be over the same token set on both sides: CLS +
  patches. Dropping the registers' q/k/v rows removes both their rows and their columns from softmax(q k^T) and
  softmax(v v^T): the teacher's softmax is then taken over CLS + patches only (a restricted map, as if the
  registers were not there in this block's attention), not the full map with the register columns cut out and
  renormalised.
  """
  if not reg_tokens:
    return block

  def keep(x, axis):
    return jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                            jax.lax.slice_in_dim(x, 1 + reg_tokens, x.shape[axis], axis=axis)], axis=axis)

  return {k: keep(v, 2 if v.ndim == 4 else 1) for k, v in block.items()}


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """One teacher of a distillation (an entry of config.teachers; teacher_specs sets it from the config).

  block: the teacher block its target reads (1-based); the teacher runs only up to it.
  weight: its loss's weight in the sum over teachers (docs/method.md section 9).
  input: how it reads the data's teacher view (resolution, statistics, register tokens).
  extras: ((the target's name for an extra layer, its name in the params), ...): the width projection of a
    feature target is one per teacher; None = every extra layer under its own name (a single teacher).
  """
  block: int
  weight: float = 1.0
  input: TeacherInput = TeacherInput()
  extras: tuple[tuple[str, str], ...] | None = None


def teacher_vit_config(config, name: str = "teacher") -> ViTConfig:
  """The full ViTConfig of the teacher in section config.<name> (before make_teacher truncates it)."""
  return vit_config(config[name].name, **builders.vit_kwargs(config[name]))


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


def distill_spec(config) -> DistillSpec:
  """config.distill as the train step reads it (the fields of DistillSpec)."""
  return DistillSpec(**{f.name: config.distill[f.name] for f in dataclasses.fields(DistillSpec)})



def relation_heads(config) -> int:
  """The head count of the student's relation block: the teachers' at their blocks (distill.relation_heads, when
  set, must equal it: check_config)."""
  heads = {name: teacher_vit_config(config, name).block_heads(teacher_block(config, name))
           for name in config.teachers}
  return config.distill.relation_heads or heads[config.teachers[0]]


def check_config(config) -> None:
  """Raises config_base.ConfigError, naming the field, for a distillation the step cannot compute: the relation
  target compares the teacher's and the student's maps head by head (docs/method.md 2.1-2.3), so the teachers'
  blocks must have one head count and distill.relation_heads (when set) must equal it (no source states how
  H teacher heads would be regrouped into another count), and the student has no register tokens (the maps are
  over CLS + patches on both sides: docs/method.md 9)."""
  from tinymim_jax.config_base import ConfigError
  if config.model.get("reg_tokens"):
    raise ConfigError(f"config.model.reg_tokens={config.model.reg_tokens}: a distillation student has no register "
                      f"tokens (the relation maps are over CLS + patches on both sides; a teacher's registers are "
                      f"dropped instead). Set --config.model.reg_tokens=0")
  if config.distill.target != "relation":
    return
  heads = {name: teacher_vit_config(config, name).block_heads(teacher_block(config, name))
           for name in config.teachers}
  if len(set(heads.values())) > 1:
    blocks = ", ".join(f"{n}.block" for n in config.teachers)
    raise ConfigError(f"the teachers' relation blocks have {heads} heads: relation maps are compared head by head, "
                      f"so they need one count; pick blocks with equal head counts ({blocks}) or use one teacher")
  (count,) = set(heads.values())
  wanted = config.distill.relation_heads
  if wanted is not None and wanted != count:
    raise ConfigError(f"config.distill.relation_heads={wanted}, but the teacher's block has {count} heads: the "
                      f"relation loss compares the maps head by head, and no source states how {count} teacher "
                      f"heads would be regrouped into {wanted}. Leave distill.relation_heads unset (the teacher's "
                      f"count) or set it to {count}")


def make_student(config, *, seed: int | None = None) -> nnx.Module:
  """The student config.model describes, its relation block (distill.student_block) with the teachers' head count
  (relation_heads) and no drop path (docs/method.md sections 2, 3)."""
  kw = builders.vit_kwargs(config.model)
  kw["head_overrides"] = {config.distill.student_block: relation_heads(config)}
  kw["drop_path_overrides"] = {config.distill.student_block: 0.0}
  return create_model(config.model.name, seed=config.seed if seed is None else seed, **kw)


def make_trainable(config, *, seed: int | None = None) -> tuple[nnx.Module, dict[str, nnx.Module]]:
  """-> (make_student's student, {name: extra layers trained beside it}): the target's extra layers (TARGETS),
  e.g. the feature target's width projection, one set per teacher (teacher_specs names them)."""
  model = make_student(config, seed=seed)
  target, extras = TARGETS[config.distill.target], {}
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
  kw = builders.vit_kwargs(config[name])
  kw.update(drop_path=0.0, num_classes=0, pooling="cls", depth=teacher_block(config, name),
            img_size=teacher_img_size(config, name))
  return create_model(config[name].name, seed=0, **kw)


def teacher_img_size(config, name: str = "teacher") -> int:
  """The teacher's input resolution: the student's patch grid times the teacher's patch size, so that both see
  the same grid (196 px for a patch-14 teacher beside a 224 px patch-16 student)."""
  student = vit_config(config.model.name, **builders.vit_kwargs(config.model))
  teacher = teacher_vit_config(config, name)
  return (student.img_size // student.patch_size) * teacher.patch_size


def teacher_input(config, name: str = "teacher") -> TeacherInput:
  """How teacher `name` reads the data's teacher view: its resolution (teacher_img_size), its input statistics
  (models.variants.INPUT_NORM by its variant name; the view comes normalised with config.data.teacher_norm),
  and the register tokens dropped from the relation maps."""
  from tinymim_jax.models.variants import INPUT_NORM, IMAGENET_NORM
  t = teacher_vit_config(config, name)
  return TeacherInput(img_size=teacher_img_size(config, name),
                         view_norm=tuple(map(tuple, config.data.teacher_norm)),
                         norm=INPUT_NORM.get(config[name].name, IMAGENET_NORM), reg_tokens=t.reg_tokens)


def teacher_specs(config) -> dict[str, TeacherSpec]:
  """{name: TeacherSpec} over config.teachers: its block, weight, input, and (several teachers) the names
  of its own extra layers among make_trainable's."""
  student, target = vit_config(config.model.name, **builders.vit_kwargs(config.model)), TARGETS[config.distill.target]
  specs = {}
  for i, name in enumerate(config.teachers):
    own = None
    if len(config.teachers) > 1:
      keys = nnx.eval_shape(lambda n=name: target.extra_layers(student, teacher_vit_config(config, n), nnx.Rngs(0)))
      own = tuple((k, _extra_name(k, name, i)) for k in keys)
    specs[name] = TeacherSpec(block=teacher_block(config, name), weight=float(config[name].weight),
                                 input=teacher_input(config, name), extras=own)
  return specs


def teacher_options(name: str = "teacher") -> dict[str, str]:
  """How the config sets teacher `name`'s loader options (its section's fields), for the hints of its errors."""
  return {k: f"{name}.{k}" for k in ("skip", "ema", "prefix")}


def load_teacher(teacher: nnx.Module, config, name: str = "teacher") -> convert.LoadReport:
  """config.<name>.source into make_teacher's model: exactly what the teacher runs (the embeddings and blocks
  1..teacher_block) is required and loaded; the rest of the file is reported as not run."""
  t = config[name]
  return builders.load_weights(teacher, t.source, skip=t.skip, ema=t.ema, prefix=t.prefix,
                      depth=teacher_block(config, name), hint_context=teacher_options(name))
