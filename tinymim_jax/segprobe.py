"""A linear segmentation probe on the patch tokens of a frozen encoder: the dense frozen-feature eval
(config.eval.segprobe, run by the `eval` objective; evals.DENSE_EVALS).

The protocol is DINOv2's linear segmentation eval (dinov2/eval/segmentation: its BNHead, "just a batchnorm", and
its ADE20K linear config), as far as it carries over to a cached probe:
  - the frozen backbone runs in eval mode at the probe's crop (config.eval.segprobe.crop; the positional table
    resampled to the crop's grid as an init is, by the converter); its patch tokens at the eval's feature block
    (features.patch_tokens: config.eval.feature's block and LayerNorm) form a (h, w, D) map;
  - the head is BatchNorm (affine, eps 1e-5, torch's momentum 0.1, SyncBN: statistics of the whole batch)
    followed by a 1x1 conv to the classes (mmseg BaseDecodeHead.conv_seg: weights ~ N(0, 0.01^2), zero bias),
    no dropout (DINOv2: dropout_ratio=0);
  - the logits are upsampled bilinearly (align_corners=False) to the label's size, and the loss is mmseg 0.x's
    per-pixel cross-entropy with the ignore label (objectives/segment/losses.cross_entropy: summed over the
    labelled pixels, divided by all pixels);
  - AdamW lr 1e-3, weight decay 1e-4 on every param (mmcv's default constructor), betas (0.9, 0.999), 40k steps
    of batch 16, linear warmup over 1,500 steps from 1e-6 x lr then poly(1.0) to 0 (mmcv's PolyLrUpdaterHook:
    objectives/segment/optim.warmup_poly_schedule);
  - val: the test path (resize to fit segprobe.scale), sliding crop windows with overlap averaging, logits back
    to the annotation's size (objectives/segment/inference.slide_areas); mIoU / mAcc / aAcc over the whole
    val set as mmseg defines them (objectives/segment/metrics).
Differences, so the backbone runs once per train image: no augmentation (DINOv2 trains on mmseg's random
rescale, crop, flip and photometric distortion); each train image goes the test path (resized to fit
segprobe.scale, its label resized by nearest neighbour), cut into non-overlapping crop windows (the last one
moved back to the border; a smaller image padded with 0 and the ignore label), whose features are cached in
float32 (n windows x (crop / patch)^2 x D x 4 bytes: segprobe.max_train caps the train images); DINOv2's
linear head also concatenates the CLS token to every patch token, here the patch tokens alone (DINOv3's and
RADIO's probes). The backbone and the probe run on one device (the probe's arrays are small; every process
computes the same).

A probe is (params, consts):
  params  {'bn': {'scale' (D,), 'bias' (D,)}, 'conv': {'kernel' (D, C), 'bias' (C,)}}
  consts  {'bn': {'mean' (D,), 'var' (D,)}}: BatchNorm's running statistics (used at eval)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tinymim_jax import config_base, convert, features
from tinymim_jax.linprobe import CacheIterator
from tinymim_jax.models import vit as vit_lib
from tinymim_jax.models.segmentation import resize
from tinymim_jax.objectives.segment.inference import slide_areas, window_starts
from tinymim_jax.objectives.segment.losses import cross_entropy
from tinymim_jax.objectives.segment.metrics import area_metrics
from tinymim_jax.objectives.segment.optim import warmup_poly_schedule

BN_EPS = 1e-5       # torch BatchNorm2d / SyncBatchNorm
BN_MOMENTUM = 0.1   # torch's: running = (1 - m) * running + m * batch (unbiased variance)
INIT_STD = 0.01     # mmseg BaseDecodeHead.init_weights: normal_init(conv_seg, std=0.01)


# --------------------------------------------------------------------------------------------------------
# The probe.
# --------------------------------------------------------------------------------------------------------
def init_probe(dim: int, num_classes: int, seed: int = 0) -> tuple[dict, dict]:
  """-> (params, consts) of a fresh probe on (., ., dim) patch tokens for num_classes classes (float32)."""
  kernel = INIT_STD * jax.random.normal(jax.random.PRNGKey(seed), (dim, num_classes), jnp.float32)
  params = {"bn": {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)},
            "conv": {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}}
  consts = {"bn": {"mean": jnp.zeros((dim,), jnp.float32), "var": jnp.ones((dim,), jnp.float32)}}
  return params, consts


def apply_probe(params, consts, x, *, train: bool):
  """(B, h, w, D) patch tokens -> ((B, h, w, C) float32 logits at the token grid, updated consts).

  train: BatchNorm normalises with the batch's statistics over (B, h, w) (biased variance) and moves its running
  statistics (unbiased variance), as torch's BatchNorm2d in train mode; else the running statistics."""
  x = x.astype(jnp.float32)
  bn = consts["bn"]
  if train:
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    n = x.shape[0] * x.shape[1] * x.shape[2]
    bn = {"mean": (1 - BN_MOMENTUM) * bn["mean"] + BN_MOMENTUM * mean,
          "var": (1 - BN_MOMENTUM) * bn["var"] + BN_MOMENTUM * var * n / max(n - 1, 1)}
  else:
    mean, var = bn["mean"], bn["var"]
  h = (x - mean) * jax.lax.rsqrt(var + BN_EPS) * params["bn"]["scale"] + params["bn"]["bias"]
  logits = jnp.dot(h, params["conv"]["kernel"], precision=jax.lax.Precision.HIGHEST) + params["conv"]["bias"]
  return logits, {**consts, "bn": bn}


