"""The authors' segmentation optimiser: AdamW with layer-wise lr decay as BEiT's LayerDecayOptimizerConstructor
counts layers, and mmcv's poly schedule with linear warmup (docs/method.md section 10)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tinymim_jax import optim as optim_lib


def layer_id(name: str, depth: int) -> int:
  """Layer id of a Segmenter param ('/'-joined name): BEiT's get_num_layer_for_vit with num_layers = depth + 2.

  backbone cls_token / pos_embed / patch_embed -> 0, backbone block i (0-based) -> i + 1, everything else
  (the rest of the backbone, adapter fpn1..fpn4, decode and auxiliary heads) -> depth + 1. That includes
  TinyMIM*-T's dist_token and conv1x1 (BEiT's get_num_layer_for_vit names only cls_token, mask_token and
  pos_embed), where MAE's fine-tuning rule (optim.layer_id) puts dist_token at 0.
  """
  if name == "backbone/dist_token":
    return depth + 1
  if name.startswith("backbone/"):
    return optim_lib.layer_id(name[len("backbone/"):], depth)
  return depth + 1


def lr_scales(params, layer_decay: float, depth: int):
  """The table: params' tree of lr multipliers layer_decay ** (depth + 1 - layer_id) (1.0 for the heads)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: layer_decay ** (depth + 1 - layer_id(optim_lib.path_name(p), depth)), params)


def warmup_poly_schedule(*, lr: float, total_steps: int, warmup_steps: int, warmup_ratio: float = 1e-6,
                         power: float = 1.0, min_lr: float = 0.0):
  """mmcv's PolyLrUpdaterHook with linear warmup, per iteration (by_epoch=False):

  poly(t) = (lr - min_lr) (1 - t / total_steps) ** power + min_lr, and during the first warmup_steps
  poly(t) x (1 - (1 - t / warmup_steps)(1 - warmup_ratio)) (the warmup scales the decayed lr, not the peak).
  Raises ValueError for total_steps < 1 or warmup_steps > total_steps.
  """
  if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"schedule needs 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}), "
                     f"total_steps >= 1")
  poly = optax.polynomial_schedule(init_value=lr, end_value=min_lr, power=power, transition_steps=total_steps)
  if not warmup_steps:
    return poly
  # ratio + (1 - ratio) t / W: mmcv's 1 - (1 - t / W)(1 - ratio) written without its float32 cancellation
  # near t = 0 (optax.linear_schedule's form loses ~1% of a 1e-6 ratio there).
  def schedule(step):
    frac = jnp.minimum(jnp.asarray(step, jnp.float32), warmup_steps) / warmup_steps
    return poly(step) * (warmup_ratio + (1.0 - warmup_ratio) * frac)

  return schedule


def make_optimizer(params, *, schedule, depth: int, layer_decay: float = 0.75, weight_decay: float = 0.05,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, no_decay=(), frozen=()):
  """AdamW (torch semantics, tinymim_jax.optim) with the Segmenter's layer decay table.

  Weight decay on every param of ndim > 1 (biases, norms, layer scales off), as the authors' constructor does:
  their no-decay name check misses pos_embed and cls_token (named 'backbone.pos_embed' there), so those are
  decayed too, and so is each block's relative position bias table. Defaults: the authors' ViT-B recipe.
  """
  return optim_lib.make_optimizer(params, schedule=schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                  no_decay=no_decay, frozen=frozen, layer_decay=layer_decay, depth=depth,
                                  layer_id_fn=layer_id)
