"""TinyMIM distillation (docs/method.md sections 2-3): a student learns one or more frozen teachers' token
relations (or features) at one block; the teachers ride in the state, frozen and never checkpointed."""

from __future__ import annotations

import logging

from tinymim_jax import builders, paths
from tinymim_jax import train_steps as ts
from tinymim_jax.objectives import Objective, Setup, register
from tinymim_jax.objectives.common import setup_trained_model


class Distill(Objective):
  name = "distill"
  data_mode = "distill"
  # The teacher (incl. its source and block) and the target; the other teacher sections that config.teachers
  # names are fixed as well (fixed_fields).
  fixed = ("teachers", "teacher.*", "distill.*")

  def fixed_fields(self, teachers=()) -> tuple[str, ...]:
    return self.fixed + tuple(f"{t}.*" for t in teachers)

  def setup(self, config, info, *, total_steps: int, warmup_steps: int, is_main: bool) -> Setup:
    spec = builders.distill_spec(config)

    def make_teachers():
      teachers, meta = {}, {}
      for name in config.teachers:
        teachers[name] = builders.make_teacher(config, name)
        report = builders.load_teacher(teachers[name], config, name)
        logging.info("teacher %r from %s:\n%s", name, config[name].source, report)
        meta[name] = {"source": paths.abspath(config[name].source), "name": config[name].name,
                      "sha256": builders.weights_hash(teachers[name]),
                      "block": builders.teacher_block(config, name), "weight": config[name].weight}
      return teachers, meta

    def make_step(modeldef, teacher_graphdefs, tx, schedule):
      return ts.make_distill_step(modeldef, teacher_graphdefs, tx, schedule, spec, builders.teacher_specs(config))

    return setup_trained_model(config, info, total_steps=total_steps, warmup_steps=warmup_steps, is_main=is_main,
                               make_step=make_step, spec=spec, make_teachers=make_teachers)


register(Distill())
