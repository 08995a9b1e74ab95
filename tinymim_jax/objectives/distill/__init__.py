"""TinyMIM distillation (docs/method.md sections 2, 3, 9): a student learns one or more frozen teachers' token
relations (or features) at one block; the teachers ride in the state, frozen and never checkpointed.

The room holds every piece of it: what is learnt (targets.py: DistillSpec, TARGETS), the teachers and the
student they shape (teachers.py), the step (step.py), and the objective (here).
"""

from __future__ import annotations

import dataclasses
import logging

from tinymim_jax import builders, paths
from tinymim_jax.objectives import Objective, Setup, register
from tinymim_jax.objectives.common import setup_trained_model
from tinymim_jax.objectives.distill.step import make_distill_step
from tinymim_jax.objectives.distill.targets import (TARGETS, DistillSpec, Target, WidthProjection,
                                                    distill_frozen_patterns, feature_block)
from tinymim_jax.objectives.distill.teachers import (TeacherInput, TeacherSpec, check_config, drop_registers, load_teacher,
                                                     make_student, make_teacher, make_teachers, make_trainable,
                                                     relation_heads, teacher_block, teacher_img_size,
                                                     teacher_input, teacher_options, teacher_specs,
                                                     teacher_vit_config)

__all__ = ["TARGETS", "DistillSpec", "Target", "WidthProjection", "distill_frozen_patterns", "feature_block",
           "TeacherInput", "TeacherSpec", "check_config", "drop_registers", "load_teacher", "make_student", "make_teacher",
           "make_teachers", "make_trainable", "relation_heads", "teacher_block", "teacher_img_size",
           "teacher_input", "teacher_options", "teacher_specs", "teacher_vit_config", "make_distill_step",
           "distill_spec", "make_optimizer", "Distill"]


def distill_spec(config) -> DistillSpec:
  """config.distill as the step reads it (the fields of DistillSpec)."""
  return DistillSpec(**{f.name: config.distill[f.name] for f in dataclasses.fields(DistillSpec)})


def make_optimizer(config, params, *, total_steps: int, warmup_steps: int):
  """builders.make_optimizer with the student params the target leaves untrained frozen as well
  (distill_frozen_patterns). -> (tx, schedule, a table of the rules for the log)."""
  return builders.make_optimizer(config, params, total_steps=total_steps, warmup_steps=warmup_steps,
                                 frozen=distill_frozen_patterns(distill_spec(config), params))


class Distill(Objective):
  name = "distill"
  data_mode = "distill"
  # The teacher (incl. its source and block) and the target; the other teacher sections that config.teachers
  # names are fixed as well (fixed_fields).
  fixed = ("teachers", "teacher.*", "distill.*")

  def fixed_fields(self, teachers=()) -> tuple[str, ...]:
    return self.fixed + tuple(f"{t}.*" for t in teachers)

  def teacher_sections(self, config) -> tuple[str, ...]:
    return tuple(config.teachers)

  def resolve(self, config) -> None:
    check_config(config)  # after the sources' head counts are known: before anything is built or traced

  def build(self, config, *, num_classes=None, seed=None):
    del num_classes  # the student has no head
    return make_trainable(config, seed=seed)

  def feature_block(self, run_config, depth: int) -> int:
    del depth
    return feature_block(run_config["distill"])

  def setup(self, config, info, *, total_steps: int, warmup_steps: int, is_main: bool) -> Setup:
    spec = distill_spec(config)

    def make_frozen():
      teachers, meta = {}, {}
      for name in config.teachers:
        teachers[name] = make_teacher(config, name)
        report = load_teacher(teachers[name], config, name)
        logging.info("teacher %r from %s:\n%s", name, config[name].source, report)
        meta[name] = {"source": paths.abspath(config[name].source), "name": config[name].name,
                      "sha256": builders.weights_hash(teachers[name]),
                      "block": teacher_block(config, name), "weight": config[name].weight}
      return teachers, meta

    def make_step(modeldef, teacher_graphdefs, tx, schedule):
      return make_distill_step(modeldef, teacher_graphdefs, tx, schedule, spec, teacher_specs(config))

    return setup_trained_model(
        self, config, info, total_steps=total_steps, warmup_steps=warmup_steps, is_main=is_main,
        make_step=make_step, frozen_patterns=lambda params: distill_frozen_patterns(spec, params),
        make_teachers=make_frozen)


register(Distill())
