"""Exactness helpers: the gradients a train step computes, read out of the step itself, and central differences.

A step built with `grad_recorder()` as its optimizer is the trainer's step (same loss, same autodiff, same
jit_step) whose optimizer update leaves the params as they are and stores the gradients in state['opt'].
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tinymim_jax import sharding as sh
from tinymim_jax import train_steps as ts


def grad_recorder() -> optax.GradientTransformation:
  """An optimizer with zero updates whose state is the last gradients it was given (same tree as params)."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def step_runner(step_fn, state, devices: int = 1):
  """ts.jit_step(step_fn) over the first `devices` devices, compiled once; run(state, batch, rng) returns the
  host (new_state, metrics) and leaves `state` usable (the step donates a device copy)."""
  mesh = sh.make_mesh(devices=jax.devices()[:devices])
  state_sharding = sh.tree_sharding(state, mesh)
  step = ts.jit_step(step_fn, state_sharding, mesh)

  def run(state, batch, rng):
    state = jax.device_put(jax.tree.map(jnp.array, state), state_sharding)  # a copy: the step donates it
    batch = jax.device_put(batch, sh.batch_sharding(mesh))
    return jax.device_get(step(state, batch, rng))

  return run


def directional_check(run, state, batch, rng, *, eps: float, seed: int = 0):
  """(g . d, central difference of the step's loss along d) for a random unit direction d over all params.

  run: a step_runner of a step built with grad_recorder(). The step counter stays at state['step'], so every
  call sees the same masks / drop path / mixup draws: the loss is one smooth function of the params.
  """
  grads = run(state, batch, rng)[0]["opt"]
  leaves, treedef = jax.tree.flatten(state["params"])
  r = np.random.default_rng(seed)
  d = [r.standard_normal(np.shape(x)) for x in leaves]
  norm = np.sqrt(sum(np.sum(x * x) for x in d))
  d = [x / norm for x in d]
  gd = sum(float(np.sum(np.asarray(g, np.float64) * x)) for g, x in zip(jax.tree.leaves(grads), d))

  def loss_at(t):
    params = jax.tree.unflatten(treedef, [np.asarray(p) + t * x.astype(np.asarray(p).dtype)
                                          for p, x in zip(leaves, d)])
    return float(run({**state, "params": params}, batch, rng)[1]["loss"])

  fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
  return gd, fd
