"""Linear probe on a frozen encoder: MAE's protocol (He et al. 2022, main_linprobe.py, after MoCo v3).

The probe is BatchNorm without affine (eps 1e-6, torch's momentum 0.1) followed by a Linear layer (weights
~ N(0, 0.01^2), zero bias), trained with cross-entropy and LARS; only the probe trains, the encoder runs in
eval mode under stop_gradient and is never in the optimizer. Recipe (config.linprobe): base lr 0.1 x batch /
256, weight decay 0, 90 epochs with 10 of linear warmup then cosine, batch 16384, RandomResizedCrop + flip
for train and resize + center crop for eval. Without train augmentation the features never change, so they
are computed once (`CacheIterator`) and the probe trains on them in seconds.

A probe train state is a dict like the trainer's (train_steps):
  step     int32 scalar
  params   {'head': {'kernel' (D, C), 'bias' (C,)}}
  consts   {'bn': {'mean' (D,), 'var' (D,)}}: BatchNorm's running statistics (used at eval)
  opt      the LARS state
  encoder  (images only) the frozen ViT's state; like a teacher, never checkpointed
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tinymim_jax import features as feat_lib
from tinymim_jax import periodic
from tinymim_jax import train_steps as ts

BN_EPS = 1e-6
BN_MOMENTUM = 0.1  # torch's: running = (1 - m) * running + m * batch (unbiased variance)


# --------------------------------------------------------------------------------------------------------
# LARS.
# --------------------------------------------------------------------------------------------------------
def _matrices(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def lars(learning_rate, *, momentum: float = 0.9, trust_coefficient: float = 0.001,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  """MAE's / MoCo v3's LARS (mae/util/lars.py) from optax's parts.

  Per param p with gradient g, for p.ndim > 1 only: g += wd * p, then g *= trust_coefficient * |p| / |g|
  (1 when either norm is 0); every param: mu = momentum * mu + g, p -= lr_t * mu. 1-D params (biases) get
  neither decay nor trust ratio.

  Not optax.lars as is: that scales by the learning rate *before* its momentum trace (mu accumulates
  lr_s * g_s) and applies decay and trust ratio to every param by default. The two agree only for a constant
  learning rate; with MAE's warmup + cosine the buffer must be scaled by the current lr, as here.
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=_matrices),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), _matrices),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(learning_rate),
  )


# --------------------------------------------------------------------------------------------------------
# The probe.
# --------------------------------------------------------------------------------------------------------
def init_probe(dim: int, num_classes: int, seed: int = 0) -> tuple[dict, dict]:
  """-> (params, consts) of a fresh probe for (B, dim) features."""
  # MAE: trunc_normal_(std=0.01) with timm's absolute bounds +-2, i.e. in effect a plain normal(0, 0.01).
  kernel = 0.01 * jax.random.normal(jax.random.PRNGKey(seed), (dim, num_classes), jnp.float32)
  params = {"head": {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}}
  consts = {"bn": {"mean": jnp.zeros((dim,), jnp.float32), "var": jnp.ones((dim,), jnp.float32)}}
  return params, consts


def apply_probe(params, consts, x, *, train: bool):
  """(B, D) features -> ((B, C) float32 logits, updated consts). train: batch statistics (and running-stat
  update, as torch's BatchNorm1d in train mode); else the running statistics."""
  x = x.astype(jnp.float32)
  bn = consts["bn"]
  if train:
    mean, var = x.mean(axis=0), x.var(axis=0)
    n = x.shape[0]
    unbiased = var * n / max(n - 1, 1)
    bn = {"mean": (1 - BN_MOMENTUM) * bn["mean"] + BN_MOMENTUM * mean,
          "var": (1 - BN_MOMENTUM) * bn["var"] + BN_MOMENTUM * unbiased}
  else:
    mean, var = bn["mean"], bn["var"]
  h = (x - mean) * jax.lax.rsqrt(var + BN_EPS)
  logits = jnp.dot(h, params["head"]["kernel"], precision=jax.lax.Precision.HIGHEST) + params["head"]["bias"]
  return logits, {**consts, "bn": bn}


def init_state(encoder: nnx.Module | None, tx, *, dim: int, num_classes: int, seed: int = 0):
  """-> (encoder graphdef or None, probe train state); the encoder's state rides in it, frozen."""
  params, consts = init_probe(dim, num_classes, seed)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "consts": consts, "opt": tx.init(params)}
  graphdef = None
  if encoder is not None:
    graphdef, enc_state = nnx.split(encoder)
    state["encoder"] = nnx.to_pure_dict(enc_state)
  return graphdef, state


def encode(encoder_graphdef, encoder_state, images, spec: feat_lib.FeatureSpec):
  """Features of a frozen encoder (eval mode, no gradient)."""
  vit = nnx.merge(encoder_graphdef, encoder_state)
  return jax.lax.stop_gradient(feat_lib.extract(vit, images, spec)["feature"])


