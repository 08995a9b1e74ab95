"""Running a pure train step a few times over a mesh, as the trainer does (train_steps.jit_step)."""

import jax

from tinymim_jax import sharding as sh, train_steps as ts


def run(step_fn, state, batch, steps, mesh, key=None):
  """-> (the state after `steps` steps on the same batch, fetched to host; the list of each step's metrics)."""
  state_sh = sh.tree_sharding(state, mesh)
  step = ts.jit_step(step_fn, state_sh, mesh)
  state = jax.device_put(jax.device_get(state), state_sh)  # a copy: the step donates it, the caller keeps its own
  batch = jax.device_put(batch, sh.batch_sharding(mesh))
  key = jax.random.key(0) if key is None else key
  metrics = []
  for _ in range(steps):
    state, m = step(state, batch, key)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics
