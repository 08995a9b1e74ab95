"""Model zoo: the ViT family (teachers, students, classifiers) and MAE for pixel pretraining."""

from __future__ import annotations

from flax import nnx

from tinymim_jax.models.mae import MAE, DecoderConfig, random_masking
from tinymim_jax.models.vit import VARIANTS, Constant, ViT, ViTConfig, sincos_pos_embed, vit_config

MAE_PREFIX = "mae_"


def create_model(name: str, *, seed: int = 0, rngs: nnx.Rngs | None = None, decoder: dict | None = None,
                 **overrides):
  """Builds a model by name: a ViT variant ('vit_base_patch16', ...) or 'mae_<variant>' for MAE pretraining.

  overrides replace fields of the variant's ViTConfig (models/vit.py; an unknown field is a ValueError);
  `decoder` overrides DecoderConfig fields for MAE models (an MAE's decoder uses its encoder's dtype and
  param_dtype).
  """
  rngs = rngs if rngs is not None else nnx.Rngs(seed)
  if name.startswith(MAE_PREFIX):
    dec = DecoderConfig(**(decoder or {}))
    return MAE(vit_config(name[len(MAE_PREFIX):], **overrides), dec, rngs=rngs)
  if decoder:
    raise ValueError(f"`decoder` only applies to MAE models ('{MAE_PREFIX}<variant>'), not {name!r}")
  return ViT(vit_config(name, **overrides), rngs=rngs)


__all__ = ["MAE", "DecoderConfig", "random_masking", "VARIANTS", "Constant", "ViT", "ViTConfig",
           "sincos_pos_embed", "vit_config", "create_model"]
