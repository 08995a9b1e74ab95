"""From a config to what a run needs: models, weights, the optimizer, a finished run's model.

The one place each of these is built, shared by the trainer, the converter CLI, the benchmarks and the tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Mapping

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from tinymim_jax import checkpoint, convert, features, objectives, optim, paths
from tinymim_jax import workdir as workdir_lib
from tinymim_jax import train_steps as ts
from tinymim_jax.models import ViTConfig, create_model


def vit_kwargs(mc) -> dict:
  """The ViTConfig fields a `config_base.model_config()` section sets (None = keep the variant's value)."""
  return {f.name: mc[f.name] for f in dataclasses.fields(ViTConfig) if f.name in mc and mc[f.name] is not None}


# --------------------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------------------
def make_classifier(config, *, num_classes: int | None = None, seed: int | None = None) -> nnx.Module:
  """The ViT config.model describes, with a `num_classes` head unless config.model.num_classes sets one."""
  kw = vit_kwargs(config.model)
  if num_classes and not kw.get("num_classes"):
    kw["num_classes"] = num_classes
  return create_model(config.model.name, seed=config.seed if seed is None else seed, **kw)


def make_trainable(config, *, num_classes: int | None = None, seed: int | None = None
                   ) -> tuple[nnx.Module, dict[str, nnx.Module]]:
  """-> (the model a run of config.objective trains, {name: extra layers trained beside it}), as that objective
  builds them (objectives.Objective.build: an MAE, a TinyMIM student and its target's layers, a classifier)."""
  return objectives.get(config.objective).build(config, num_classes=num_classes, seed=seed)


def make_model(config, *, num_classes: int | None = None, seed: int | None = None) -> nnx.Module:
  """The model a run of config.objective trains (make_trainable's, without the extra layers)."""
  return make_trainable(config, num_classes=num_classes, seed=seed)[0]


# --------------------------------------------------------------------------------------------------------
# Optimizer.
# --------------------------------------------------------------------------------------------------------
def make_optimizer(config, params, *, total_steps: int, warmup_steps: int, frozen: tuple[str, ...] = ()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule, str]:
  """AdamW with MAE's lr schedule and config.optim's rules over `params` (arrays or ShapeDtypeStructs, as
  ts.split_model gives them); `frozen`: regexes of params the objective leaves untrained, beside config.optim's.

  Returns (tx, schedule, a table of the rules for the log).
  """
  o = config.optim
  schedule = optim.lr_schedule(base_lr=o.base_lr, global_batch_size=config.batch_size, total_steps=total_steps,
                               warmup_steps=warmup_steps, min_lr=o.min_lr, lr_scaling_batch=o.lr_scaling_batch)
  frozen = tuple(o.frozen) + tuple(frozen)
  rules = dict(no_decay=tuple(o.no_decay), frozen=frozen, layer_decay=o.layer_decay,
               depth=len(params["blocks"]) if "blocks" in params else None)
  tx = optim.make_optimizer(params, schedule=schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                            grad_clip_norm=o.grad_clip_norm, grad_accum_steps=o.grad_accum_steps, **rules)
  return tx, schedule, optim.describe(params, **rules)


# --------------------------------------------------------------------------------------------------------
# Weights.
# --------------------------------------------------------------------------------------------------------
def _open_run(workdir: str) -> checkpoint.Checkpointer:
  """A finished or running run's checkpoints, read-only: nothing is created in a directory that is not one."""
  if not paths.isdir(os.path.join(workdir, workdir_lib.CHECKPOINTS)):
    raise convert.MissingSourceError(f"{workdir!r} is not a tinymim-jax workdir: it has no {workdir_lib.CHECKPOINTS}/ "
                                     f"directory (nor is it a hub folder: config.json + "
                                     f"{' / '.join(convert.HUB_WEIGHTS[:2])})")
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  if ckpt.latest_step() is None:
    ckpt.close()
    raise convert.MissingSourceError(f"no checkpoint under {ckpt.directory}: is {workdir!r} a tinymim-jax workdir?")
  return ckpt


MODEL_KEY = "model"  # the checkpoint metadata's record of the model it holds (model_record)


def model_record(model: nnx.Module, extras: dict | None = None) -> dict:
  """What a checkpoint records of the model it holds, so that restoring it needs no objective code.

  -> {'architecture': convert.architecture(model) (the fields of an export's `<name>.config.json`), 'extras':
  {name: {param path ('linear/kernel'): [shape, dtype name]}}: the extra layers trained beside the model
  (objectives.Objective.build; their params sit beside the model's, train_steps.split_model)}.
  """
  rec = {}
  for name, module in (extras or {}).items():
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(module, nnx.Param)))[0]
    rec[name] = {"/".join(str(k.key) for k in path): [list(x.shape), np.dtype(x.dtype).name] for path, x in flat}
  return {"architecture": convert.architecture(model), "extras": rec}


