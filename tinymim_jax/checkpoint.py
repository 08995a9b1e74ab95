"""Checkpoints: Orbax CheckpointManager (async), keep-last-K plus keep-every-M, restore onto any mesh.

A checkpoint at step s holds three items:
  model  {'params', 'consts'}: the trained model (never the teacher)
  opt    the optimizer state
  meta   JSON: the resolved config, the step (the data position is derived from it), the seed, the
         teacher's source and weight hash
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a crash or a
SIGKILL mid-save never replaces a good checkpoint with a half-written one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CKPT_DIR = "checkpoints"


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, keep_every: int | None = None, async_save: bool = True,
               read_only: bool = False):
    """read_only: restore only; nothing is created, cleaned up or saved under `workdir`."""
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None, save_interval_steps=0,
                                             enable_async_checkpointing=False, cleanup_tmp_directories=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every, create=True,
                                             enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True)
    self.directory = os.path.join(os.path.abspath(workdir), CKPT_DIR)
    self.mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("model", "opt", "meta"))

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, state: dict, meta: dict) -> None:
    """Starts an async save of `state` (a train state without the teacher) at `step`."""
    self.mngr.save(int(step), force=True, args=ocp.args.Composite(
        model=ocp.args.StandardSave({"params": state["params"], "consts": state["consts"]}),
        opt=ocp.args.StandardSave(state["opt"]),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, abstract_state: dict) -> tuple[dict, dict]:
    """The latest checkpoint onto the shardings of `abstract_state` (ShapeDtypeStructs), whatever mesh saved
    it: -> (state, meta)."""
    step = self.latest_step()
    abstract_model = {"params": abstract_state["params"], "consts": abstract_state["consts"]}
    r = self.mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract_model), opt=ocp.args.StandardRestore(abstract_state["opt"]),
        meta=ocp.args.JsonRestore()))
    state = {**r.model, "opt": r.opt, "step": jax.numpy.asarray(step, jax.numpy.int32)}
    return state, r.meta

  def restore_model_item(self, abstract_model: dict) -> dict:
    """Only the latest checkpoint's 'model' item ({'params', 'consts'}) onto `abstract_model`'s shardings."""
    return self.mngr.restore(self.latest_step(), args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract_model))).model

  def restore_meta(self) -> dict:
    return self.mngr.restore(self.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()


def abstract(tree: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs of `tree` (optionally carrying shardings), for restoring without allocating."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
