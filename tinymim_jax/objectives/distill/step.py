"""The distillation step (docs/method.md sections 2, 3, 9): the teachers run to their blocks, the student once to
its target block, and the loss is the weighted sum of the target's loss per teacher."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from tinymim_jax import train_steps as ts
from tinymim_jax.models import mae as mae_lib
from tinymim_jax.objectives.distill.targets import TARGETS, DistillSpec
from tinymim_jax.objectives.distill.teachers import TeacherSpec, drop_registers


def make_distill_step(modeldef: ts.ModelDef, teacher_graphdefs: Mapping[str, Any], tx, schedule, spec: DistillSpec,
                      teachers: Mapping[str, TeacherSpec]) -> Callable:
  """The distillation step: each teacher (init_state's graphdefs, keyed like state['teachers']) runs to its
  block; the student runs once, to spec.student_block; the loss is the weighted sum of the target's loss per
  teacher, `teachers` {name: TeacherSpec} saying how each runs. Metrics: 'loss' (the sum)
  and the target's aux metrics, suffixed '_<name>' (with 'loss_<name>' per teacher) when there are several."""
  target = TARGETS[spec.target]
  teachers = dict(teachers)
  if set(teachers) != set(teacher_graphdefs) or not teachers:
    raise ValueError(f"teacher specs {sorted(teachers)} do not match the teachers {sorted(teacher_graphdefs)}")
  several = len(teachers) > 1

  def teacher_forward(name, teacher_state, images):
    t = teachers[name]
    teacher = nnx.merge(teacher_graphdefs[name], teacher_state)
    out = teacher(t.input(images), depth=t.block, capture=(t.block,), qkv_only=target.qkv_only)
    return jax.lax.stop_gradient(drop_registers(out["blocks"][t.block], t.input.reg_tokens))

  def teacher_extras(name, extras):
    pairs = teachers[name].extras
    return dict(extras) if pairs is None else {own: extras[stored] for own, stored in pairs}

  def step(state, batch, rng):
    dp_rng, mask_rng = ts.step_rngs(rng, state["step"], 2)
    ts_ = {name: teacher_forward(name, state["teachers"][name], batch["teacher"]) for name in teachers}
    keep_ids = None
    if spec.student_mask_ratio > 0:
      b = batch["student"].shape[0]
      length = next(iter(next(iter(ts_.values())).values())).shape[-2] - 1
      keep_ids, _, _ = mae_lib.random_masking(mask_rng, b, length, spec.student_mask_ratio)
      # The teachers saw the whole image; compare on the CLS + the patches the student saw.
      rows = jnp.concatenate([jnp.zeros((b, 1), keep_ids.dtype), keep_ids + 1], axis=1)
      ts_ = {name: {k: (jnp.take_along_axis(v, rows[:, None, :, None], axis=2) if v.ndim == 4
                        else jnp.take_along_axis(v, rows[:, :, None], axis=1)) for k, v in t.items()}
             for name, t in ts_.items()}

    def loss_fn(params):
      student = ts.merge_model(modeldef, params, state["consts"])
      out = student(batch["student"], rng=dp_rng, depth=spec.student_block, capture=(spec.student_block,),
                    qkv_only=target.qkv_only, keep_ids=keep_ids)
      s, extras = out["blocks"][spec.student_block], ts.merge_extras(modeldef, params)
      total, aux = 0.0, {}
      for name, t in ts_.items():
        loss, metrics = target.loss(t, s, teacher_extras(name, extras), spec)
        total = total + teachers[name].weight * loss
        if several:
          aux.update({f"loss_{name}": loss, **{f"{k}_{name}": v for k, v in metrics.items()}})
        else:
          aux.update(metrics)
      return total, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    return ts.apply_guarded_update(state, grads, loss, aux, tx, schedule)

  return step