def _saved_trainable(meta: dict) -> tuple[nnx.Module, dict]:
  """-> (the abstract model a checkpoint holds, {name: abstract params of each extra layer}).

  From the checkpoint's model_record; a checkpoint written before it records its model (no MODEL_KEY) is
  rebuilt from its saved config by its objective (builders.make_trainable)."""
  rec = meta.get(MODEL_KEY)
  if rec is None:
    config = ml_collections.ConfigDict(meta["config"])
    model, extras = nnx.eval_shape(lambda: make_trainable(config, num_classes=meta.get("num_classes")))
    return model, {name: ts.split_model(layer)[1] for name, layer in extras.items()}
  name, overrides, decoder = convert.sidecar_model(rec["architecture"])
  model = nnx.eval_shape(lambda: create_model(name, decoder=decoder, **overrides))
  extras = {}
  for layer, leaves in rec.get("extras", {}).items():
    tree = extras[layer] = {}
    for path, (shape, dtype) in leaves.items():
      *parents, leaf = path.split("/")
      node = tree
      for key in parents:
        node = node.setdefault(key, {})
      node[leaf] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
  return model, extras


def restore_model(workdir: str) -> nnx.Module:
  """The trained model of a tinymim-jax run (its newest intact checkpoint, without a target's extra layers),
  built from the architecture the checkpoint records (model_record; an older checkpoint: from the config it
  saved), on this process's first device whatever mesh saved it. Reads only.

  Raises convert.MissingSourceError (a FileNotFoundError) when `workdir` holds no checkpoint,
  checkpoint.NoIntactCheckpointError when every checkpoint is damaged (a damaged one is skipped with a warning,
  and left where it is).
  """
  return _restore(workdir)[0]


def _restore(workdir: str) -> tuple[nnx.Module, dict]:
  """-> (restore_model(workdir), the checkpoint's metadata)."""
  ckpt = _open_run(workdir)
  try:
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    built = {}

    def abstract_model(meta):
      model, extras = _saved_trainable(meta)
      built["modeldef"], params, consts = ts.split_model(model)
      built["extras"] = set(extras)
      target = {"params": {**params, **extras}, "consts": consts}
      # A fine-tuning run's weight EMA rides in the model item (checkpoint._model_item), the params' tree: read
      # so the item fits, then left out (the model is the raw weights, as trained).
      if any(k.startswith("ema.") for k in ((meta or {}).get("checksums") or {}).get("model", {})):
        target["ema"] = target["params"]
      return {"model": checkpoint.abstract(target, jax.tree.map(lambda _: local, target))}

    _, restored, meta = ckpt.restore_intact(abstract_model)
  finally:
    ckpt.close()
  params = {k: v for k, v in restored["model"]["params"].items() if k not in built["extras"]}
  return ts.merge_model(built["modeldef"], params, restored["model"]["consts"]), meta


def is_run(source: str) -> bool:
  """Whether a weights source is a run's workdir (a directory that is not a hub folder: convert.hub_folder)."""
  return paths.isdir(source) and convert.hub_folder(source) is None


def source_architecture(source: str) -> tuple[dict, str] | None:
  """-> (convert.architecture of the model `source` holds, where it was read) or None when nothing records it:
  a workdir's checkpoint (model_record, or the config an older one saved), or the `<name>.config.json` beside a
  weight file, or a hub folder's config.json."""
  if paths.isdir(source) and (hub := convert.hub_folder(source)) is not None:
    return hub.sidecar, f"{os.path.basename(source.rstrip('/'))}/config.json ({hub.kind})"
  if paths.isdir(source):
    ckpt = _open_run(source)
    try:
      meta = ckpt.restore_meta()
    finally:
      ckpt.close()
    if MODEL_KEY in meta:
      return meta[MODEL_KEY]["architecture"], f"the checkpoint in {source}"
    return convert.architecture(_saved_trainable(meta)[0]), f"the config saved in {source}"
  if paths.isfile(source):
    side = convert.read_sidecar(source)
    return (side, os.path.basename(convert.sidecar_path(source))) if side is not None else None
  return None