def probe_loss(params, consts, x, labels, *, ignore_index: int = 255):
  """-> (mean per-pixel cross-entropy, updated consts) of the probe in train mode on (B, h, w, D) tokens, its
  logits upsampled bilinearly (align_corners=False) to the (B, H, W) int labels' size; pixels labelled
  ignore_index count in the denominator only (mmseg 0.x's mean)."""
  logits, consts = apply_probe(params, consts, x, train=True)
  return cross_entropy(resize(logits, labels.shape[1:3]), labels, ignore_index=ignore_index), consts


def make_step(tx, *, ignore_index: int = 255) -> Callable:
  """step(state, batch) -> (state, loss): one optimizer step on {'feature' (B, h, w, D), 'label' (B, H, W)}.
  state: {'params', 'consts', 'opt'}."""

  def step(state, batch):
    (loss, consts), grads = jax.value_and_grad(
        lambda p: probe_loss(p, state["consts"], batch["feature"], batch["label"], ignore_index=ignore_index),
        has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "consts": consts, "opt": opt}, loss

  return step


def fit_on_cache(feats: np.ndarray, labels: np.ndarray, *, num_classes: int, steps: int, batch_size: int,
                 base_lr: float, weight_decay: float, warmup_steps: int, warmup_ratio: float = 1e-6,
                 power: float = 1.0, ignore_index: int = 255, seed: int = 0) -> tuple[dict, dict]:
  """Trains a probe on cached patch tokens (n, h, w, D) and labels (n, H, W) -> (params, consts).

  AdamW (optax.adamw: torch's decoupled decay, on every param) with warmup + poly (warmup_poly_schedule), batch
  min(batch_size, n) drawn by linprobe.CacheIterator (a new permutation each epoch). Raises FloatingPointError
  for a non-finite loss, naming config.eval.segprobe.base_lr.
  """
  batch_size = min(batch_size, len(feats))
  warmup_steps = min(warmup_steps, steps)
  it = CacheIterator({"feature": feats, "label": np.asarray(labels, np.int32)}, global_batch_size=batch_size,
                     seed=seed, process_index=0, process_count=1)
  schedule = warmup_poly_schedule(lr=base_lr, total_steps=steps, warmup_steps=warmup_steps,
                                  warmup_ratio=warmup_ratio, power=power)
  tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
  params, consts = init_probe(feats.shape[-1], num_classes, seed)
  state = {"params": params, "consts": consts, "opt": tx.init(params)}
  step = jax.jit(make_step(tx, ignore_index=ignore_index))
  loss = None
  for _ in range(steps):
    state, loss = step(state, next(it))
  if loss is not None and not np.isfinite(float(loss)):
    raise FloatingPointError(f"the segmentation probe's loss became {float(loss)}: lower "
                             f"config.eval.segprobe.base_lr ({base_lr})")
  return state["params"], state["consts"]


# --------------------------------------------------------------------------------------------------------
# The frozen backbone at the crop's resolution.
# --------------------------------------------------------------------------------------------------------
def at_resolution(vit: vit_lib.ViT, img_size: int) -> vit_lib.ViT:
  """The same frozen ViT reading img_size x img_size images: its weights through the converter, the positional
  table resampled to the new grid (MAE's bicubic, as an init is); `vit` itself when it already reads img_size.
  Raises convert.ConvertError where a table cannot be resampled (a relative position bias of another grid)."""
  if vit.config.img_size == img_size:
    return vit
  c = dataclasses.replace(vit.config, img_size=img_size, drop_path=0.0,
                          pos_embed="learn" if vit.config.pos_embed == "sincos" else vit.config.pos_embed)
  model = vit_lib.ViT(c, rngs=nnx.Rngs(0))
  report = convert.load_pytorch_weights(model, convert.export_pytorch_weights(vit))
  logging.info("segmentation probe: the frozen encoder at %d px:\n%s", img_size, report)
  return model


