"""MAE pretraining (He et al. 2022): an encoder and a decoder reconstruct the masked patches."""

from __future__ import annotations

from tinymim_jax import builders
from tinymim_jax import train_steps as ts
from tinymim_jax.models import MAE_PREFIX, create_model
from tinymim_jax.objectives import Objective, Setup, register
from tinymim_jax.objectives.common import setup_trained_model


class MaePretrain(Objective):
  name = "mae_pretrain"
  data_mode = "mae_pretrain"
  fixed = ("mae.decoder_*",)

  def build(self, config, *, num_classes=None, seed=None):
    """-> (the MAE: config.model's encoder, config.mae's decoder; no extra layers)."""
    del num_classes
    m = config.mae
    model = create_model(MAE_PREFIX + config.model.name, seed=config.seed if seed is None else seed, decoder=dict(
        embed_dim=m.decoder_embed_dim, depth=m.decoder_depth, num_heads=m.decoder_num_heads),
                         **builders.vit_kwargs(config.model))
    return model, {}

  def setup(self, config, info, *, total_steps: int, warmup_steps: int, is_main: bool) -> Setup:
    m = config.mae
    return setup_trained_model(
        self, config, info, total_steps=total_steps, warmup_steps=warmup_steps, is_main=is_main,
        make_step=lambda modeldef, _, tx, schedule: ts.make_mae_step(modeldef, tx, schedule, mask_ratio=m.mask_ratio,
                                                                     norm_pix=m.norm_pix))


register(MaePretrain())
