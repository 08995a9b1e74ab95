"""Meshes, sharding rules and multi-process start-up.

One mesh with two axes, ('data', 'fsdp'). The batch is split over both (every device sees a different slice
of the global batch); parameters and optimizer state are replicated over 'data' and, by rule, sharded over
'fsdp' (ZeRO-3 style: XLA all-gathers a weight where it is used and reduce-scatters its gradient). With
fsdp=1 this is plain data parallelism.

Rules are big_vision style: an ordered list of (regex over the param name, how) pairs, the first match wins.
`how` is 'fsdp' (shard the largest dimension divisible by the fsdp size, replicate if none is),
'replicate', or an explicit PartitionSpec.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from tinymim_jax import optim

BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = (("pos_embed|decoder_pos_embed|cls_token|mask_token", "replicate"), (".*", "fsdp"))

# Variables that ask for a multi-process start. TPU pods are detected by jax itself (the worker env).
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "TINYMIM_DISTRIBUTED")


def initialize_distributed(force: bool | None = None) -> None:
  """Calls jax.distributed.initialize() when the environment describes a multi-process job.

  Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (optionally JAX_LOCAL_DEVICE_IDS).
  SLURM (srun, one task per GPU), Open MPI and TPU pods are auto-detected by jax's cluster plugins.
  TINYMIM_DISTRIBUTED=1 forces the call (e.g. on a TPU pod whose workers lack the variables above).
  Must run before anything touches a device. A single SLURM task (e.g. an interactive allocation) stays
  single-process.
  """
  env = os.environ
  if force is None:
    force = any(k in env for k in _CLUSTER_ENV)
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) <= 1:
      force = "JAX_COORDINATOR_ADDRESS" in env
  if not force:
    return
  kwargs: dict[str, Any] = {}
  if "JAX_COORDINATOR_ADDRESS" in env:
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    if "JAX_LOCAL_DEVICE_IDS" in env:
      kwargs["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(fsdp: int = 1, data: int = -1, devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices (or `devices`); data=-1 takes what fsdp leaves."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"config mesh.fsdp={fsdp} must divide the device count {n}")
  data = n // fsdp if data == -1 else data
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} != {n} devices")
  # Auto axes: XLA's sharding propagation places the intermediates (jax 0.10 defaults to Explicit).
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, fsdp: int) -> P:
  """Shards the largest dimension that the fsdp size divides; replicates small or indivisible arrays."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < 2**14:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def spec_for(name: str, shape, mesh: Mesh, rules=DEFAULT_RULES) -> P:
  fsdp = mesh.shape["fsdp"]
  for pattern, how in rules:
    if re.fullmatch(pattern, name):
      if how == "fsdp":
        return _fsdp_spec(shape, fsdp)
      if how == "replicate":
        return P()
      return how if isinstance(how, P) else P(*how)
  return P()


def tree_sharding(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs), by rule over '/'-joined names.

  `tree` is a train state ({'params', 'consts', 'opt', 'teachers', ...}) or a bare params tree. Rules see a
  param's own name ('blocks/3/attn/qkv/kernel'): the state's prefixes are stripped, and so are the optimizer's
  (Adam moments are copies of the params under longer paths ending in the param's name), by cutting each name
  at its first component that is a top-level param / const name of the tree's models.
  """
  parts = ([tree[k] for k in ("params", "consts") if k in tree] + list(tree.get("teachers", {}).values())
           if isinstance(tree, dict) else []) or [tree]
  roots = sorted({k for p in parts if isinstance(p, dict) for k in p})
  root = re.compile(rf"(?:^|/)((?:{'|'.join(map(re.escape, roots))})(?:/.*)?)$") if roots else None

  def one(path, x):
    shape = getattr(x, "shape", ())
    if not shape:
      return NamedSharding(mesh, P())
    name = optim.path_name(path)
    m = root.search(name) if root else None
    return NamedSharding(mesh, spec_for(m.group(1) if m else name, shape, mesh, rules))
  return jax.tree_util.tree_map_with_path(one, tree)


# -----------------------------------------------------------------------------------------------------
# Agreement across processes (collectives: every process must call them; free in a single-process run).
# -----------------------------------------------------------------------------------------------------
def allgather(x: np.ndarray) -> np.ndarray:
  """(processes, *x.shape): every process's `x`, stacked in process order; x[None] in a single-process run."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x)).reshape((jax.process_count(),) + x.shape)


def all_processes(flag: bool) -> bool:
  """Whether `flag` holds on every process."""
  return bool(allgather(np.asarray(flag)).all())


def any_process(*flags: bool) -> tuple[bool, ...]:
  """Each flag, True where it holds on any process."""
  return tuple(bool(f) for f in allgather(np.asarray(flags, bool)).any(0))


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
