"""UperNet on a ViT: the multi-scale adapter, UPerHead and the auxiliary FCNHead, as the TinyMIM / BEiT / MAE
segmentation code builds them (mmseg 0.11; docs/method.md section 10). Layout NHWC throughout.

  seg = Segmenter(backbone, SegmenterConfig(num_classes=150), rngs=nnx.Rngs(0))
  out = seg(images, train=False)                # images (B, H, W, 3), H = W = backbone img_size
  out['logits']      (B, H/4, W/4, num_classes)   UPerHead on the four adapter levels
  out['aux_logits']  (B, H/16, W/16, num_classes) FCNHead on level `aux_in_index` (stride 16)

The adapter (BEiT's fpn1..fpn4 in the backbone, for patch 16; any patch p divisible by 4 gives strides p/4..2p)
turns the (B, G, G, D) token maps of blocks
`out_indices` into strides 4, 8, 16, 32: fpn1 = ConvTranspose 2x2/2 -> BatchNorm -> GELU -> ConvTranspose 2x2/2,
fpn2 = ConvTranspose 2x2/2, fpn3 = identity, fpn4 = MaxPool 2x2/2.

adapter='tinymim_star' is TinyMIM*-T's (Segmentation/TinyMIMstar-T/backbone/mae.py): every level 4 D wide
(768 for D 192), fpn1 = ConvTranspose(D -> 2D) -> BatchNorm(2D) -> GELU -> ConvTranspose(2D -> 4D), fpn2 =
ConvTranspose(D -> 4D), fpn3 = Conv 1x1 (D -> 4D), and fpn4 = Conv 3x3 stride 2 padding 1 on the backbone's
conv1x1 output (LayerNorm -> Linear(D -> 1280) -> GELU on the last block's tokens; the backbone needs
conv1x1_dim > 0 and the last out index its last block).

Module names follow mmseg / BEiT; where a torch nn.Sequential index has no Flax equivalent the names map as
  fpn1.0 -> fpn1.deconv1, fpn1.1 -> fpn1.bn, fpn1.3 -> fpn1.deconv2, fpn2.0 -> fpn2.deconv,
  fpn3 -> fpn3, fpn4.0 -> fpn4 (tinymim_star),
  decode_head.psp_modules.{i}.1 -> decode_head.psp_modules.{i}, auxiliary_head.convs.{i} (the same).

BatchNorm is mmseg's SyncBN: in train mode the statistics are over the whole (global) batch, which is what a
BatchNorm computes under jax.jit over a sharded batch. Running statistics use torch's momentum 0.1 (Flax 0.9)
and eps 1e-5; Flax keeps the biased batch variance in the running average where torch keeps the unbiased one
(eval outputs differ only through that running average).

`train=True` uses batch statistics (and updates the running ones: split the nnx.BatchStat state out after the
call), drop path in the backbone and Dropout2d(0.1) before each classifier when an `rng` is given.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinymim_jax.models import vit as vit_lib


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
  """UperNet head sizes; defaults are the authors' ViT-B config (upernet_mae_base_12_512_slide_160k_ade20k)."""
  num_classes: int = 150
  out_indices: tuple[int, ...] = (4, 6, 8, 12)  # 1-based blocks (the authors' 0-based [3, 5, 7, 11])
  channels: int = 768                            # UPerHead channels
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)    # PPM output sizes on the stride-32 level
  aux_channels: int = 256                        # FCNHead channels (mmseg upernet.py base config)
  aux_in_index: int = 2                          # the adapter level the FCNHead reads (0-based: stride 16)
  aux_num_convs: int = 1
  dropout_ratio: float = 0.1                     # Dropout2d before each classifier
  adapter: str = "beit"                          # 'beit' (D wide levels) | 'tinymim_star' (4 D wide, see above)