def load_weights(model: nnx.Module, source: str, *, skip=(), allow_missing=(), ema: bool = True,
                 prefix: str | None = None, depth: int | None = None,
                 hint_context: convert.HintContext = "api") -> convert.LoadReport:
  """Loads a .pth / .safetensors file or a tinymim-jax workdir into `model` (strict, via timm names); the
  arguments are convert.load_pytorch_weights'. Raises convert.MissingSourceError for a source that is neither."""
  if is_run(source):
    restored = restore_model(source)
    src = convert.Checkpoint(weights=convert.export_pytorch_weights(restored), extras={}, label=source,
                             sidecar=convert.architecture(restored), sidecar_label=f"the config saved in {source}")
  elif paths.exists(source):
    src = source
  else:
    raise convert.MissingSourceError(f"weights source {source!r} is neither a file nor a tinymim-jax workdir")
  return convert.load_pytorch_weights(model, src, skip=tuple(skip), allow_missing=tuple(allow_missing), ema=ema,
                                      prefix=prefix, depth=depth, hint_context=hint_context)


# How the main job's user sets the loader's options (config fields), for the hints of its errors and reports.
INIT_OPTIONS = {"skip": "init_skip", "ema": "init_ema", "prefix": "init_prefix", "pooling": "model.pooling"}

# The parts fine-tuning starts fresh when the init file has none: the classifier tail, and a distilled student's
# distillation token (its positional row too), head_dist and TinyMIM*-T's conv1x1 layer (DeiT / TinyMIM*-T start
# them from their init on a pretrained encoder).
FRESH_PARTS = (r"fc_norm\..*", r"head\..*", r"dist_token", r"head_dist\..*", r"conv1x1\..*")


def load_init(model: nnx.Module, config) -> convert.LoadReport:
  """config.init into the model a run trains. Fine-tuning starts from a pretrained / distilled encoder: a fresh
  fc_norm + head (and dist_token, head_dist, conv1x1 where the file has none: FRESH_PARTS), the file's `norm`
  dropped (a frozen model for evals is read strictly: frozen_model)."""
  return load_weights(model, config.init, skip=config.init_skip, ema=config.init_ema, prefix=config.init_prefix,
                      allow_missing=FRESH_PARTS, hint_context=INIT_OPTIONS)


def layout_kwargs(weights) -> dict:
  """The ViTConfig fields a timm-named state dict's keys decide: {'pooling': 'avg' with fc_norm, else 'cls';
  'num_classes': head.weight's rows, 0 without a head; 'dist_token': whether it holds DeiT's dist_token;
  'conv1x1_dim': TinyMIM*-T's conv1x1.1.weight rows, 0 without one}."""
  return {"pooling": "avg" if "fc_norm.weight" in weights else "cls",
          "num_classes": int(weights["head.weight"].shape[0]) if "head.weight" in weights else 0,
          "dist_token": "dist_token" in weights,
          "conv1x1_dim": int(weights["conv1x1.1.weight"].shape[0]) if "conv1x1.1.weight" in weights else 0}


def frozen_classifier(section, options: Mapping[str, str]) -> tuple[nnx.Module, convert.LoadReport | str]:
  """A frozen classifier (a fine-tuning teacher) from a teacher section (config_base.teacher_config): its `source`
  a tinymim-jax workdir (its model exactly as trained, restore_model) or a .pth / .safetensors file or hub folder of
  any layout we read, built as `section` says (size, heads, dtype) in the file's layout (layout_kwargs), loaded strictly.
  -> (model, its load report or where it was restored from). `options`: the config fields of the loader's options,
  for the errors' hints. Raises convert.MissingSourceError for a source that is neither, ValueError for a file
  without a classifier head, convert.WeightMismatchError for one that does not fit."""
  source = section.source
  if is_run(source):
    return restore_model(source), f"restored from the checkpoint in {source}"
  if not paths.exists(source):
    raise convert.MissingSourceError(f"teacher source {source!r} is neither a file nor a tinymim-jax workdir")
  weights, _, _ = convert.read_pytorch_weights(source, ema=section.ema, prefix=section.prefix, hint_context=options)
  kw = vit_kwargs(section)
  kw.update(drop_path=0.0, **layout_kwargs(weights))
  if not kw["num_classes"]:
    raise ValueError(f"teacher source {source!r} has no classifier head (head.weight): a fine-tuning teacher "
                     f"must be a fine-tuned classifier")
  model = create_model(section.name, seed=0, **kw)
  return model, convert.load_pytorch_weights(model, weights, skip=tuple(section.skip), hint_context=options)