def topk_correct(logits, labels, k: int):
  """(B,) float32: 1 where the label is among the k largest logits."""
  top = jax.lax.top_k(logits, k)[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def make_step(encoder_graphdef, tx, schedule, spec: feat_lib.FeatureSpec | None = None) -> Callable:
  """step(state, batch, rng) -> (state, metrics). batch: {'feature' (B, D), 'label'} (cached features) or
  {'image', 'label'} (the encoder in state['encoder'] computes the features)."""

  def step(state, batch, rng):
    del rng  # nothing random in a probe step
    if "feature" in batch:
      x = batch["feature"]
    else:
      x = encode(encoder_graphdef, state["encoder"], batch["image"], spec)
    labels = batch["label"]

    def loss_fn(params):
      logits, consts = apply_probe(params, state["consts"], x, train=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (consts, topk_correct(logits, labels, 1).mean())

    (loss, (consts, top1)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new, metrics = ts.apply_guarded_update(state, grads, loss, {"train_top1": top1}, tx, schedule)  # the trainer's NaN guard
    ok = metrics["nonfinite"] == 0
    new["consts"] = jax.tree.map(lambda a, b: jnp.where(ok, a, b), consts, state["consts"])
    return new, metrics

  return step


def make_predict_fn(encoder_graphdef, spec: feat_lib.FeatureSpec) -> Callable:
  """(state, images) -> {'feature', 'logits'}: the encoder's features and the probe's logits (eval mode)."""

  def predict(state, images):
    x = encode(encoder_graphdef, state["encoder"], images, spec)
    return {"feature": x, "logits": apply_probe(state["params"], state["consts"], x, train=False)[0]}

  return predict


# --------------------------------------------------------------------------------------------------------
# Cached features.
# --------------------------------------------------------------------------------------------------------
class CacheIterator:
  """Infinite iterator of training batches drawn from arrays held in memory (cached features).

  Epoch e is a permutation of the rows fixed by (seed, e); each epoch is `steps_per_epoch` global batches
  (default: rows // global_batch_size; the rows left over are dropped per epoch), of which this process
  yields its contiguous share. Starting at `start_step` gives the batches an uninterrupted run sees from
  there, so a resumed probe trains exactly as one that was not interrupted.
  """

  def __init__(self, arrays: dict[str, np.ndarray], *, global_batch_size: int, seed: int, start_step: int = 0,
               steps_per_epoch: int | None = None, process_index: int | None = None,
               process_count: int | None = None):
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self.num_rows = len(next(iter(self.arrays.values())))
    if any(len(v) != self.num_rows for v in self.arrays.values()):
      raise ValueError(f"cached arrays differ in length: { {k: v.shape for k, v in self.arrays.items()} }")
    if global_batch_size > self.num_rows:
      raise ValueError(f"batch size {global_batch_size} is larger than the {self.num_rows} cached examples")
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    self.local = global_batch_size // pc
    self.offset = pi * self.local
    self.batch = global_batch_size
    # Every process holds every row: one share of all of them.
    self.steps_per_epoch = steps_per_epoch or periodic.steps_per_epoch(self.num_rows, global_batch_size,
                                                                       name="the cached features")
    self.seed, self.step, self.skipped = seed, start_step, 0
    self._epoch, self._perm = None, None

  def __iter__(self):
    return self

  def __next__(self):
    epoch, pos = divmod(self.step, self.steps_per_epoch)
    if epoch != self._epoch:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
      self._epoch, self._perm = epoch, np.resize(perm, self.steps_per_epoch * self.batch)
    rows = self._perm[pos * self.batch + self.offset:pos * self.batch + self.offset + self.local]
    self.step += 1
    return {k: v[rows] for k, v in self.arrays.items()}


def fit_on_cache(train_feats, train_labels, *, num_classes: int, batch_size: int, epochs: float,
                 warmup_epochs: float, base_lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001, lr_scaling_batch: int = 256, min_lr: float = 0.0,
                 seed: int = 0) -> tuple[dict, dict]:
  """Trains a probe on cached features (one device; every process computes the same) -> (params, consts).

  The same step, schedule and batch order as the `linprobe` objective without augmentation.
  """
  from tinymim_jax import optim
  batch_size = min(batch_size, len(train_labels))
  it = CacheIterator({"feature": train_feats, "label": np.asarray(train_labels, np.int32)},
                     global_batch_size=batch_size, seed=seed, process_index=0, process_count=1)
  total = max(int(epochs * it.steps_per_epoch), 1)
  schedule = optim.lr_schedule(base_lr=base_lr, global_batch_size=batch_size, total_steps=total,
                               warmup_steps=int(warmup_epochs * it.steps_per_epoch), min_lr=min_lr,
                               lr_scaling_batch=lr_scaling_batch)
  tx = lars(schedule, momentum=momentum, trust_coefficient=trust_coefficient, weight_decay=weight_decay)
  _, state = init_state(None, tx, dim=train_feats.shape[1], num_classes=num_classes, seed=seed)
  step = jax.jit(make_step(None, tx, schedule))
  nonfinite = 0
  for _ in range(total):
    state, metrics = step(state, next(it), None)
    nonfinite += metrics["nonfinite"]  # on device: no sync per step
  if int(nonfinite):
    raise FloatingPointError(f"the linear probe's loss became NaN/Inf in {int(nonfinite)} of {total} steps (those "
                             f"updates were skipped): lower linprobe.base_lr ({base_lr})")
  return state["params"], state["consts"]


def predict_on_cache(params, consts, feats, batch: int = 8192) -> np.ndarray:
  """(n, C) float32 logits of a probe on cached features."""
  if not len(feats):
    return np.zeros((0, params["head"]["bias"].shape[0]), np.float32)
  fn = jax.jit(lambda x: apply_probe(params, consts, x, train=False)[0])
  return np.concatenate([np.asarray(fn(feats[i:i + batch])) for i in range(0, len(feats), batch)])


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Top-k accuracy in [0, 1] from numpy logits."""
  k = min(k, logits.shape[1])
  top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1))) if len(labels) else 0.0
