"""Fine-tuning on labels (MAE's main_finetune.py recipe: mixup / cutmix, label smoothing, layer decay), optionally
with DeiT-style distillation from a frozen classifier and a weight EMA (TinyMIM*-T's recipe; docs/method.md
section 11).

The step, `step(state, batch, rng) -> (state, metrics)` in the form of train_steps' steps. The state is
train_steps' ({'step', 'params', 'consts', 'opt'}) plus

  teachers  {'teacher': the frozen teacher classifier's full state} (init_state(..., teachers=...)): run in eval
            mode, never differentiated, never checkpointed (Setup.frozen)
  ema       (optional) an exponential moving average of 'params' (same tree): init_ema(state); checkpointed
            with the state, updated after each optimizer update that was applied

The student is a ViT with a distillation token (ViTConfig.dist_token) unless the distillation type is 'none'.
As in DeiT (main.py, engine.py), the teacher sees the very images the student sees, after mixup / cutmix.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tinymim_jax import builders, config_base, losses, optim, paths
from tinymim_jax import train_steps as ts
from tinymim_jax.objectives import Objective, Setup, register
from tinymim_jax.objectives.common import setup_trained_model


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
  """DeiT's distillation arguments (DeiT main.py: --distillation-type / -alpha / -tau, --model-ema-decay) and the
  fine-tuning augmentation the step applies (MAE's recipe, docs/method.md section 4)."""
  num_classes: int
  distillation_type: str = "none"   # 'none' | 'soft' | 'hard' (DeiT's paper recipe: hard)
  alpha: float = 0.5                # weight of the distillation term (DeiT default 0.5)
  tau: float = 1.0                  # soft distillation temperature (DeiT default 1.0)
  ema_decay: float | None = None    # None: no EMA; DeiT 0.99996
  mixup: float = 0.8
  cutmix: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.1

  def __post_init__(self):
    if self.distillation_type not in losses.DISTILLATION_TYPES:
      raise ValueError(f"distillation type must be one of {losses.DISTILLATION_TYPES}, got "
                       f"{self.distillation_type!r}")
    if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"EMA decay must be in [0, 1) (DeiT: 0.99996), got {self.ema_decay}")


def init_ema(state: dict) -> dict:
  """The state with an EMA of its params: a copy of the weights training starts from (timm ModelEmaV2)."""
  return {**state, "ema": jax.tree.map(jnp.array, state["params"])}


def make_finetune_step(modeldef: ts.ModelDef, teacher_graphdef: Any | None, tx, schedule,
                               spec: FinetuneSpec, *, teacher_input: Callable | None = None) -> Callable:
  """The step. `teacher_graphdef`: init_state's graphdef of state['teachers']['teacher'] (None with 'none');
  `teacher_input`: maps the batch's images to the teacher's input (a train_steps.TeacherInput: resolution,
  statistics), None = as they are.

  batch: {'image': (B, H, W, 3) float, 'label': (B,) int}. Metrics (besides 'loss', 'grad_norm', 'lr',
  'nonfinite'): 'loss_cls' / 'loss_dist' (the two terms), 'train_top1' (the prediction: the mean of the two
  heads), 'train_top1_cls' / 'train_top1_dist' (each head) and 'train_top1_teacher', each against the unmixed
  labels. Raises ValueError (at trace time) when a 'soft' / 'hard' student has no distillation token, or a
  teacher is missing.
  """
  distilling = spec.distillation_type != "none"
  if distilling and teacher_graphdef is None:
    raise ValueError(f"distillation type {spec.distillation_type!r} needs a teacher (or choose 'none')")
  mixing = spec.mixup > 0 or spec.cutmix > 0
  if mixing:
    from tinymim_jax.data import mixup_cutmix  # pure jnp; the data package imports TF only lazily
  teacher_input = teacher_input or (lambda images: images)

  def step(state, batch, rng):
    dp_rng, mix_rng = ts.step_rngs(rng, state["step"], 2)
    images, labels = batch["image"], batch["label"]
    if mixing:
      images, targets = mixup_cutmix(mix_rng, images, labels, num_classes=spec.num_classes,
                                     mixup_alpha=spec.mixup, cutmix_alpha=spec.cutmix, switch_prob=spec.switch_prob,
                                     label_smoothing=spec.label_smoothing)
    else:
      targets = optax.smooth_labels(jax.nn.one_hot(labels, spec.num_classes), spec.label_smoothing)
    aux = {}
    teacher_logits = None
    if distilling:
      teacher = nnx.merge(teacher_graphdef, state["teachers"]["teacher"])
      teacher_logits = jax.lax.stop_gradient(teacher(teacher_input(images))["logits"])
      aux["train_top1_teacher"] = losses.top1_correct(teacher_logits, labels).mean()

    def loss_fn(params):
      model = ts.merge_model(modeldef, params, state["consts"])
      out = model(images, rng=dp_rng)
      if "logits_dist" in out:
        logits_cls, logits_dist = out["logits_cls"], out["logits_dist"]
      elif distilling:
        raise ValueError(f"distillation type {spec.distillation_type!r} needs a student with a distillation "
                         f"token: set model.dist_token=True (or choose 'none')")
      else:  # one head: MAE's fine-tuning loss
        return (losses.soft_cross_entropy(out["logits"], targets),
                {"train_top1": losses.top1_correct(out["logits"], labels).mean()})
      loss, terms = losses.distillation_loss(logits_cls, logits_dist, targets, teacher_logits,
                                             kind=spec.distillation_type, alpha=spec.alpha, tau=spec.tau)
      metrics = {**terms, "train_top1": losses.top1_correct(out["logits"], labels).mean(),
                 "train_top1_cls": losses.top1_correct(logits_cls, labels).mean(),
                 "train_top1_dist": losses.top1_correct(logits_dist, labels).mean()}
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new, metrics = ts.apply_guarded_update(state, grads, loss, {**aux, **metrics}, tx, schedule)
    if spec.ema_decay is not None:
      # After the optimizer update, and only when it was applied (a skipped step leaves the EMA as it was).
      new["ema"] = jax.lax.cond(metrics["nonfinite"] == 0,
                                lambda e, p: optim.ema_update(e, p, spec.ema_decay), lambda e, p: e,
                                state["ema"], new["params"])
    return new, metrics

  return step


