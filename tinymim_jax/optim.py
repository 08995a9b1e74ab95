"""AdamW with MAE's schedule, decay mask, frozen params and layer-wise lr decay.

Params are nested dicts; a param's name is its path joined with '/', e.g.
'blocks/3/attn/qkv/kernel' (block indices 0-based). Rules are short lists of
regexes matched with re.fullmatch against names (big_vision style).

The update mirrors torch.optim.AdamW in the reference (MAE param groups):
  param -= lr_scale * lr * (adam_update + wd * param)
with wd only on params of ndim > 1 not listed in `no_decay`, and lr_scale from
layer-wise decay. Frozen params get a zero update and hold no optimizer state.
"""
import logging
import math
import re

import jax
import jax.numpy as jnp
import optax


def path_name(path):
  """A pytree key path as a '/'-joined name, e.g. 'blocks/3/attn/qkv/kernel' (used by every rule)."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey.
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def param_names(params):
  """Same pytree as params with each leaf replaced by its '/'-joined name."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_name(p), params)


def match(patterns, name):
  """True iff `name` fully matches any regex in `patterns`."""
  if isinstance(patterns, str):  # A lone string would iterate characters.
    patterns = (patterns,)
  return any(re.fullmatch(p, name) for p in patterns)


def peak_lr(*, base_lr, global_batch_size, lr_scaling_batch=256):
  """Linear scaling rule: base_lr * global_batch_size / lr_scaling_batch."""
  if lr_scaling_batch is None:
    return base_lr
  return base_lr * global_batch_size / lr_scaling_batch


def lr_schedule(*, base_lr, global_batch_size, total_steps, warmup_steps,
                min_lr=0.0, lr_scaling_batch=256):
  """MAE's adjust_learning_rate, evaluated per optimizer step.

  Linear warmup from 0 to the peak over warmup_steps, then half-cycle cosine
  from the peak to min_lr at total_steps (held at min_lr past it).
  """
  peak = peak_lr(base_lr=base_lr, global_batch_size=global_batch_size,
                 lr_scaling_batch=lr_scaling_batch)
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps, 1)
    # 0.5 * (1 + cos(pi * t)) written as sin^2(pi * (1 - t) / 2) with the
    # steps left (exact): float32 1 + cos(~pi) cancels near the end.
    left = jnp.clip((total_steps - step) / decay_steps, 0.0, 1.0)
    cos = min_lr + (peak - min_lr) * jnp.square(jnp.sin(0.5 * jnp.pi * left))
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


def layer_id(name, depth):
  """MAE's get_layer_id_for_vit on '/'-joined names (0-based block index)."""
  if name in ("cls_token", "pos_embed", "dist_token"):
    return 0
  if name.startswith("patch_embed/"):
    return 0
  if name.startswith("blocks/"):
    return int(name.split("/")[1]) + 1
  return depth + 1


def _lr_scale(name, layer_decay, depth, layer_id_fn=layer_id):
  if layer_decay is None:
    return 1.0
  return layer_decay ** (depth + 1 - layer_id_fn(name, depth))


def _is_decayed(name, ndim, no_decay, frozen):
  return ndim > 1 and not match(no_decay, name) and not match(frozen, name)


