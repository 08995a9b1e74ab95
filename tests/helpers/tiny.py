"""Tiny teacher / student set-ups shared by the train-step tests and the multi-process worker."""

import jax
import numpy as np

from tinymim_jax import create_model, optim, train_steps as ts

IMG, PATCH = 32, 8


def teacher(depth=4):
  return create_model("vit_tiny_patch16", img_size=IMG, patch_size=PATCH, embed_dim=64, depth=depth,
                      num_heads=4, seed=1)


def student(relation_heads=4, depth=3, drop_path=0.1):
  return create_model("vit_tiny_patch16", img_size=IMG, patch_size=PATCH, embed_dim=48, depth=depth,
                      num_heads=2, head_overrides={depth: relation_heads}, drop_path=drop_path,
                      drop_path_mode="constant", drop_path_overrides={depth: 0.0}, seed=2)


def distill_setup(spec=None, teacher_depth=4, lr=1e-3, extra_params=None, warmup=2):
  spec = spec or ts.DistillSpec(teacher_block=3, student_block=3)
  s, t = student(), teacher(teacher_depth)
  schedule = optim.lr_schedule(base_lr=lr, global_batch_size=256, total_steps=200, warmup_steps=warmup)
  _, params, _ = ts.split_model(s)
  params = {**params, **(extra_params or {})}
  tx = optim.make_optimizer(params, schedule=schedule, frozen=ts.distill_frozen_patterns(spec, params))
  graphdef, tgraph, state = ts.init_state(s, tx, teacher=t, extra_params=extra_params)
  step = ts.make_distill_step(graphdef, tgraph, tx, schedule, spec)
  return step, state, tx


def images(n=16, seed=0):
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, IMG, IMG, 3)), np.float32)