def resolve_source_heads(config, teachers=()) -> list[str]:
  """Takes the head counts the sources record where the config leaves them to the variant; -> log lines.

  A state dict does not store head counts. Where a teacher's source (the sections named in `teachers`, the
  run's objective's: objectives.Objective.teacher_sections) / config.init
  records its model (source_architecture) and that section's num_heads is None (the variant's), the recorded
  count is written into the config, so the run is built, saved and restored with it. An explicit teacher
  num_heads that differs raises convert.ConvertError: the teacher's relations depend on its head split. An explicit
  model.num_heads that differs is kept and noted: fine-tuning regroups the same weights into the standard heads
  (docs/method.md 2.3). A count the sidecar marks as assumed (convert import without --num-heads) is no record
  and is ignored. Per-block overrides (a distilled student's relation block) are not carried over: the
  builders set the relation block's heads from config.distill.
  """
  notes = []
  sections = [(name, config[name].source) for name in teachers if config[name].source]
  sections += [("model", config.init)] if config.init else []
  for field, source in sections:
    found = source_architecture(source)
    if found is None:
      continue
    side, origin = found
    if "num_heads" in convert.assumed_fields(side):  # a guess written down by its writer, not a record
      continue
    recorded, section = int(side["model_args"]["num_heads"]), config[field]
    if section.num_heads is None:
      section.num_heads = recorded
      notes.append(f"config.{field}.num_heads = {recorded}: the count {origin} records for {source}")
    elif section.num_heads != recorded and field != "model":
      raise convert.ConvertError(
          f"config.{field}.num_heads={section.num_heads}, but {origin} records {recorded} heads per block for "
          f"{source}; the teacher's relations depend on its head split. Leave the field unset to use the recorded "
          f"count, or set --config.{field}.num_heads={recorded}")
    elif section.num_heads != recorded:
      notes.append(f"config.model.num_heads = {section.num_heads}, while {origin} records {recorded}: the same "
                   f"weights regrouped into {section.num_heads} heads (docs/method.md 2.3)")
  return notes


def frozen_model(config) -> tuple[nnx.Module, dict]:
  """The model the `eval` and `linprobe` objectives read features from, and the metadata of the run behind it.

  `config.init` a tinymim-jax workdir: its model exactly as trained (its own layout and head), and its
  checkpoint metadata ({'config', 'feature', ...}: how it was trained and the feature spec it recorded).
  A .pth / .safetensors file: `config.model` (its size, heads, resolution) in the file's layout (pooling 'avg'
  when it holds fc_norm, a head when it holds one), loaded strictly; metadata: the feature spec a tinymim-jax
  export recorded in its .safetensors header, else {}.
  """
  source = config.init
  if is_run(source):
    return _restore(source)
  if not paths.exists(source):
    raise FileNotFoundError(f"config.init={source!r} is neither a file nor a tinymim-jax workdir")
  weights, extras, label = convert.read_pytorch_weights(source, ema=config.init_ema, prefix=config.init_prefix,
                                                        hint_context=INIT_OPTIONS)
  kw = vit_kwargs(config.model)
  kw.update(drop_path=0.0, pos_embed="learn",  # whatever table the file holds (frozen all the same)
            **layout_kwargs(weights))
  model = create_model(config.model.name, seed=config.seed, **kw)
  report = convert.load_pytorch_weights(model, weights, skip=tuple(config.init_skip), hint_context=INIT_OPTIONS)
  logging.info("frozen model from %s [%s]:\n%s", label, convert.detect_layout(weights, extras), report)
  return model, _exported_meta(source)


def _exported_meta(path: str) -> dict:
  """{'feature': spec} from the header of a .safetensors that tinymim-jax exported, else {}."""
  if not path.endswith(".safetensors"):
    return {}
  header = convert.read_safetensors_metadata(path)
  return {"feature": json.loads(header[features.METADATA_KEY])} if features.METADATA_KEY in header else {}


def weights_hash(model: nnx.Module) -> str:
  """sha256 over the model's arrays in name order: identifies a teacher in the run's metadata."""
  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
  for path, x in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(x, np.float32)).tobytes())
  return h.hexdigest()
