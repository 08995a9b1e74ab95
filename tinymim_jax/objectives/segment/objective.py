"""objective='segment': UperNet on a ViT fine-tuned for semantic segmentation (the paper's ADE20K protocol,
docs/method.md section 10; config.segment, configs/segment.py).

The run trains the Segmenter (models/segmentation.py) whose backbone is config.model at the crop's resolution
(`init`: a workdir or a .pth / .safetensors file, the pos table resampled to the crop's grid by the converter),
with AdamW, the authors' layer decay (optim.layer_id) and mmcv's warmup + poly schedule. The train state holds
the BatchNorm running statistics beside params ('batch_stats'). Evals: slide inference over the whole val set,
mIoU / mAcc / aAcc (eval/mIoU ..., in [0, 1]) and the per-class IoU / Acc written to
<workdir>/segment_classes.json. Export: the backbone with timm names (model.safetensors, as every run) and the
whole Segmenter as <workdir>/segmenter.safetensors (SEGMENTER_EXPORT: our nnx paths, Flax layouts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinymim_jax import builders, config_base, features, paths
from tinymim_jax import sharding as sh
from tinymim_jax import train_steps as ts
from tinymim_jax.models import segmentation as seg_lib
from tinymim_jax.models.segmentation import resize
from tinymim_jax.objectives import Objective, Setup, register
from tinymim_jax.objectives.segment import inference as seg_inference
from tinymim_jax.objectives.segment import metrics as metrics_lib
from tinymim_jax.objectives.segment import optim as seg_optim
from tinymim_jax.objectives.segment import step as seg_step

CLASSES_FILE = "segment_classes.json"     # per-class IoU / Acc of the latest eval
SEGMENTER_EXPORT = "segmenter.safetensors"  # the whole model: '<nnx path joined by .>' -> array, Flax layouts


@dataclasses.dataclass(frozen=True)
class SegmentDataInfo:
  """What the trainer reads of a segmentation dataset (data.dataset_info's fields)."""
  name: str
  num_classes: int
  num_train: int
  num_eval: int
  image_size: int


def _section(config):
  if "segment" not in config:
    raise config_base.ConfigError("objective 'segment' reads config.segment: start from configs/segment.py "
                                  "(python -m tinymim_jax.main --config configs/segment.py:digits ...)")
  return config.segment


def _sources(config):
  from tinymim_jax.data import segmentation as seg_data  # pylint: disable=g-import-not-at-top  (imports TF)
  s = _section(config)
  train, num_classes = seg_data.make_source(s, "train", config.data.data_dir)
  val, _ = seg_data.make_source(s, "val", config.data.data_dir)
  return train, val, num_classes


def segmenter_config(config, num_classes: int) -> seg_lib.SegmenterConfig:
  s = _section(config)
  return seg_lib.SegmenterConfig(num_classes=num_classes, out_indices=tuple(s.out_indices), channels=s.channels,
                                 pool_scales=tuple(s.pool_scales), aux_channels=s.aux_channels,
                                 dropout_ratio=s.dropout_ratio, adapter=s.get("adapter", "beit"))


class Segment(Objective):
  name = "segment"
  data_mode = None
  fixed = ("segment.dataset", "segment.num_classes", "segment.reduce_zero_label", "segment.crop",
           "segment.out_indices", "segment.channels", "segment.pool_scales", "segment.aux_channels")

  def resolve(self, config) -> None:
    # The backbone sees the crop: its pos table is made (or resampled on init) for the crop's grid.
    config.model.img_size = _section(config).crop

  def dataset_info(self, config):
    from tinymim_jax.data import segmentation as seg_data  # pylint: disable=g-import-not-at-top
    train, val, num_classes = _sources(config)
    return SegmentDataInfo(_section(config).dataset, num_classes, seg_data.source_size(train),
                           seg_data.source_size(val), _section(config).crop)

  def steps_per_epoch(self, config, info) -> int:
    if info.num_train < config.batch_size:
      raise ValueError(f"the segmentation train split has {info.num_train} examples, fewer than one batch "
                       f"(config.batch_size={config.batch_size})")
    return info.num_train // config.batch_size

  def check_data(self, config, info, where: str) -> None:
    if info.num_classes < 2:
      raise config_base.ConfigError(f"segmentation needs at least 2 classes; segment.dataset="
                                    f"{_section(config).dataset!r} has {info.num_classes}: set "
                                    f"--config.segment.num_classes")

  def build(self, config, *, num_classes: int | None = None, seed: int | None = None):
    backbone = builders.make_classifier(config, num_classes=0, seed=seed)
    seed = config.seed if seed is None else seed
    return seg_lib.Segmenter(backbone, segmenter_config(config, num_classes or 0), rngs=nnx.Rngs(seed + 1)), {}

  def setup(self, config, info, *, total_steps: int, warmup_steps: int, is_main: bool) -> Setup:
    s, o = _section(config), config.optim
    meta = {}
    backbone = builders.make_classifier(config, num_classes=0)
    if config.init:
      # A distilled / MAE encoder has no relative position bias or layer scale: they start as the authors'
      # (zero table, gamma 1.0); its final norm is dropped for the 'avg' layout's fresh fc_norm, and a
      # classifier's heads (head, and TinyMIM*-T's / DeiT's head_dist) have no place in a segmenter.
      report = builders.load_weights(
          backbone, config.init, skip=tuple(config.init_skip) + (r"head\..*", r"head_dist\..*"),
          ema=config.init_ema, prefix=config.init_prefix,
          allow_missing=(r"fc_norm\..*", r"blocks\.\d+\.attn\.relative_position_bias_table",
                         r"blocks\.\d+\.ls[12]\.gamma"), hint_context=builders.INIT_OPTIONS)
      logging.info("init from %s:\n%s", config.init, report)
      meta["init"] = paths.abspath(config.init)
    model = seg_lib.Segmenter(backbone, segmenter_config(config, info.num_classes), rngs=nnx.Rngs(config.seed + 1))
    depth = backbone.config.depth
    feature_spec = features.resolve(config.eval.feature, depth=depth, default_block=depth)
    schedule = seg_optim.warmup_poly_schedule(lr=o.base_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                                              warmup_ratio=s.warmup_ratio, power=s.power, min_lr=o.min_lr)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layer_decay = 1.0 if o.layer_decay is None else o.layer_decay
    tx = seg_optim.make_optimizer(params, schedule=schedule, depth=depth, layer_decay=layer_decay,
                                  weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                                  no_decay=tuple(o.no_decay), frozen=tuple(o.frozen))
    if is_main:
      logging.info("optimizer: AdamW lr %g (absolute, mmseg), layer decay %g over %d layers, warmup %d of %d steps",
                   o.base_lr, layer_decay, depth + 2, warmup_steps, total_steps)
    graphdef, state = seg_step.init_state(model, tx)
    step = seg_step.make_train_step(graphdef, tx, schedule, aux_weight=s.aux_weight,
                                    ignore_index=s.ignore_index)

    def predict(sub, images):  # the backbone's features (what a frozen-feature eval of the export reads)
      return features.extract(seg_step.merge(graphdef, sub).backbone, images, feature_spec)

    def export(state):
      host = jax.device_get({k: state[k] for k in ("params", "batch_stats", "consts")})
      return seg_step.merge(graphdef, host).backbone

    def train_iterator(evaluator, state, start_step, steps_per_epoch):
      del evaluator, state, steps_per_epoch
      from tinymim_jax.data import segmentation as seg_data  # pylint: disable=g-import-not-at-top
      train, _, _ = _sources(config)
      return seg_data.TrainIterator(train, s, global_batch_size=config.batch_size, seed=config.seed,
                                    start_step=start_step, process_index=jax.process_index(),
                                    process_count=jax.process_count())

    def make_evaluator(state_sharding, mesh, workdir):
      return SegmentEvaluator(config, graphdef, state_sharding, mesh, info.num_classes, workdir)

    def write_exports(state, workdir):
      return export_segmenter(graphdef, state, os.path.join(workdir, SEGMENTER_EXPORT)) if config.export else {}

    return Setup(state=state, feature_spec=feature_spec, predict=predict,
                 predict_keys=("params", "batch_stats", "consts"), step=step, meta=meta, export=export,
                 train_iterator=train_iterator, make_evaluator=make_evaluator, write_exports=write_exports)


class SegmentEvaluator:
  """mIoU / mAcc / aAcc of the model over the whole val set (mmseg's metrics: areas summed over every example,
  metrics.area_metrics), by slide inference at config.segment's crop and stride on the test path's images.

  Consecutive examples of one size are grouped (up to config.batch_size) and their windows run through one
  compiled forward in groups of config.batch_size windows, sharded over (data, fsdp) like a train batch
  (inference.slide_areas: no recompilation per image size). Every process reads the whole val set. Writes the
  per-class IoU and Acc to <workdir>/segment_classes.json (process 0).
  """

  def __init__(self, config, graphdef, state_sharding, mesh, num_classes: int, workdir: str):
    s = _section(config)
    self.config, self.mesh, self.num_classes, self.workdir = config, mesh, num_classes, workdir
    self.keys = ("params", "batch_stats", "consts")
    self.batch_sharding, self.replicated = sh.batch_sharding(mesh), sh.replicated(mesh)
    crop = (s.crop, s.crop)

    def window_logits(sub, windows):  # eval mode; logits resized to the window, as slide inference does
      return resize(seg_step.merge(graphdef, sub)(windows, train=False)["logits"].astype(jnp.float32), crop)

    self.fn = jax.jit(window_logits, in_shardings=({k: state_sharding[k] for k in self.keys}, self.batch_sharding),
                      out_shardings=self.replicated)

  def _global(self, x, sharding):
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  def _batches(self):
    from tinymim_jax.data import segmentation as seg_data  # pylint: disable=g-import-not-at-top
    s = _section(self.config)
    _, val, _ = _sources(self.config)
    if isinstance(val, list):
      val = (lambda pairs: ([p[0] for p in pairs], [p[1] for p in pairs]))(val)
    # Consecutive examples of one image and label size, up to a batch; the windows are what the forward batches.
    n = self.config.batch_size
    group: list[dict] = []
    for ex in seg_data.eval_examples(val, scale=tuple(s.scale)):
      if group and (ex["image"].shape != group[0]["image"].shape or ex["label"].shape != group[0]["label"].shape):
        yield _stack(group)
        group = []
      group.append(ex)
      if len(group) == n:
        yield _stack(group)
        group = []
    if group:
      yield _stack(group)

  def __call__(self, state, **_) -> dict[str, float]:
    sub = {k: state[k] for k in self.keys}
    s = _section(self.config)
    areas = np.zeros((4, self.num_classes), np.int64)
    for batch in self._batches():
      # One compiled forward over fixed-size groups of windows, whatever the image size (slide_areas).
      areas += np.asarray(jax.device_get(seg_inference.slide_areas(
          lambda w: self.fn(sub, self._global(w, self.batch_sharding)), batch["image"], batch["label"],
          crop=s.crop, stride=s.stride, num_classes=self.num_classes, chunk=self.config.batch_size,
          ignore_index=s.ignore_index, put=lambda x: self._global(x, self.replicated))), np.int64)
    m = metrics_lib.area_metrics(areas)
    if jax.process_index() == 0 and self.workdir:
      per_class = {"IoU": _json_floats(m["IoU"]), "Acc": _json_floats(m["Acc"]),
                   "label_pixels": areas[3].tolist()}
      paths.write_atomic(os.path.join(self.workdir, CLASSES_FILE), json.dumps(per_class, indent=1))
    return {"eval/mIoU": m["mIoU"], "eval/mAcc": m["mAcc"], "eval/aAcc": m["aAcc"]}


def _stack(group):
  return {"image": np.stack([g["image"] for g in group]).astype(np.float32),
          "label": np.stack([g["label"] for g in group]).astype(np.int32)}


def _json_floats(x):
  return [None if np.isnan(v) else float(v) for v in np.asarray(x, np.float64)]


def segmenter_tensors(graphdef, state) -> dict[str, np.ndarray]:
  """The whole Segmenter as {'<nnx path joined by .>': array} in Flax layouts (conv kernels HWIO, linear kernels
  (in, out)): params, BatchNorm statistics ('...bn.mean' / '...bn.var') and constants, from a train state."""
  host = jax.device_get({k: state[k] for k in ("params", "batch_stats", "consts")})
  pure = nnx.to_pure_dict(nnx.state(seg_step.merge(graphdef, host)))
  flat = jax.tree_util.tree_flatten_with_path(pure)[0]
  return {".".join(str(k.key) for k in path): np.ascontiguousarray(np.asarray(v)) for path, v in flat}


def export_segmenter(graphdef, state, path: str) -> dict:
  """Writes segmenter_tensors to `path` (.safetensors, process 0); -> {'export_segmenter': path}."""
  tensors = segmenter_tensors(graphdef, state)
  if jax.process_index() == 0:
    from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
    paths.write_atomic(path, save(tensors, metadata={"format": "tinymim-jax segmenter (nnx paths, Flax layouts)"}))
  return {"export_segmenter": path}


register(Segment())