def _map_named(fn, tree):
  """tree_map of fn(name, leaf); optax.MaskedNode subtrees are kept as is."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: fn(path_name(p), x), tree)


def _scale_by_name(scale_fn):
  """Multiplies each update by the Python float scale_fn(name)."""

  def update_fn(updates, state, params=None):
    del params
    return _map_named(lambda n, u: u * scale_fn(n), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def _check_rules(params, no_decay, frozen, layer_decay, depth):
  """Warns about patterns matching nothing (typos); returns the depth."""
  names = jax.tree.leaves(param_names(params))
  for kind, patterns in (("no_decay", no_decay), ("frozen", frozen)):
    patterns = (patterns,) if isinstance(patterns, str) else patterns
    for p in patterns:
      if not any(re.fullmatch(p, n) for n in names):
        logging.warning("optim: %s pattern %r matches no parameter.", kind, p)
  if layer_decay is not None and depth is None:
    if not isinstance(params, dict) or "blocks" not in params:
      raise ValueError("layer_decay needs `depth` (no 'blocks' in params).")
    depth = len(params["blocks"])
  return depth


def make_optimizer(params, *, schedule, b1=0.9, b2=0.95, eps=1e-8,
                   weight_decay=0.05, no_decay=(), frozen=(), layer_decay=None,
                   depth=None, grad_clip_norm=None, grad_accum_steps=1, layer_id_fn=layer_id):
  """AdamW (torch semantics) with decay mask, frozen params and layer decay.

  Args:
    params: the param pytree (arrays or ShapeDtypeStructs); only used to check
      the rules and, with layer_decay and no depth, to count blocks.
    schedule: optax schedule of the optimizer step (see lr_schedule).
    b1, b2, eps: Adam hyper-parameters (eps added to sqrt(v_hat), as torch).
    weight_decay: decoupled, scaled by the (layer-scaled) lr as torch AdamW.
    no_decay: regexes of params not decayed (on top of all params of ndim<=1).
    frozen: regexes of params with zero update and no optimizer state.
    layer_decay: MAE layer-wise lr decay; scale ld ** (depth+1 - layer_id).
    depth: number of blocks, for layer_decay.
    layer_id_fn: (name, depth) -> layer id 0..depth+1 for layer_decay (default: MAE's get_layer_id_for_vit on
      a bare ViT's names; a model around a ViT passes its own, e.g. segment.layer_id).
    grad_clip_norm: optional global-norm clipping of the (accumulated) grads of
      the trainable params, before Adam.
    grad_accum_steps: > 1 accumulates (averages) that many micro-step grads
      per optimizer step (optax.MultiSteps); the schedule counts optimizer
      steps.

  Returns:
    An optax.GradientTransformation; update() needs params (weight decay).
  """
  depth = _check_rules(params, no_decay, frozen, layer_decay, depth)

  # Each callable gets the (possibly masked) updates tree: names from paths.
  def decay_mask(tree):
    return _map_named(
        lambda n, x: _is_decayed(n, x.ndim, no_decay, frozen), tree)

  tx = optax.chain(
      optax.clip_by_global_norm(grad_clip_norm)
      if grad_clip_norm is not None else optax.identity(),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      # After the wd term: MAE's lr_scale multiplies the group lr, which torch
      # AdamW applies to both the Adam step and the decay.
      _scale_by_name(lambda n: _lr_scale(n, layer_decay, depth, layer_id_fn)),
      optax.scale_by_learning_rate(schedule),
  )
  if grad_accum_steps > 1:
    # Inside the partition so frozen params hold no accumulator either.
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps)
    tx = tx.gradient_transformation()

  def labels(tree):
    return _map_named(
        lambda n, _: "frozen" if match(frozen, n) else "train", tree)

  # partition masks the frozen leaves away from `tx` (optax.MaskedNode), so no
  # Adam moments or accumulators are allocated for them.
  return optax.partition(
      {"train": tx, "frozen": optax.set_to_zero()}, labels)


def describe(params, *, no_decay=(), frozen=(), layer_decay=None, depth=None, layer_id_fn=layer_id):
  """Short table of the rules applied to params, for logging (the rules as make_optimizer takes them)."""
  depth = _check_rules(params, no_decay, frozen, layer_decay, depth)
  rows = {"decayed": [0, 0], "not decayed": [0, 0], "frozen": [0, 0]}
  per_layer = {}
  for name, x in zip(jax.tree.leaves(param_names(params)),
                     jax.tree.leaves(params)):
    size = math.prod(x.shape)
    if match(frozen, name):
      kind = "frozen"
    elif _is_decayed(name, len(x.shape), no_decay, frozen):
      kind = "decayed"
    else:
      kind = "not decayed"
    rows[kind][0] += 1
    rows[kind][1] += size
    if layer_decay is not None and kind != "frozen":
      lid = layer_id_fn(name, depth)
      per_layer[lid] = per_layer.get(lid, 0) + size
  lines = [f"{'group':<12} {'arrays':>7} {'params':>13}"]
  for kind, (n, size) in rows.items():
    lines.append(f"{kind:<12} {n:>7} {size:>13,}")
  if layer_decay is not None:
    lines.append(f"layer decay {layer_decay} (depth {depth}):")
    lines.append(f"{'layer_id':>8} {'lr_scale':>10} {'params':>13}")
    for lid in sorted(per_layer):
      scale = layer_decay ** (depth + 1 - lid)
      lines.append(f"{lid:>8} {scale:>10.4g} {per_layer[lid]:>13,}")
  return "\n".join(lines)


def ema_update(ema_params, params, decay: float):
  """One step of an exponential moving average of the weights: decay * ema + (1 - decay) * params, leaf by leaf.

  timm ModelEmaV2 / DeiT's ModelEma (timm/utils/model_ema.py): applied after every optimizer update, with a
  constant decay (DeiT: --model-ema-decay 0.99996) and no warmup, starting from the weights training starts
  from (the EMA is a copy of the model made before the first step). timm averages every state_dict entry; a
  ViT's only non-parameter entries are fixed tables, so the params are the whole average here. Trees of equal
  structure; returns the new EMA tree in ema_params' dtypes (optax.incremental_update).
  """
  return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