def _windows(image: np.ndarray, label: np.ndarray, crop: int, ignore_index: int):
  """Non-overlapping crop x crop windows covering (image (H, W, 3), label (H, W)), the last one of each axis moved
  back to the border; an image smaller than the crop padded with 0 / ignore_index (bottom, right)."""
  h, w = label.shape
  ph, pw = max(h, crop), max(w, crop)
  image = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)))
  label = np.pad(label, ((0, ph - h), (0, pw - w)), constant_values=ignore_index)
  for y in window_starts(ph, crop, crop):
    for x in window_starts(pw, crop, crop):
      yield image[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]


def _batched(items: Iterable, n: int):
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == n:
      yield batch
      batch = []
  if batch:
    yield batch


# --------------------------------------------------------------------------------------------------------
# The eval.
# --------------------------------------------------------------------------------------------------------
def evaluate(section, vit: vit_lib.ViT, spec: features.FeatureSpec, *, data_dir=None, seed: int = 0
             ) -> dict[str, float]:
  """The probe's metrics for a frozen ViT: train on section's train split, mIoU / mAcc / aAcc on its val split.

  section: config.eval.segprobe (the data source's fields as config.segment's: dataset, path, num_classes, ...;
  crop, stride, scale; max_train; the recipe: steps, batch_size, base_lr, weight_decay, warmup_steps,
  warmup_ratio, power; ignore_index). Returns {'eval/segprobe_miou', 'eval/segprobe_macc',
  'eval/segprobe_aacc'} (fractions in [0, 1]).
  """
  from tinymim_jax.data import segmentation as seg_data  # pylint: disable=g-import-not-at-top  (TensorFlow)
  s = section
  if s.crop % vit.config.patch_size:
    raise config_base.ConfigError(f"config.eval.segprobe.crop={s.crop} is not a multiple of the frozen model's "
                                  f"patch size {vit.config.patch_size}: set --config.eval.segprobe.crop="
                                  f"{max(s.crop // vit.config.patch_size, 1) * vit.config.patch_size}")
  train, num_classes = seg_data.make_source(s, "train", data_dir)
  val, _ = seg_data.make_source(s, "val", data_dir)
  # scene_parse150's decoded pairs, as the (images, labels) the examples' reader takes
  train, val = ((list(zip(*src)) if isinstance(src, list) else src) for src in (train, val))
  model = at_resolution(vit, s.crop)
  graphdef, state = nnx.split(model)
  tokens = jax.jit(lambda st, images: features.patch_tokens(nnx.merge(graphdef, st), images, spec))

  feats, labels = [], []
  examples = seg_data.eval_examples(train, scale=tuple(s.scale), resize_label=True)
  windows = (w for i, ex in zip(range(s.max_train), examples)
             for w in _windows(ex["image"], ex["label"], s.crop, s.ignore_index))
  for batch in _batched(windows, s.batch_size):
    feats.append(np.asarray(tokens(state, np.stack([b[0] for b in batch]))))
    labels.append(np.stack([b[1] for b in batch]))
  feats, labels = np.concatenate(feats), np.concatenate(labels)
  params, consts = fit_on_cache(feats, labels, num_classes=num_classes, steps=s.steps, batch_size=s.batch_size,
                                base_lr=s.base_lr, weight_decay=s.weight_decay, warmup_steps=s.warmup_steps,
                                warmup_ratio=s.warmup_ratio, power=s.power, ignore_index=s.ignore_index, seed=seed)
  del feats

  @jax.jit
  def window_logits(windows):  # the probe's logits resized to the window, as slide inference does
    tokens = features.patch_tokens(nnx.merge(graphdef, state), windows, spec)
    logits = apply_probe(params, consts, tokens, train=False)[0]
    return resize(logits.astype(jnp.float32), windows.shape[1:3])

  areas = np.zeros((4, num_classes), np.int64)
  for ex in seg_data.eval_examples(val, scale=tuple(s.scale)):  # one compiled forward for every image size
    areas += np.asarray(slide_areas(window_logits, ex["image"][None], ex["label"][None], crop=s.crop,
                                    stride=s.stride, num_classes=num_classes, chunk=s.batch_size,
                                    ignore_index=s.ignore_index), np.int64)
  m = area_metrics(areas)
  return {"eval/segprobe_miou": m["mIoU"], "eval/segprobe_macc": m["mAcc"], "eval/segprobe_aacc": m["aAcc"]}
