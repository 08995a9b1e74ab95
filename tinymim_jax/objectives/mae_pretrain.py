"""MAE pretraining (He et al. 2022): an encoder and a decoder reconstruct the masked patches."""

from __future__ import annotations

from tinymim_jax import train_steps as ts
from tinymim_jax.objectives import Objective, Setup, register
from tinymim_jax.objectives.common import setup_trained_model


class MaePretrain(Objective):
  name = "mae_pretrain"
  data_mode = "mae_pretrain"
  fixed = ("mae.decoder_*",)

  def setup(self, config, info, *, total_steps: int, warmup_steps: int, is_main: bool) -> Setup:
    m = config.mae
    return setup_trained_model(
        config, info, total_steps=total_steps, warmup_steps=warmup_steps, is_main=is_main,
        make_step=lambda modeldef, _, tx, schedule: ts.make_mae_step(modeldef, tx, schedule, mask_ratio=m.mask_ratio,
                                                                     norm_pix=m.norm_pix))


register(MaePretrain())
