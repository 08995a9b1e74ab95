"""MAE (He et al. 2022) in Flax NNX: a ViT encoder on the visible 25% of patches plus a light decoder.

Used for the scratch-MIM baseline and to pretrain teachers. Parameter names mirror facebookresearch/mae
(`encoder` holds the ViT; decoder_* / mask_token sit beside it) so the converter maps them one to one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tinymim_jax.models import vit as vit_lib


def random_masking(rng, batch: int, length: int, mask_ratio: float):
  """MAE's per-sample shuffle: argsort of uniform noise, keep the first int(L * (1 - ratio)).

  Returns ids_keep (B, L_keep), mask (B, L) with 1 = removed, ids_restore (B, L).
  """
  len_keep = int(length * (1 - mask_ratio))
  if len_keep < 1:
    raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {length}")
  noise = jax.random.uniform(rng, (batch, length), jnp.float32)  # the same masks with and without x64
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :len_keep]
  mask = jnp.take_along_axis((jnp.arange(length) >= len_keep).astype(jnp.float32)[None].repeat(batch, 0),
                             ids_restore, axis=1)
  return ids_keep, mask, ids_restore


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  embed_dim: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0


class MAE(nnx.Module):

  def __init__(self, encoder: vit_lib.ViTConfig, decoder: DecoderConfig, *, rngs: nnx.Rngs):
    if encoder.pooling != "cls" or encoder.num_classes:
      raise ValueError("the MAE encoder uses the pretraining layout: pooling='cls', num_classes=0")
    if encoder.reg_tokens:  # the decoder takes token 0 as the only prefix token (MAE has no registers)
      raise ValueError(f"MAE pretraining with register tokens (reg_tokens={encoder.reg_tokens}) is not supported: "
                       "MAE's encoder has the CLS token only; register tokens belong to distillation teachers")
    if encoder.dist_token or encoder.conv1x1_dim:
      raise ValueError("MAE pretraining takes a plain ViT encoder: dist_token and conv1x1_dim belong to the "
                       "distilled fine-tuning layout (set them at fine-tuning)")
    self.config = (encoder, decoder)
    self.encoder = vit_lib.ViT(encoder, rngs=rngs)
    # The decoder computes in the encoder's dtype and keeps its parameters in the encoder's param_dtype.
    d, p, dt, pdt = decoder.embed_dim, encoder.patch_size, encoder.dtype, encoder.param_dtype
    self.decoder_embed = nnx.Linear(encoder.embed_dim, d, dtype=dt, param_dtype=pdt,
                                    kernel_init=vit_lib.xavier_uniform, rngs=rngs)
    self.mask_token = nnx.Param(vit_lib.token_init(rngs.params(), (1, 1, d), pdt))
    self.decoder_pos_embed = vit_lib.Constant(jnp.asarray(vit_lib.sincos_pos_embed(d, self.encoder.grid), pdt))
    self.decoder_blocks = nnx.List([
        vit_lib.Block(d, decoder.num_heads, decoder.mlp_ratio, 0.0, dtype=dt, rngs=rngs, attention=encoder.attention,
                      param_dtype=pdt)
        for _ in range(decoder.depth)])
    self.decoder_norm = vit_lib.layer_norm(d, dt, rngs, pdt)
    self.decoder_pred = nnx.Linear(d, p * p * 3, dtype=dt, param_dtype=pdt, kernel_init=vit_lib.xavier_uniform,
                                   rngs=rngs)

  def __call__(self, images, *, rng, mask_ratio: float = 0.75):
    """Returns {'pred': (B, L, p*p*3) float32 (float64 for float64 compute), 'mask': (B, L) float32, 1 = masked,
    'latent': (B, 1+L_keep, D)}."""
    mask_rng, dp_rng = jax.random.split(rng)
    b, length = images.shape[0], self.encoder.grid ** 2
    ids_keep, mask, ids_restore = random_masking(mask_rng, b, length, mask_ratio)
    has_dp = any(blk.drop_path for blk in self.encoder.blocks)
    latent = self.encoder(images, keep_ids=ids_keep, rng=dp_rng if has_dp else None)["tokens"]
    x = self.decoder_embed(latent)
    masks = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, length + 1 - x.shape[1], x.shape[2]))
    x_ = jnp.take_along_axis(jnp.concatenate([x[:, 1:], masks], axis=1), ids_restore[..., None], axis=1)
    x = jnp.concatenate([x[:, :1], x_], axis=1) + self.decoder_pos_embed[...].astype(x.dtype)
    for blk in self.decoder_blocks:
      x, _ = blk(x)
    pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
    return {"pred": pred.astype(vit_lib.wide_dtype(pred.dtype)), "mask": mask, "latent": latent}
