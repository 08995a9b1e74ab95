"""One process of a 2-process jax.distributed run (CPU collectives); prints a JSON result line per mesh.

Run with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set (or none for the 1-process
reference); XLA_FLAGS decides the local device count.
"""

import json
import sys

import jax
from jax.experimental import multihost_utils
import numpy as np

from tinymim_jax import sharding as sh
from tinymim_jax import train_steps as ts

sh.initialize_distributed()
sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from tests.helpers import tiny  # noqa: E402

# One process start (jax.distributed and its imports: most of the cost) serves several meshes: "1,2" -> fsdp 1, 2.
for fsdp in (int(f) for f in (sys.argv[1] if len(sys.argv) > 1 else "1").split(",")):
  step_fn, state, _ = tiny.distill_setup()
  mesh = sh.make_mesh(fsdp=fsdp)
  state_sh = sh.tree_sharding(state, mesh)
  step = ts.jit_step(step_fn, state_sh, mesh)
  state = jax.device_put(state, state_sh)
  x = tiny.images(16)
  n, i = jax.process_count(), jax.process_index()
  local = x[i * 16 // n:(i + 1) * 16 // n]  # each process feeds its share of the global batch
  batch = {k: jax.make_array_from_process_local_data(sh.batch_sharding(mesh), local) for k in ("teacher", "student")}
  losses = []
  for _ in range(3):
    state, m = step(state, batch, jax.random.PRNGKey(0))
    losses.append(float(m["loss"]))
  qkv = state["params"]["blocks"][2]["attn"]["qkv"]["kernel"]
  qkv = np.asarray(multihost_utils.process_allgather(qkv, tiled=True))
  print("RESULT " + json.dumps({"process": i, "count": n, "fsdp": fsdp, "losses": losses,
                                 "qkv_sum": float(np.abs(qkv).sum()), "qkv_head": qkv.reshape(-1)[:8].tolist()}),
        flush=True)
