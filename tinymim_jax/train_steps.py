"""What every objective's train step shares, and the steps of MAE pretraining and fine-tuning: pure, jit-able
`step(state, batch, rng) -> (state, metrics)` (the distillation step: objectives/distill/step.py).

The model is split once at the jit boundary into a static `ModelDef` and pure dicts of arrays; the step
merges them back inside the trace. A train state is a plain dict:

  step     int32 scalar
  params   trainable params: the model's, and beside them (under their names) those of the extra layers a
           distillation target trains with it (e.g. the feature target's width projection, 'distill_proj')
  consts   the model's non-trainable state (the fixed sin-cos table)
  opt      the optax state
  frozen models (an objective's objectives.Setup.frozen: a distillation's 'teachers', a linear probe's
           'encoder'): they ride in the state so that they are sharded by the same rules and donated/aliased
           without copies; they are never differentiated, never in the optimizer and never checkpointed.

A step whose loss or gradient is not finite returns the state it was given, unchanged, with
metrics['nonfinite'] = 1: the trainer stops on it and no NaN can reach a checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tinymim_jax import features, losses
from tinymim_jax import sharding as sh


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """The static half of a split model: its nnx GraphDef, and those of the extra layers trained beside it."""
  model: Any
  extras: tuple[tuple[str, Any], ...] = ()


def split_model(model: nnx.Module, extras: Mapping[str, nnx.Module] | None = None):
  """-> (ModelDef, params, consts), params / consts nested dicts of arrays.

  `extras` ({name: module}) are layers trained beside the model (a distillation target's, see TARGETS): their
  params sit beside the model's under their names, so optimizer, sharding and checkpoint rules see one tree.
  """
  graphdef, params, consts = nnx.split(model, nnx.Param, ...)
  params, consts = nnx.to_pure_dict(params), nnx.to_pure_dict(consts)
  extra_defs = []
  for name, module in (extras or {}).items():
    if name in params:
      raise ValueError(f"extra layers {name!r} would replace the model's own {name!r} params")
    extra_def, params[name] = nnx.split(module, nnx.Param)
    params[name] = nnx.to_pure_dict(params[name])
    extra_defs.append((name, extra_def))
  return ModelDef(graphdef, tuple(extra_defs)), params, consts


def merge_model(modeldef: ModelDef, params, consts) -> nnx.Module:
  """The model (without its extra layers) from `split_model`'s pieces."""
  names = {name for name, _ in modeldef.extras}
  return nnx.merge(modeldef.model, {k: v for k, v in params.items() if k not in names}, consts)


def merge_extras(modeldef: ModelDef, params) -> dict[str, nnx.Module]:
  """The extra layers from `split_model`'s pieces: {name: module}."""
  return {name: nnx.merge(graphdef, params[name]) for name, graphdef in modeldef.extras}


def init_state(model: nnx.Module, tx: optax.GradientTransformation, *,
               teachers: Mapping[str, nnx.Module] | None = None, extras: Mapping[str, nnx.Module] | None = None):
  """-> (ModelDef, {teacher name: teacher graphdef}, state); `teachers` {name: frozen model} (distillation)."""
  modeldef, params, consts = split_model(model, extras)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "consts": consts, "opt": tx.init(params)}
  teacher_graphdefs = {}
  if teachers:
    state["teachers"] = {}
    for name, teacher in teachers.items():
      teacher_graphdefs[name], teacher_state = nnx.split(teacher)
      state["teachers"][name] = _teacher_in_compute_dtype(teacher, nnx.to_pure_dict(teacher_state))
  return modeldef, teacher_graphdefs, state


def _teacher_in_compute_dtype(teacher: nnx.Module, pure: dict) -> dict:
  """Stores the frozen teacher's Linear / Conv kernels and biases in those layers' compute dtype.

  Speed / memory (benchmarks/scaling.py): nnx.Linear / nnx.Conv cast kernel and bias to their `dtype` before
  every use, so a bfloat16 teacher computes exactly the same (bit for bit) from bfloat16-stored weights while
  holding half the bytes (ViT-L: 1.2 -> 0.6 GB per device) and skipping the per-step cast. LayerNorm scales,
  the CLS token and the positional table are used in float32 arithmetic and stay as they are.
  """
  for path, module in nnx.iter_graph(teacher):
    if not isinstance(module, (nnx.Linear, nnx.Conv)) or module.dtype is None:
      continue
    node = pure
    for key in path:
      node = node[key]
    for name in ("kernel", "bias"):
      if name in node and jnp.issubdtype(node[name].dtype, jnp.floating):
        node[name] = node[name].astype(module.dtype)
  return pure


