"""The config schema: every field a run may set, with its default.

Config files in configs/ start from `base_config()` and change what they need; the result is locked, so a
misspelt field in a file or on the command line (`--config.optim.base_lr=...`) is an error that names it.
Placeholders (None by default) are typed so they can still be overridden from the command line.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from ml_collections import config_dict

from tinymim_jax.fewshot import DEFAULT_L2

# ViTConfig fields the builders set from other sections (the relation block's heads and drop path).
_BUILDER_SET = ("head_overrides", "drop_path_overrides")


def model_config(name: str = "vit_base_patch16") -> ml_collections.ConfigDict:
  """A ViT: a variant name plus one field per ViTConfig field (tinymim_jax/models/vit.py documents them).

  The fields a variant sets (patch_size, embed_dim, depth, num_heads) are None = the variant's value; the
  others start at ViTConfig's defaults (dtypes as their names, e.g. 'float32').
  """
  from tinymim_jax.models.vit import VARIANTS, ViTConfig
  per_variant = set().union(*VARIANTS.values())
  c = ml_collections.ConfigDict({"name": name})
  for f in dataclasses.fields(ViTConfig):
    if f.name in _BUILDER_SET:
      continue
    if f.name in per_variant:
      c[f.name] = config_dict.placeholder(type(f.default))
    elif isinstance(f.default, type):  # a dtype such as jnp.float32
      c[f.name] = np.dtype(f.default).name
    else:
      c[f.name] = f.default
  return c


def teacher_config(name: str = "vit_base_patch16", **fields) -> ml_collections.ConfigDict:
  """A teacher section: model_config(name) plus where its weights come from, how it runs and what it gives.

  `fields` set any of them (e.g. source=..., block=9, weight=0.5).
  """
  c = model_config(name)
  c.source = ""                       # .pth / .safetensors (official MAE / TinyMIM / timm) or a workdir
  #                                     (num_heads None: the count the source records, else the variant's)
  c.dtype = "bfloat16"                # a teacher only runs forward
  c.skip = ()                         # regexes of source keys to skip (timm names)
  c.ema = True                        # a training checkpoint's EMA copy where it has one (timm's way)
  c.prefix = config_dict.placeholder(str)  # the wrapper prefix of the teacher in the file (None: found)
  c.block = config_dict.placeholder(int)   # 1-based block the target reads; it runs only to it (None: distill's)
  c.weight = 1.0                      # its loss's weight in the sum over teachers
  c.update(fields)
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.objective = "distill"
  c.seed = 0
  c.batch_size = 4096                 # global, over all processes
  c.total_epochs = 300.0
  c.total_steps = config_dict.placeholder(int)    # overrides total_epochs when set
  c.warmup_epochs = 15.0
  c.warmup_steps = config_dict.placeholder(int)

  c.model = model_config("vit_small_patch16")     # the model being trained (student / MAE / classifier)
  c.init = ""    # weights to start from: a .pth / .safetensors file or a tinymim-jax workdir ('' = random)
  # (a state dict stores no head count: where the source records one and model.num_heads is None, it is used)
  c.init_skip = ()                                 # extra regexes of source keys to skip (timm names)
  c.init_ema = True                                # a training checkpoint's EMA copy where it has one (timm's way)
  c.init_prefix = config_dict.placeholder(str)     # the wrapper prefix of the model in the file (None: found)

  # Distillation (objective 'distill'). `teachers` names the config sections that hold the teachers (big_vision's
  # way: a list of names, one section each; a config file adds a section with teacher_config()); the loss is
  # the sum of the target's loss per teacher, each times its section's `weight`.
  c.teachers = ("teacher",)
  c.teacher = teacher_config("vit_base_patch16")
  c.distill = ml_collections.ConfigDict(dict(
      target="relation",              # 'relation' | 'feature' | 'cls'
      teacher_block=12,               # 1-based; the block of each teacher whose section leaves `block` None
      student_block=12,               # 1-based; one student block for all teachers
      relation_heads=config_dict.placeholder(int),  # heads of the student's relation block; None = the teachers'

      w_qk=1.0, w_vv=1.0,
      feature_loss="smooth_l1", normalize_target=False,
      student_mask_ratio=0.0,
  ))

  # MAE pretraining (objective 'mae_pretrain').
  c.mae = ml_collections.ConfigDict(dict(mask_ratio=0.75, norm_pix=True,
                                         decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16))

  # Fine-tuning (objective 'finetune').
  # DeiT-style distillation (DeiT main.py --distillation-type / -alpha / -tau; docs/method.md section 11): 'hard' /
  # 'soft' read the frozen classifier in config.finetune_teacher, which sees the student's (mixed) batch; the student
  # needs model.dist_token=True. ema_decay (None: off; DeiT 0.99996) keeps a weight EMA, checkpointed and evaluated
  # as eval/ema_top1; export_ema exports it instead of the raw weights.
  c.finetune = ml_collections.ConfigDict(dict(mixup=0.8, cutmix=1.0, switch_prob=0.5, label_smoothing=0.1,
                                              distillation_type="none", alpha=0.5, tau=1.0,
                                              ema_decay=config_dict.placeholder(float), export_ema=False))
  # The fine-tuning teacher: a classifier with its head (a tinymim-jax fine-tune workdir, or a file of any layout we
  # read: its pooling, head, distillation token and conv1x1 layer come from the file's keys); run frozen, never
  # checkpointed. block / weight are unused here.
  c.finetune_teacher = teacher_config("vit_base_patch16")

  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1.5e-4, lr_scaling_batch=256, min_lr=0.0,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
      no_decay=(), frozen=(),           # regexes over param names ('blocks/3/attn/qkv/kernel')
      layer_decay=config_dict.placeholder(float),
      grad_clip_norm=config_dict.placeholder(float),
      grad_accum_steps=1,
  ))

  c.mesh = ml_collections.ConfigDict(dict(fsdp=1))   # devices along the fsdp axis; the rest is data

  from tinymim_jax.data import default_config as data_default_config  # no TF import at this point
  c.data = data_default_config()

  c.log_every_steps = 50
  c.ckpt_every_steps = 1000
  c.keep_ckpts = 3
  c.keep_every_steps = config_dict.placeholder(int)   # also keep every M-th step for good
  c.eval_every_steps = 5000
  # Frozen-feature evals (knn.py, fewshot.py, linprobe.py) on the features `feature` names (features.py; None
  # fields: the spec the `init` workdir recorded (eval / linprobe objectives), else the model's default: its
  # last block, or a relation-distilled student's relation-block input; mean pool; parameter-free LayerNorm).
  # k-NN and few-shot run every eval_every_steps and at the end of any run; the `eval` objective reports them
  # all, with a linear probe on cached features (`linprobe` below) and the head's top-1.
  c.eval = ml_collections.ConfigDict(dict(
      feature=ml_collections.ConfigDict(dict(block=config_dict.placeholder(int), pool=config_dict.placeholder(str),
                                             norm=config_dict.placeholder(bool))),
      max_train=50000,                  # train images (eval transform) whose features k-NN and few-shot use
      knn=ml_collections.ConfigDict(dict(enabled=True, k=20, temperature=0.07)),
      fewshot=ml_collections.ConfigDict(dict(enabled=True, shots=(1, 5, 10, 25), draws=3, val_per_class=10,
                                             l2_regs=DEFAULT_L2)),
      cached_probe=True,                # objective 'eval': a linear probe on cached features of the whole train split
      # Objective 'eval': a linear segmentation probe on the patch tokens (segprobe.py: DINOv2's protocol, features
      # cached). The data source's fields are config.segment's (data/segmentation.make_source); the recipe is
      # DINOv2's ADE20K linear one (lr 1e-3, wd 1e-4, 40k steps of 16, warmup 1,500 + poly).
      segprobe=ml_collections.ConfigDict(dict(
          enabled=False,
          dataset="ade20k", path="", data_seed=0,
          num_classes=150, reduce_zero_label=True, on_bad="skip",   # 'folder' only (ade20k: 150, reduced)
          num_train=1000, num_val=200, scene_size=64,                # 'digits_scenes' only
          crop=512, stride=341, scale=(2048, 512),                   # the backbone's input; the test path
          max_train=20210,                                           # train images read (ADE20K: all)
          steps=40000, batch_size=16, base_lr=1e-3, weight_decay=1e-4, warmup_steps=1500, warmup_ratio=1e-6,
          power=1.0, ignore_index=255)),
  ))
  # The linear-probe recipe (MAE's main_linprobe.py): objective 'linprobe' trains with it (its batch_size,
  # epochs, warmup_epochs, base_lr and weight_decay replace the run's batch_size, total_epochs, warmup_epochs,
  # optim.base_lr and optim.weight_decay), and so does the eval objective's probe on cached features.
  c.linprobe = ml_collections.ConfigDict(dict(
      augment=True,                     # RandomResizedCrop(data.ft_crop_scale) + data.flip; False: cached features
      batch_size=16384, epochs=90.0, warmup_epochs=10.0,
      base_lr=0.1,                      # x batch_size / optim.lr_scaling_batch
      weight_decay=0.0, momentum=0.9, trust_coefficient=0.001,   # LARS (linprobe.lars)
  ))
  c.export = True                      # write the student as timm-named .safetensors at the end
  # Resume even if a field that changes the model or the checkpoint's meaning differs from the workdir's
  # config.json (tinymim_jax/workdir.py FIXED); other changes are always allowed, logged and recorded.
  c.allow_config_change = False
  return c


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


# The range of every numeric field of base_config() outside data.* (data/config.py checks those), as an interval
# string; a placeholder left at None passes. Ints must be ints (bools are not); floats also take ints.
RANGES = {
    "seed": (int, "[0, inf)"),
    "batch_size": (int, "[1, inf)"),
    "total_epochs": (float, "(0, inf)"),
    "total_steps": (int, "[1, inf)"),
    "warmup_epochs": (float, "[0, inf)"),
    "warmup_steps": (int, "[0, inf)"),
    "distill.teacher_block": (int, "[1, inf)"),
    "distill.student_block": (int, "[1, inf)"),
    "distill.relation_heads": (int, "[1, inf)"),
    "distill.w_qk": (float, "[0, inf)"),
    "distill.w_vv": (float, "[0, inf)"),
    "distill.student_mask_ratio": (float, "[0, 1)"),
    "mae.mask_ratio": (float, "[0, 1)"),
    "mae.decoder_embed_dim": (int, "[1, inf)"),
    "mae.decoder_depth": (int, "[1, inf)"),
    "mae.decoder_num_heads": (int, "[1, inf)"),
    "finetune.mixup": (float, "[0, inf)"),
    "finetune.cutmix": (float, "[0, inf)"),
    "finetune.switch_prob": (float, "[0, 1]"),
    "finetune.label_smoothing": (float, "[0, 1)"),
    "finetune.alpha": (float, "[0, 1]"),
    "finetune.tau": (float, "(0, inf)"),
    "finetune.ema_decay": (float, "[0, 1)"),
    "optim.base_lr": (float, "(0, inf)"),
    "optim.lr_scaling_batch": (int, "[1, inf)"),
    "optim.min_lr": (float, "[0, inf)"),
    "optim.b1": (float, "[0, 1)"),
    "optim.b2": (float, "[0, 1)"),
    "optim.eps": (float, "(0, inf)"),
    "optim.weight_decay": (float, "[0, inf)"),
    "optim.layer_decay": (float, "(0, 1]"),
    "optim.grad_clip_norm": (float, "(0, inf)"),
    "optim.grad_accum_steps": (int, "[1, inf)"),
    "mesh.fsdp": (int, "[1, inf)"),
    "log_every_steps": (int, "[1, inf)"),
    "ckpt_every_steps": (int, "[1, inf)"),
    "keep_ckpts": (int, "[1, inf)"),       # the latest checkpoint is always kept
    "keep_every_steps": (int, "[1, inf)"),
    "eval_every_steps": (int, "[0, inf)"),  # 0: only the final eval
    "eval.feature.block": (int, "[0, inf)"),   # 0: the embeddings
    "eval.max_train": (int, "[1, inf)"),
    "eval.knn.k": (int, "[1, inf)"),
    "eval.knn.temperature": (float, "(0, inf)"),
    "eval.fewshot.draws": (int, "[1, inf)"),
    "eval.fewshot.val_per_class": (int, "[0, inf)"),
    "eval.segprobe.crop": (int, "[1, inf)"),
    "eval.segprobe.stride": (int, "[1, inf)"),
    "eval.segprobe.max_train": (int, "[1, inf)"),
    "eval.segprobe.steps": (int, "[1, inf)"),
    "eval.segprobe.batch_size": (int, "[1, inf)"),
    "eval.segprobe.base_lr": (float, "(0, inf)"),
    "eval.segprobe.weight_decay": (float, "[0, inf)"),
    "eval.segprobe.warmup_steps": (int, "[0, inf)"),
    "eval.segprobe.warmup_ratio": (float, "[0, 1]"),
    "eval.segprobe.power": (float, "[0, inf)"),
    "eval.segprobe.num_classes": (int, "[2, 255]"),   # 255 is the ignore label
    "eval.segprobe.num_train": (int, "[1, inf)"),
    "eval.segprobe.num_val": (int, "[1, inf)"),
    "eval.segprobe.scene_size": (int, "[1, inf)"),
    "eval.segprobe.data_seed": (int, "[0, inf)"),
    "eval.segprobe.ignore_index": (int, "[0, 255]"),
    "linprobe.batch_size": (int, "[1, inf)"),
    "linprobe.epochs": (float, "(0, inf)"),
    "linprobe.warmup_epochs": (float, "[0, inf)"),
    "linprobe.base_lr": (float, "(0, inf)"),
    "linprobe.weight_decay": (float, "[0, inf)"),
    "linprobe.momentum": (float, "[0, 1)"),
    "linprobe.trust_coefficient": (float, "(0, inf)"),
}
# The numeric ViTConfig fields, for model.* and each teacher section (config.teachers).
VIT_RANGES = {
    "img_size": (int, "[1, inf)"),
    "patch_size": (int, "[1, inf)"),
    "embed_dim": (int, "[1, inf)"),
    "depth": (int, "[1, inf)"),
    "num_heads": (int, "[1, inf)"),
    "mlp_ratio": (float, "(0, inf)"),
    "drop_path": (float, "[0, 1)"),
    "num_classes": (int, "[0, inf)"),   # 0: no head
    "init_values": (float, "[0, inf)"),  # LayerScale; 0: off
    "reg_tokens": (int, "[0, inf)"),
    "conv1x1_dim": (int, "[0, inf)"),  # TinyMIM*-T's extra layer width; 0: off
    "norm_eps": (float, "(0, inf)"),
    "rope_temperature": (float, "(0, inf)"),  # DINOv3's rotary periods' base
}


def _in_range(value, interval: str) -> bool:
  lo, hi = (float(v) for v in interval[1:-1].split(","))
  return ((lo <= value) if interval[0] == "[" else (lo < value)) and ((value <= hi) if interval[-1] == "]"
                                                                      else (value < hi))


def check_range(name: str, value, kind: type, interval: str) -> None:
  """Raises ConfigError naming `config.<name>` unless value is None or a `kind` inside `interval`."""
  if value is None:
    return
  ok_type = not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
  if not ok_type or not _in_range(value, interval):
    raise ConfigError(f"config.{name}={value!r}: expected {'an integer' if kind is int else 'a number'} in "
                      f"{interval}")


# A teacher section's own numeric fields (teacher_config()).
TEACHER_RANGES = {
    "block": (int, "[1, inf)"),
    "weight": (float, "[0, inf)"),
}


def _ranges(teachers) -> dict[str, tuple[type, str]]:
  out = dict(RANGES)
  for section in ("model", "finetune_teacher", *teachers):
    out.update({f"{section}.{k}": v for k, v in VIT_RANGES.items()})
  for section in ("finetune_teacher", *teachers):  # unused by the fine-tuning teacher, checked all the same
    out.update({f"{section}.{k}": v for k, v in TEACHER_RANGES.items()})
  return out


def _check_teachers(c: ml_collections.ConfigDict) -> None:
  """config.teachers names teacher sections (teacher_config()), each once, each with a source (distillation)."""
  names = tuple(c.teachers)
  if not names or len(set(names)) != len(names):
    raise ConfigError(f"config.teachers={names!r}: expected one or more distinct names of teacher sections")
  for name in names:
    section = c.get(name)
    if not isinstance(section, ml_collections.ConfigDict) or "source" not in section or "block" not in section:
      raise ConfigError(f"config.teachers names {name!r}, but config.{name} is not a teacher section: add it in the "
                        f"config file with config_base.teacher_config(...)")
    if c.objective == "distill" and not section.source:
      raise ConfigError(f"config.{name}.source is empty: name a .pth/.safetensors file or a tinymim-jax workdir")



def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the values a schema cannot, then locks the config.

  Raises ConfigError (a ValueError) naming the field: a value outside its range (RANGES, VIT_RANGES, the data
  fields' checks in data/config.py), an unknown objective, a missing teacher / init, inconsistent lengths.
  """
  from tinymim_jax import objectives  # the registry (its modules load the builders, not this module)
  if c.objective not in objectives.names():
    raise ConfigError(f"config.objective must be one of {objectives.names()}, got {c.objective!r}")
  _check_teachers(c)
  if c.finetune.distillation_type not in ("none", "soft", "hard"):
    raise ConfigError(f"config.finetune.distillation_type={c.finetune.distillation_type!r}: one of 'none', 'soft', "
                      f"'hard' (DeiT's)")
  if c.objective == "finetune" and c.finetune.distillation_type != "none":
    if not c.finetune_teacher.source:
      raise ConfigError(f"config.finetune.distillation_type={c.finetune.distillation_type!r} needs a teacher: set "
                        f"--config.finetune_teacher.source=<a fine-tune workdir or a .pth / .safetensors file>")
    if not c.model.dist_token:
      raise ConfigError(f"config.finetune.distillation_type={c.finetune.distillation_type!r} trains the student's "
                        f"distillation head: set --config.model.dist_token=True (or distillation_type='none')")
  if c.objective in ("eval", "linprobe") and not c.init:
    raise ConfigError(f"config.init is empty: objective {c.objective!r} needs weights to evaluate (a .pth / "
                      f".safetensors file or a tinymim-jax workdir)")
  for name, (kind, interval) in _ranges(tuple(c.teachers)).items():
    node = c
    for part in name.split("."):
      node = node[part]
    check_range(name, node, kind, interval)
  if c.total_steps is not None and c.warmup_steps is not None and c.warmup_steps > c.total_steps:
    raise ConfigError(f"config.warmup_steps={c.warmup_steps} is more than config.total_steps={c.total_steps}")
  if c.total_steps is None and c.warmup_steps is None and c.warmup_epochs > c.total_epochs:
    raise ConfigError(f"config.warmup_epochs={c.warmup_epochs} is more than config.total_epochs={c.total_epochs}")
  if c.keep_every_steps is not None and c.keep_every_steps % c.ckpt_every_steps:
    raise ConfigError(f"config.keep_every_steps={c.keep_every_steps} must be a multiple of "
                      f"config.ckpt_every_steps={c.ckpt_every_steps} (it keeps saved steps divisible by it)")
  from tinymim_jax.data import config as data_config  # no TF import
  try:
    data_config.resolve(c.data)
  except ValueError as e:
    raise ConfigError(f"config.{e}" if str(e).startswith("data.") else str(e)) from None
  c.lock()
  return c


def parse_arg(arg: str | None, **defaults):
  """'key=value,key2=value2' (the `:arg` of `--config file.py:arg`) -> ConfigDict with typed defaults.

  Values take the type of their default; a key without a default, or an unparsable value, is an error.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r} is not key=value (in {arg!r})")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} is not a boolean")
      out[key] = value.lower() in ("true", "1")
    elif default is None:
      out[key] = value
    else:
      try:
        out[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(f"config argument {key}={value!r}: expected {type(default).__name__}") from e
  return out
