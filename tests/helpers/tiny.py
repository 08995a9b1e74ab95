"""Tiny teacher / student set-ups shared by the train-step tests and the multi-process worker.

Built from a config through the builders, as the trainer builds them.
"""

import jax
import numpy as np

from tinymim_jax import builders, config_base, train_steps as ts
from tinymim_jax.objectives import distill

IMG, PATCH = 32, 8


def distill_config(target="relation", *, teacher_depth=4, teacher_block=3, student_block=3, mask_ratio=0.0,
                   lr=1e-3):
  """Student D 48, 3 blocks, 2 heads (4 in its relation block), drop path 0.1; teacher D 64, 4 heads."""
  c = config_base.base_config()
  c.objective, c.seed, c.batch_size = "distill", 2, 256  # batch 256: the peak lr is optim.base_lr
  c.model.update(dict(name="vit_tiny_patch16", img_size=IMG, patch_size=PATCH, embed_dim=48, depth=3, num_heads=2,
                      drop_path=0.1, drop_path_mode="constant"))
  c.teacher.update(dict(name="vit_tiny_patch16", img_size=IMG, patch_size=PATCH, embed_dim=64, depth=teacher_depth,
                        num_heads=4, dtype="float32", source="unused"))
  c.distill.update(dict(target=target, teacher_block=teacher_block, student_block=student_block,
                        student_mask_ratio=mask_ratio))
  c.optim.base_lr = lr
  return c


def distill_setup(*, warmup=2, **config_kw):
  """-> (step_fn, state, tx) of a tiny distillation run (200 steps, `warmup` warmup steps)."""
  c = distill_config(**config_kw)
  student, extras = builders.make_trainable(c)
  spec = distill.distill_spec(c)
  tx, schedule, _ = distill.make_optimizer(c, ts.split_model(student, extras)[1], total_steps=200,
                                           warmup_steps=warmup)
  modeldef, teacher_graphdefs, state = ts.init_state(student, tx, teachers=distill.make_teachers(c), extras=extras)
  return distill.make_distill_step(modeldef, teacher_graphdefs, tx, schedule, spec, distill.teacher_specs(c)), state, tx


def images(n=16, seed=0):
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, IMG, IMG, 3)), np.float32)
