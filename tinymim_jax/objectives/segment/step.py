"""The segment train step, a pure function of a state of nested dicts (jit at the call
site, e.g. with tinymim_jax.sharding: state by rule, batch over ('data', 'fsdp'))."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tinymim_jax.objectives.segment.losses import segment_loss
from tinymim_jax.objectives.segment.metrics import intersect_and_union


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
  """-> (graphdef, state). state = {'step' int32, 'params', 'batch_stats' (BatchNorm running statistics),
  'consts' (the rest: a fixed sin-cos table), 'opt'}, nested dicts of arrays."""
  graphdef, params, stats, consts = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  params = nnx.to_pure_dict(params)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": nnx.to_pure_dict(stats),
           "consts": nnx.to_pure_dict(consts), "opt": tx.init(params)}
  return graphdef, state


def merge(graphdef, state, params=None) -> nnx.Module:
  """The Segmenter of a state (with `params` in place of the state's, for a gradient)."""
  return nnx.merge(graphdef, state["params"] if params is None else params, state["batch_stats"], state["consts"])


def make_train_step(graphdef, tx, schedule, *, aux_weight: float = 0.4, ignore_index: int = 255,
                    avg_non_ignore: bool = False) -> Callable:
  """(state, batch, rng) -> (state, metrics): one AdamW step on segment_loss in train mode.

  batch: {'image' (B, H, W, 3) float, 'label' (B, H, W) int, optional 'valid' (B,) bool}; rng: a key, folded
  with the step (drop path, dropout). BatchNorm uses the global batch's statistics (SyncBN) and its running
  statistics move with the step. A non-finite loss or gradient leaves the state unchanged (metrics
  'nonfinite' = 1). Metrics: loss, loss_decode, loss_aux, grad_norm, lr (of this step), nonfinite,
  train_pixel_acc (decode head, non-ignored pixels).
  """

  def step(state, batch, rng):
    rng = jax.random.fold_in(rng, state["step"])
    images, labels, valid = batch["image"], batch["label"], batch.get("valid")

    def loss_fn(params):
      model = merge(graphdef, state, params)
      out = model(images, train=True, rng=rng)
      loss, parts = segment_loss(out, labels, aux_weight=aux_weight, ignore_index=ignore_index,
                                 avg_non_ignore=avg_non_ignore, valid=valid)
      stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      return loss, (parts, stats, out["logits"])

    (loss, (parts, stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt, _):
      updates, opt = tx.update(grads, opt, params)
      return optax.apply_updates(params, updates), opt, stats

    params, opt, stats = jax.lax.cond(ok, update, lambda p, o, s: (p, o, s), state["params"], state["opt"],
                                      state["batch_stats"])
    # A cheap training accuracy: the 1/4-resolution argmax, nearest-upsampled to the labels.
    pred = jax.image.resize(jnp.argmax(logits, axis=-1).astype(jnp.float32), labels.shape, "nearest")
    areas = intersect_and_union(pred.astype(jnp.int32), labels, logits.shape[-1], ignore_index=ignore_index,
                                valid=valid)
    new = {**state, "params": params, "opt": opt, "batch_stats": stats,
           "step": state["step"] + ok.astype(state["step"].dtype)}
    metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "nonfinite": (~ok).astype(jnp.int32),
               "train_pixel_acc": areas[0].sum() / jnp.maximum(areas[3].sum(), 1)}
    return new, metrics

  return step