TEACHER_SECTION = "finetune_teacher"


def finetune_spec(config, num_classes: int) -> FinetuneSpec:
  """config.finetune as the step reads it."""
  f = config.finetune
  return FinetuneSpec(num_classes=num_classes, distillation_type=f.distillation_type, alpha=f.alpha,
                             tau=f.tau, ema_decay=f.ema_decay, mixup=f.mixup, cutmix=f.cutmix,
                             switch_prob=f.switch_prob, label_smoothing=f.label_smoothing)


def check_class_count(config, info, where: str) -> None:
  """config.model.num_classes (0: the data's) must be the data's class count."""
  if config.model.num_classes and config.model.num_classes != info.num_classes:
    raise config_base.ConfigError(
        f"config.model.num_classes={config.model.num_classes}, but the data ({where}) has {info.num_classes} "
        f"classes: set --config.model.num_classes={info.num_classes}, or 0 to take the data's count")


def make_teacher(config, num_classes: int) -> tuple[nnx.Module, dict]:
  """The frozen classifier of config.finetune_teacher (builders.frozen_classifier) and its metadata. Raises
  config_base.ConfigError when its head's class count is not the data's."""
  section = config[TEACHER_SECTION]
  teacher, report = builders.frozen_classifier(section, {k: f"{TEACHER_SECTION}.{k}" for k in
                                                         ("skip", "ema", "prefix")})
  logging.info("fine-tuning teacher from %s:\n%s", section.source, report)
  if teacher.config.num_classes != num_classes:
    raise config_base.ConfigError(
        f"config.{TEACHER_SECTION}.source={section.source!r} classifies {teacher.config.num_classes} classes, the "
        f"data {num_classes}: a distillation teacher must share the student's labels")
  meta = {"source": paths.abspath(section.source), "sha256": builders.weights_hash(teacher),
          "distillation_type": config.finetune.distillation_type}
  return teacher, meta


class Finetune(Objective):
  name = "finetune"
  data_mode = "finetune"
  # The distillation and the EMA change what the checkpoint's weights mean; the export choice does not.
  fixed = ("finetune.distillation_type", "finetune.alpha", "finetune.tau", "finetune.ema_decay",
           f"{TEACHER_SECTION}.*")

  def teacher_sections(self, config) -> tuple[str, ...]:
    return (TEACHER_SECTION,) if config.finetune.distillation_type != "none" else ()

  def check_data(self, config, info, where: str) -> None:
    check_class_count(config, info, where)
    if info.num_classes < 2:
      raise config_base.ConfigError(f"fine-tuning needs at least 2 classes; the data ({where}) has "
                                    f"{info.num_classes}")

  def setup(self, config, info, *, total_steps: int, warmup_steps: int, is_main: bool) -> Setup:
    spec = finetune_spec(config, info.num_classes)
    distilling = spec.distillation_type != "none"
    sizes = {}

    def make_frozen():
      teacher, meta = make_teacher(config, info.num_classes)
      sizes["teacher"] = teacher.config.img_size
      return {"teacher": teacher}, {"teacher": meta}

    def make_step(modeldef, teacher_graphdefs, tx, schedule):
      from tinymim_jax.objectives.distill import TeacherInput  # pylint: disable=g-import-not-at-top
      # The teacher reads the student's (mixed) batch, resized to its own resolution; same normalisation.
      resize = TeacherInput(img_size=sizes["teacher"]) if distilling else None
      return make_finetune_step(modeldef, teacher_graphdefs.get("teacher"), tx, schedule, spec,
                                        teacher_input=resize)

    setup = setup_trained_model(self, config, info, total_steps=total_steps, warmup_steps=warmup_steps,
                                is_main=is_main, make_step=make_step,
                                make_teachers=make_frozen if distilling else None)
    if spec.ema_decay is not None:
      setup.state = init_ema(setup.state)
      predict, export = setup.predict, setup.export
      setup.extra_evals = {"ema": (lambda s, images: predict({"params": s["ema"], "consts": s["consts"]}, images),
                                   ("ema", "consts"))}
      if config.finetune.export_ema:
        setup.export = lambda s: export({**s, "params": s["ema"]})
    return setup


register(Finetune())