def resize(x, size: Sequence[int]):
  """mmseg's resize(mode='bilinear', align_corners=False) on NHWC x: half-pixel centres, no antialiasing.

  (B, h, w, C) -> (B, size[0], size[1], C) in x's dtype; torch's F.interpolate semantics (edge samples clamp).
  """
  size = tuple(int(s) for s in size)
  if x.shape[1:3] == size:
    return x
  return jax.image.resize(x, (x.shape[0],) + size + (x.shape[-1],), "bilinear", antialias=False)


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) averaging weights of torch's AdaptiveAvgPool along one axis: bin i covers
  [floor(i n_in / n_out), ceil((i + 1) n_in / n_out))."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x, size: int):
  """torch nn.AdaptiveAvgPool2d(size) on NHWC x: (B, H, W, C) -> (B, size, size, C)."""
  ph = jnp.asarray(_adaptive_pool_matrix(x.shape[1], size), x.dtype)
  pw = jnp.asarray(_adaptive_pool_matrix(x.shape[2], size), x.dtype)
  return jnp.einsum("ih,jw,bhwc->bijc", ph, pw, x)


def _batch_norm(features, *, dtype, param_dtype, rngs):
  # use_fast_variance=False: E[(x - mean)^2], as torch (E[x^2] - mean^2 loses ~1e-4 in float32 here).
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


_kaiming_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # mmcv ConvModule init
_torch_default = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # torch conv default


class ConvModule(nnx.Module):
  """mmcv ConvModule with norm_cfg=SyncBN, act_cfg=ReLU: conv (no bias) -> BatchNorm -> ReLU, 'same' padding."""

  def __init__(self, cin: int, cout: int, kernel: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = nnx.Conv(cin, cout, (kernel, kernel), padding=kernel // 2, use_bias=False, dtype=dtype,
                         param_dtype=param_dtype, kernel_init=_kaiming_fan_out, rngs=rngs)
    self.bn = _batch_norm(cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, *, train: bool):
    return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))


def dropout2d(x, rate: float, rng):
  """torch nn.Dropout2d on NHWC: whole channels of a sample dropped, the rest scaled by 1 / (1 - rate);
  identity when rng is None or rate is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0], 1, 1, x.shape[-1]))
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class _DecodeHead(nnx.Module):
  """mmseg BaseDecodeHead's classifier: Dropout2d then a 1x1 conv_seg (normal(0, 0.01) init, zero bias)."""

  def _init_cls(self, channels, num_classes, dropout_ratio, *, dtype, param_dtype, rngs):
    self.dropout_ratio = dropout_ratio
    self.conv_seg = nnx.Conv(channels, num_classes, (1, 1), dtype=dtype, param_dtype=param_dtype,
                             kernel_init=jax.nn.initializers.normal(0.01), rngs=rngs)

  def cls_seg(self, x, rng):
    return self.conv_seg(dropout2d(x, self.dropout_ratio, rng))


class UPerHead(_DecodeHead):
  """mmseg UPerHead (Xiao et al., ECCV 2018): a pyramid pooling module on the coarsest level, an FPN top-down
  path, 3x3 convs, the four levels upsampled to the finest and concatenated, a 3x3 fpn_bottleneck, classifier.

  inputs: four NHWC maps, finest first, channels `in_channels`; -> (B, H0, W0, num_classes) at the finest size.
  """

  def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, *, pool_scales=(1, 2, 3, 6),
               dropout_ratio: float = 0.1, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pool_scales = tuple(pool_scales)
    self.psp_modules = nnx.List([ConvModule(in_channels[-1], channels, 1, **kw) for _ in self.pool_scales])
    self.bottleneck = ConvModule(in_channels[-1] + len(self.pool_scales) * channels, channels, 3, **kw)
    self.lateral_convs = nnx.List([ConvModule(c, channels, 1, **kw) for c in in_channels[:-1]])
    self.fpn_convs = nnx.List([ConvModule(channels, channels, 3, **kw) for _ in in_channels[:-1]])
    self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, **kw)
    self._init_cls(channels, num_classes, dropout_ratio, **kw)

  def psp_forward(self, x, *, train):
    outs = [x] + [resize(ppm(adaptive_avg_pool(x, s), train=train), x.shape[1:3])
                  for s, ppm in zip(self.pool_scales, self.psp_modules)]
    return self.bottleneck(jnp.concatenate(outs, axis=-1), train=train)

  def __call__(self, inputs: Sequence[Any], *, train: bool = False, rng=None):
    laterals = [conv(inputs[i], train=train) for i, conv in enumerate(self.lateral_convs)]
    laterals.append(self.psp_forward(inputs[-1], train=train))
    for i in range(len(laterals) - 1, 0, -1):  # top-down: each level gets the coarser one upsampled
      laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(laterals[i], train=train) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
    outs = [outs[0]] + [resize(o, outs[0].shape[1:3]) for o in outs[1:]]
    return self.cls_seg(self.fpn_bottleneck(jnp.concatenate(outs, axis=-1), train=train), rng)


