"""timm reference models with non-trivial random weights, shared by the parity and converter tests."""

import functools

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def timm_vit(shape, pooling="cls", num_classes=0, seed=0):
  """timm's ViT of this shape in MAE's configuration, with non-trivial random weights."""
  pool = dict(global_pool="token", fc_norm=False) if pooling == "cls" else dict(global_pool="avg", fc_norm=True)
  with torch.device("meta"):  # skip timm's (slow) init: every parameter is drawn below
    tm = VisionTransformer(**shape, mlp_ratio=4, qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
                           class_token=True, num_classes=num_classes, **pool)
  tm = tm.to_empty(device="cpu")
  randomize_(tm, seed)
  return tm.eval()


def randomize_(module, seed=0):
  """Every parameter at random, LayerNorms and biases included: with timm's 1 / 0 init a transposed or
  swapped one among those would go unnoticed."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.05, generator=gen)
      elif "norm" in name:
        p.normal_(1.0, 0.1, generator=gen)
      elif name in ("cls_token", "mask_token"):
        p.normal_(0.0, 0.5, generator=gen)
      else:  # Linear / conv weights, positional tables
        p.normal_(0.0, 0.02 if p.ndim < 4 else 0.05, generator=gen)