def apply_guarded_update(state, grads, loss, aux, tx, schedule):
  """The optimizer update of every step, skipped when the loss or the gradient is not finite.

  state: the train state ('step', 'params', 'opt', ...); grads: like state['params']; loss: a float scalar;
  aux: the step's own metrics. -> (new state, metrics {'loss', 'grad_norm', 'lr', 'nonfinite' (int32 0 / 1),
  **aux}). A non-finite step returns `state` unchanged (params, optimizer state and step count) with
  nonfinite = 1, which the trainer stops on before anything is saved.
  """
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  # Speed: the guard is a lax.cond around the update rather than a select over every param and Adam
  # moment afterwards (which made XLA copy the donated optimizer state to keep its old values alive and
  # pass over params + moments once more). Same results: the update, or the state unchanged.
  def update(params, opt):
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  params, opt = jax.lax.cond(ok, update, lambda p, o: (p, o), state["params"], state["opt"])
  new = {**state, "params": params, "opt": opt, "step": state["step"] + ok.astype(state["step"].dtype)}
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
             "nonfinite": (~ok).astype(jnp.int32), **aux}
  return new, metrics


def step_rngs(rng, step, n):
  """`n` keys for train step `step` (an int32 scalar) from the run's key: every step draws fresh, reproducible
  randomness (drop path, masking, mixup) without carrying a key in the state."""
  return jax.random.split(jax.random.fold_in(rng, step), n)


# --------------------------------------------------------------------------------------------------------
# MAE pretraining.
# --------------------------------------------------------------------------------------------------------
def make_mae_step(modeldef, tx, schedule, *, mask_ratio: float = 0.75, norm_pix: bool = True) -> Callable:

  def step(state, batch, rng):
    (mask_rng,) = step_rngs(rng, state["step"], 1)
    images = batch["image"]

    def loss_fn(params):
      model = merge_model(modeldef, params, state["consts"])
      out = model(images, rng=mask_rng, mask_ratio=mask_ratio)
      patch = model.encoder.config.patch_size
      return losses.mae_loss(out["pred"], images, out["mask"], patch, norm_pix=norm_pix), {}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    return apply_guarded_update(state, grads, loss, aux, tx, schedule)

  return step


# --------------------------------------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------------------------------------
def make_predict_fn(modeldef, spec) -> Callable:
  """(state, images) -> {'feature': (B, D) float32 features as `spec` (a features.FeatureSpec) says, 'logits' if
  the model has a head}. The model runs in eval mode."""

  def predict(state, images):
    model = merge_model(modeldef, state["params"], state["consts"])
    return features.extract(features.vit_of(model), images, spec, logits=True)

  return predict


# --------------------------------------------------------------------------------------------------------
# Compilation over a mesh.
# --------------------------------------------------------------------------------------------------------
def trim_host_memory() -> None:
  """Hands the memory freed since start-up (model init, the XLA compiler's) back to the OS.

  glibc keeps freed blocks in its arenas, so without this the host's peak resident memory is the compiler's
  leftovers plus the step's working set (CPU, ViT-S from ViT-B at batch 8: 2.10 -> 1.91 GiB). A no-op where
  the C library has no malloc_trim.
  """
  import ctypes
  import ctypes.util
  try:
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def jit_step(step_fn: Callable, state_sharding: Any, mesh) -> Callable:
  """jax.jit with explicit shardings: state by rule (donated), batch over (data, fsdp), rng replicated."""
  return jax.jit(step_fn, in_shardings=(state_sharding, sh.batch_sharding(mesh), sh.replicated(mesh)),
                 out_shardings=(state_sharding, sh.replicated(mesh)), donate_argnums=(0,))