class FCNHead(_DecodeHead):
  """mmseg FCNHead (Long et al., CVPR 2015) with concat_input=False: num_convs 3x3 ConvModules, classifier.
  (B, H, W, in_channels) -> (B, H, W, num_classes)."""

  def __init__(self, in_channels: int, channels: int, num_classes: int, *, num_convs: int = 1,
               dropout_ratio: float = 0.1, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.convs = nnx.List([ConvModule(in_channels if i == 0 else channels, channels, 3, **kw)
                           for i in range(num_convs)])
    self._init_cls(channels, num_classes, dropout_ratio, **kw)

  def __call__(self, x, *, train: bool = False, rng=None):
    for conv in self.convs:
      x = conv(x, train=train)
    return self.cls_seg(x, rng)


class Fpn1(nnx.Module):
  """Stride 4 from stride 16: ConvTranspose 2x2/2 -> BatchNorm -> GELU -> ConvTranspose 2x2/2 (BEiT's fpn1),
  dim -> mid -> out channels (BEiT: all D; TinyMIM*-T: D -> 2D -> 4D)."""

  def __init__(self, dim: int, mid: int | None = None, out: int | None = None, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    mid, out = mid or dim, out or dim
    self.deconv1 = _deconv2x2(dim, mid, **kw)
    self.bn = _batch_norm(mid, **kw)
    self.deconv2 = _deconv2x2(mid, out, **kw)

  def __call__(self, x, *, train: bool):
    return self.deconv2(vit_lib.gelu(self.bn(self.deconv1(x), use_running_average=not train)))


class Fpn2(nnx.Module):
  """Stride 8 from stride 16: one ConvTranspose 2x2/2 (BEiT's fpn2), dim -> out channels."""

  def __init__(self, dim: int, out: int | None = None, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.deconv = _deconv2x2(dim, out or dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, *, train: bool):
    del train
    return self.deconv(x)


def _deconv2x2(cin, cout, *, dtype, param_dtype, rngs):
  # transpose_kernel=True: the kernel is torch ConvTranspose2d's weight (in, out, kh, kw) transposed to
  # (kh, kw, out, in), no spatial flip (tests/models/test_segmentation.py).
  return nnx.ConvTranspose(cin, cout, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True, dtype=dtype,
                           param_dtype=param_dtype, kernel_init=_torch_default, rngs=rngs)


def max_pool2x2(x):
  """torch MaxPool2d(2, 2) on NHWC (odd sizes floor)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class Segmenter(nnx.Module):
  """ViT backbone + four-level adapter + UPerHead + auxiliary FCNHead (the authors' UperNet; docs/method.md section 10).

  Raises ValueError for a backbone whose patch size p is not a multiple of 4 (the adapter's levels are strides
  p/4, p/2, p, 2p: 4..32 for the paper's p = 16; the logits come at stride p/4), for
  `out_indices` that are not four blocks of the backbone, or an `aux_in_index` outside 0..3.
  """

  def __init__(self, backbone: vit_lib.ViT, config: SegmenterConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    bc = backbone.config
    if bc.patch_size % 4:
      raise ValueError(f"the segmentation adapter needs a patch size divisible by 4 (its levels are strides p/4, "
                       f"p/2, p, 2p), got patch {bc.patch_size}")
    if len(c.out_indices) != 4 or not all(1 <= i <= bc.depth for i in c.out_indices):
      raise ValueError(f"out_indices={tuple(c.out_indices)} must be four 1-based blocks in 1..{bc.depth}")
    if not 0 <= c.aux_in_index < 4:
      raise ValueError(f"aux_in_index={c.aux_in_index} must name an adapter level 0..3")
    d = bc.embed_dim
    kw = dict(dtype=bc.dtype, param_dtype=bc.param_dtype, rngs=rngs)
    self.backbone = backbone
    if c.adapter == "beit":
      width = d
      self.fpn1, self.fpn2 = Fpn1(d, **kw), Fpn2(d, **kw)
      self.fpn3 = self.fpn4 = None
    elif c.adapter == "tinymim_star":
      if not bc.conv1x1_dim or c.out_indices[-1] != bc.depth:
        raise ValueError(f"adapter='tinymim_star' reads the stride-32 level from the backbone's conv1x1 layer on its "
                         f"last block: it needs a backbone with conv1x1_dim > 0 (TinyMIM*-T: 1280, got "
                         f"{bc.conv1x1_dim}) and out_indices ending at block {bc.depth} (got {tuple(c.out_indices)})")
      width = 4 * d
      self.fpn1, self.fpn2 = Fpn1(d, 2 * d, width, **kw), Fpn2(d, width, **kw)
      self.fpn3 = nnx.Conv(d, width, (1, 1), kernel_init=_torch_default, **kw)
      self.fpn4 = nnx.Conv(bc.conv1x1_dim, width, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                           kernel_init=_torch_default, **kw)
    else:
      raise ValueError(f"adapter must be 'beit' or 'tinymim_star', got {c.adapter!r}")
    self.decode_head = UPerHead([width] * 4, c.channels, c.num_classes, pool_scales=c.pool_scales,
                                dropout_ratio=c.dropout_ratio, **kw)
    self.auxiliary_head = FCNHead(width, c.aux_channels, c.num_classes, num_convs=c.aux_num_convs,
                                  dropout_ratio=c.dropout_ratio, **kw)

  def features(self, images, *, train: bool = False, rng=None) -> list[Any]:
    """The adapter's four NHWC levels, strides 4, 8, 16, 32, each (B, ., ., embed_dim) ('beit') or
    (B, ., ., 4 embed_dim) ('tinymim_star')."""
    maps = self.backbone.feature_maps(images, self.config.out_indices, rng=rng)
    levels = [self.fpn1(maps[0], train=train), self.fpn2(maps[1], train=train)]
    if self.fpn3 is None:
      return levels + [maps[2], max_pool2x2(maps[3])]
    # conv1x1 acts per token, so on the patch tokens alone it is the authors' layer on all tokens, then sliced.
    return levels + [self.fpn3(maps[2]), self.fpn4(self.backbone.conv1x1(maps[3]))]

  def __call__(self, images, *, train: bool = False, rng=None) -> dict[str, Any]:
    """images (B, H, W, 3) normalised float -> {'logits' (B, H/4, W/4, C), 'aux_logits' (B, H/16, W/16, C)} in
    the backbone's compute dtype. `rng` (train only) enables drop path and dropout."""
    r_backbone = r_decode = r_aux = None
    if train and rng is not None:
      r_backbone, r_decode, r_aux = jax.random.split(rng, 3)
    levels = self.features(images, train=train, rng=r_backbone)
    return {"logits": self.decode_head(levels, train=train, rng=r_decode),
            "aux_logits": self.auxiliary_head(levels[self.config.aux_in_index], train=train, rng=r_aux)}
