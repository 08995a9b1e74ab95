"""Fine-tuning on labels (MAE's main_finetune.py recipe: mixup / cutmix, label smoothing, layer decay)."""

from __future__ import annotations

from tinymim_jax import config_base
from tinymim_jax import train_steps as ts
from tinymim_jax.objectives import Objective, Setup, register
from tinymim_jax.objectives.common import setup_trained_model


def check_class_count(config, info, where: str) -> None:
  """config.model.num_classes (0: the data's) must be the data's class count."""
  if config.model.num_classes and config.model.num_classes != info.num_classes:
    raise config_base.ConfigError(
        f"config.model.num_classes={config.model.num_classes}, but the data ({where}) has {info.num_classes} "
        f"classes: set --config.model.num_classes={info.num_classes}, or 0 to take the data's count")


class Finetune(Objective):
  name = "finetune"
  data_mode = "finetune"

  def check_data(self, config, info, where: str) -> None:
    check_class_count(config, info, where)
    if info.num_classes < 2:
      raise config_base.ConfigError(f"fine-tuning needs at least 2 classes; the data ({where}) has "
                                    f"{info.num_classes}")

  def setup(self, config, info, *, total_steps: int, warmup_steps: int, is_main: bool) -> Setup:
    f = config.finetune

    def make_step(modeldef, _, tx, schedule):
      return ts.make_finetune_step(modeldef, tx, schedule, num_classes=info.num_classes, mixup=f.mixup,
                                   cutmix=f.cutmix, switch_prob=f.switch_prob, label_smoothing=f.label_smoothing)

    return setup_trained_model(self, config, info, total_steps=total_steps, warmup_steps=warmup_steps,
                               is_main=is_main, make_step=make_step)


register(Finetune())
