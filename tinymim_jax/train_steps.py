"""Pure, jit-able train steps: `step(state, batch, rng) -> (state, metrics)`.

The model is split once at the jit boundary into a static graphdef and pure dicts of arrays; the step
merges them back inside the trace. A train state is a plain dict:

  step     int32 scalar
  params   trainable student params (nested dict; `distill_proj` sits beside them when a target needs it)
  consts   the student's non-trainable state (the fixed sin-cos table)
  opt      the optax state
  teacher  (distillation only) the frozen teacher's full state. It rides in the state so that it is sharded
           by the same rules and donated/aliased without copies; it is never differentiated, never in the
           optimizer and never checkpointed (see `checkpointable`).

A step whose loss or gradient is not finite returns the state it was given, unchanged, with
metrics['nonfinite'] = 1: the trainer stops on it and no NaN can reach a checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tinymim_jax import losses
from tinymim_jax.models import mae as mae_lib

PROJ = "distill_proj"  # extra trainable params of the feature / class-token targets


def split_model(model: nnx.Module):
  """-> (graphdef, params, consts) with params/consts as nested dicts of arrays."""
  graphdef, params, consts = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(consts)


def merge_model(graphdef, params, consts) -> nnx.Module:
  model_params = {k: v for k, v in params.items() if k != PROJ}
  return nnx.merge(graphdef, model_params, consts)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, *, teacher: nnx.Module | None = None,
               extra_params: dict | None = None):
  """-> (graphdef, teacher_graphdef or None, state)."""
  graphdef, params, consts = split_model(model)
  if extra_params:
    params = {**params, **extra_params}
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "consts": consts, "opt": tx.init(params)}
  teacher_graphdef = None
  if teacher is not None:
    teacher_graphdef, teacher_state = nnx.split(teacher)
    state["teacher"] = _teacher_in_compute_dtype(teacher, nnx.to_pure_dict(teacher_state))
  return graphdef, teacher_graphdef, state


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


def checkpointable(state: dict) -> dict:
  """What a checkpoint holds: everything but the frozen models (a teacher, a linear probe's encoder)."""
  return {k: v for k, v in state.items() if k not in ("teacher", "encoder")}


def _finish(state, grads, loss, aux, tx, schedule):
  """Optimizer update with a non-finite guard; returns (new_state, metrics)."""
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


def _step_rngs(rng, step, n):
  return jax.random.split(jax.random.fold_in(rng, step), n)


# --------------------------------------------------------------------------------------------------------
# Distillation.
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """What to distill. Blocks are 1-based; the teacher runs only to teacher_block, the student to student_block."""
  target: str = "relation"          # 'relation' | 'feature' | 'cls'
  teacher_block: int = 12
  student_block: int = 12
  w_qk: float = 1.0
  w_vv: float = 1.0
  feature_loss: str = "smooth_l1"   # 'smooth_l1' | 'mse' | 'cosine' (feature and cls targets)
  normalize_target: bool = False    # parameter-free LayerNorm on teacher features (feature target)
  student_mask_ratio: float = 0.0   # > 0: the student sees only a random subset of patches (ablation)

  def __post_init__(self):
    if self.target not in ("relation", "feature", "cls"):
      raise ValueError(f"distill.target must be 'relation', 'feature' or 'cls', got {self.target!r}")


def distill_frozen_patterns(spec: DistillSpec, params: dict) -> tuple[str, ...]:
  """Student params that take no part in the loss: never updated, never decayed (SPEC 2).

  With the relation target the student's relation block contributes only norm1 and qkv; everything after
  it (its attn.proj, norm2, mlp, later blocks, the final norm / head) receives no gradient. Returns only
  the patterns that name a param of `params`.
  """
  from tinymim_jax import optim
  depth = len(params["blocks"])
  if not 1 <= spec.student_block <= depth:
    raise ValueError(f"distill.student_block={spec.student_block} but the student has blocks 1..{depth}")
  b = spec.student_block - 1  # 0-based index of the target block
  later = [str(i) for i in range(spec.student_block, depth)]
  pats = [r"norm/.*", r"fc_norm/.*", r"head/.*"]
  if later:
    pats.append(rf"blocks/({'|'.join(later)})/.*")
  if spec.target == "relation":
    pats.append(rf"blocks/{b}/(attn/proj|norm2|mlp)/.*")
  names = jax.tree.leaves(optim.param_names(params))
  return tuple(p for p in pats if any(optim.match([p], n) for n in names))


def make_distill_step(graphdef, teacher_graphdef, tx, schedule, spec: DistillSpec) -> Callable:
  relation = spec.target == "relation"

  def teacher_forward(teacher_state, images):
    teacher = nnx.merge(teacher_graphdef, teacher_state)
    out = teacher(images, depth=spec.teacher_block, capture=(spec.teacher_block,), qkv_only=relation)
    return jax.lax.stop_gradient(out["blocks"][spec.teacher_block])

  def step(state, batch, rng):
    dp_rng, mask_rng = _step_rngs(rng, state["step"], 2)
    t = teacher_forward(state["teacher"], batch["teacher"])
    keep_ids = None
    if spec.student_mask_ratio > 0:
      b = batch["student"].shape[0]
      length = t["q"].shape[2] - 1
      keep_ids, _, _ = mae_lib.random_masking(mask_rng, b, length, spec.student_mask_ratio)
      # The teacher saw the whole image; compare on the CLS + the patches the student saw.
      rows = jnp.concatenate([jnp.zeros((b, 1), keep_ids.dtype), keep_ids + 1], axis=1)
      t = {k: (jnp.take_along_axis(v, rows[:, None, :, None], axis=2) if v.ndim == 4
               else jnp.take_along_axis(v, rows[:, :, None], axis=1)) for k, v in t.items()}

    def loss_fn(params):
      student = merge_model(graphdef, params, state["consts"])
      out = student(batch["student"], rng=dp_rng, depth=spec.student_block, capture=(spec.student_block,),
                    qkv_only=relation, keep_ids=keep_ids)
      s = out["blocks"][spec.student_block]
      if relation:
        return losses.relation_loss(t, s, w_qk=spec.w_qk, w_vv=spec.w_vv)
      hs, ht = s["hidden"], t["hidden"]
      if PROJ in params:
        hs = hs.astype(jnp.float32) @ params[PROJ]["kernel"] + params[PROJ]["bias"]
      if spec.target == "feature":
        loss = losses.feature_loss(hs, ht, kind=spec.feature_loss, normalize_target=spec.normalize_target)
      else:
        loss = losses.class_token_loss(hs[:, 0], ht[:, 0], kind=spec.feature_loss)
      return loss, {}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    return _finish(state, grads, loss, aux, tx, schedule)

  return step


def distill_projection(student_dim: int, teacher_dim: int, seed: int = 0) -> dict | None:
  """A Linear student->teacher width for the feature / class-token targets when widths differ."""
  if student_dim == teacher_dim:
    return None
  kernel = jax.nn.initializers.xavier_uniform()(jax.random.PRNGKey(seed), (student_dim, teacher_dim))
  return {PROJ: {"kernel": kernel, "bias": jnp.zeros((teacher_dim,))}}


# --------------------------------------------------------------------------------------------------------
# MAE pretraining.
# --------------------------------------------------------------------------------------------------------
def make_mae_step(graphdef, tx, schedule, *, mask_ratio: float = 0.75, norm_pix: bool = True) -> Callable:

  def step(state, batch, rng):
    (mask_rng,) = _step_rngs(rng, state["step"], 1)
    images = batch["image"]

    def loss_fn(params):
      model = merge_model(graphdef, params, state["consts"])
      out = model(images, rng=mask_rng, mask_ratio=mask_ratio)
      patch = model.encoder.config.patch_size
      return losses.mae_loss(out["pred"], images, out["mask"], patch, norm_pix=norm_pix), {}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    return _finish(state, grads, loss, aux, tx, schedule)

  return step


# --------------------------------------------------------------------------------------------------------
# Fine-tuning.
# --------------------------------------------------------------------------------------------------------
def make_finetune_step(graphdef, tx, schedule, *, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0,
                       switch_prob: float = 0.5, label_smoothing: float = 0.1) -> Callable:
  if mixup > 0 or cutmix > 0:
    from tinymim_jax.data import mixup_cutmix  # pure jnp; the data package imports TF only lazily

  def step(state, batch, rng):
    dp_rng, mix_rng = _step_rngs(rng, state["step"], 2)
    images, labels = batch["image"], batch["label"]
    if mixup > 0 or cutmix > 0:
      images, targets = mixup_cutmix(mix_rng, images, labels, num_classes=num_classes,
                                     mixup_alpha=mixup, cutmix_alpha=cutmix, switch_prob=switch_prob,
                                     label_smoothing=label_smoothing)
    else:
      targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)

    def loss_fn(params):
      model = merge_model(graphdef, params, state["consts"])
      logits = model(images, rng=dp_rng)["logits"]
      correct = losses.top1_correct(logits, labels)
      return losses.soft_cross_entropy(logits, targets), {"train_top1": correct.mean()}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    return _finish(state, grads, loss, aux, tx, schedule)

  return step


# --------------------------------------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------------------------------------
def make_predict_fn(graphdef, spec) -> Callable:
  """(state, images) -> {'feature': (B, D) float32 features as `spec` (a features.FeatureSpec) says, 'logits' if
  the model has a head}. The model runs in eval mode."""
  from tinymim_jax import features

  def predict(state, images):
    model = merge_model(graphdef, state["params"], state["consts"])
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
  from tinymim_jax import sharding as sh
  return jax.jit(step_fn, in_shardings=(state_sharding, sh.batch_sharding(mesh), sh.replicated(mesh)),
                 out_shardings=(state_sharding, sh.replicated(mesh)), donate_argnums=(0,))
