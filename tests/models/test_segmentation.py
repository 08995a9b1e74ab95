"""UperNet (adapter, UPerHead, FCNHead) against a PyTorch re-derivation of the mmseg 0.11 / BEiT definitions
written here (mmseg/models/decode_heads/{uper_head,psp_head,fcn_head,decode_head}.py, mmcv ConvModule, BEiT's
semantic_segmentation/backbone/beit.py fpn1..fpn4), with the same weights, in train and eval mode."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx, traverse_util
from torch import nn

from tinymim_jax import create_model
from tinymim_jax.models import segmentation as seg_lib

D, CH, AUX, NC = 32, 16, 8, 5
BACKBONE = dict(img_size=128, patch_size=16, embed_dim=D, depth=4, num_heads=2)
CFG = seg_lib.SegmenterConfig(num_classes=NC, out_indices=(1, 2, 3, 4), channels=CH, aux_channels=AUX)


# ------------------------------------------------------------------------------------------------------------
# The PyTorch re-derivation (mmseg names).
# ------------------------------------------------------------------------------------------------------------
class TConvModule(nn.Module):
  def __init__(self, cin, cout, k):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    self.bn = nn.BatchNorm2d(cout)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def t_resize(x, size):
  return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class TUPerHead(nn.Module):
  def __init__(self, cin, ch, nc, scales=(1, 2, 3, 6), drop=0.1):
    super().__init__()
    self.psp_modules = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), TConvModule(cin[-1], ch, 1))
                                      for s in scales])
    self.bottleneck = TConvModule(cin[-1] + len(scales) * ch, ch, 3)
    self.lateral_convs = nn.ModuleList([TConvModule(c, ch, 1) for c in cin[:-1]])
    self.fpn_convs = nn.ModuleList([TConvModule(ch, ch, 3) for _ in cin[:-1]])
    self.fpn_bottleneck = TConvModule(len(cin) * ch, ch, 3)
    self.dropout = nn.Dropout2d(drop)
    self.conv_seg = nn.Conv2d(ch, nc, 1)

  def forward(self, inputs):
    x = inputs[-1]
    psp = self.bottleneck(torch.cat([x] + [t_resize(m(x), x.shape[2:]) for m in self.psp_modules], 1))
    laterals = [c(inputs[i]) for i, c in enumerate(self.lateral_convs)] + [psp]
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + t_resize(laterals[i], laterals[i - 1].shape[2:])
    outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
    for i in range(len(outs) - 1, 0, -1):
      outs[i] = t_resize(outs[i], outs[0].shape[2:])
    return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, 1))))


class TFCNHead(nn.Module):
  def __init__(self, cin, ch, nc, drop=0.1):
    super().__init__()
    self.convs = nn.Sequential(TConvModule(cin, ch, 3))
    self.dropout = nn.Dropout2d(drop)
    self.conv_seg = nn.Conv2d(ch, nc, 1)

  def forward(self, x):
    return self.conv_seg(self.dropout(self.convs(x)))


class TUperNet(nn.Module):
  """BEiT's fpn1..fpn4 on the four block outputs (NCHW), decode head, auxiliary head on level 2."""

  def __init__(self, drop=0.1):
    super().__init__()
    self.fpn1 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2), nn.BatchNorm2d(D), nn.GELU(),
                              nn.ConvTranspose2d(D, D, 2, 2))
    self.fpn2 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2))
    self.fpn3 = nn.Identity()
    self.fpn4 = nn.MaxPool2d(2, 2)
    self.decode_head = TUPerHead([D] * 4, CH, NC, drop=drop)
    self.auxiliary_head = TFCNHead(D, AUX, NC, drop=drop)

  def forward(self, maps):
    levels = [op(m) for op, m in zip([self.fpn1, self.fpn2, self.fpn3, self.fpn4], maps)]
    return self.decode_head(levels), self.auxiliary_head(levels[2])


C1 = 24  # the conv1x1 width (TinyMIM*-T: 1280)


class TStarUperNet(TUperNet):
  """TinyMIM*-T's adapter (Segmentation/TinyMIMstar-T/backbone/mae.py, patch 16 branch; SyncBN as BatchNorm2d,
  the batch being one process's): levels 4 D wide, fpn4 a 3x3 stride-2 conv on conv1x1 of the last block."""

  def __init__(self, drop=0.1):
    super().__init__(drop)
    self.fpn1 = nn.Sequential(nn.ConvTranspose2d(D, D * 2, 2, 2), nn.BatchNorm2d(D * 2), nn.GELU(),
                              nn.ConvTranspose2d(D * 2, D * 4, 2, 2))
    self.fpn2 = nn.Sequential(nn.ConvTranspose2d(D, D * 4, 2, 2))
    self.fpn3 = nn.Conv2d(D, D * 4, kernel_size=1)
    self.fpn4 = nn.Sequential(nn.Conv2d(C1, D * 4, kernel_size=3, padding=1, stride=2))
    self.decode_head = TUPerHead([D * 4] * 4, CH, NC, drop=drop)
    self.auxiliary_head = TFCNHead(D * 4, AUX, NC, drop=drop)
    self.conv1x1 = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, C1), nn.GELU())  # torch's eps 1e-5

  def forward(self, maps):
    last = self.conv1x1(maps[3].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # per token, NCHW back
    return super().forward(list(maps[:3]) + [last])


# ------------------------------------------------------------------------------------------------------------
# Weights torch -> ours.
# ------------------------------------------------------------------------------------------------------------
_RENAME = {"fpn1.0": "fpn1.deconv1", "fpn1.1": "fpn1.bn", "fpn1.3": "fpn1.deconv2", "fpn2.0": "fpn2.deconv",
           "fpn4.0": "fpn4", "conv1x1.0": "backbone.conv1x1.norm", "conv1x1.1": "backbone.conv1x1.fc"}
_LEAF = {"running_mean": "mean", "running_var": "var"}


def our_path(name, ndim):
  for old, new in _RENAME.items():
    if name.startswith(old + "."):
      name = new + name[len(old):]
  name = re.sub(r"psp_modules\.(\d+)\.1\.", r"psp_modules.\1.", name)  # psp_modules.i.1: the conv after the pool
  *mod, leaf = name.split(".")
  if leaf == "weight":
    leaf = "kernel" if ndim in (2, 4) and not mod[-1] == "norm" else "scale"
  return tuple(int(p) if p.isdigit() else p for p in mod) + (_LEAF.get(leaf, leaf),)


def load(model, tmodel):
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
  done = set()
  for name, v in tmodel.state_dict().items():
    if name.endswith("num_batches_tracked"):
      continue
    path = our_path(name, v.ndim)
    x = v.detach().numpy()
    # Conv (O, I, kh, kw) and ConvTranspose (I, O, kh, kw) both go to (kh, kw, I, O) / (kh, kw, O, I): the
    # same transpose (transpose_kernel=True keeps torch's order, no flip).
    x = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T if x.ndim == 2 else x
    assert path in flat, f"{name} -> {path} not in our model"
    assert flat[path].shape == x.shape, (name, flat[path].shape, x.shape)
    flat[path] = jnp.asarray(x)
    done.add(path)
  missing = {p for p in flat if p[0] != "backbone"} - done
  assert not missing, missing
  nnx.update(model, traverse_util.unflatten_dict(flat))


def randomize(tmodel, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in tmodel.named_parameters():
      p.normal_(1.0 if name.endswith("bn.weight") or name == "fpn1.1.weight" else 0.0, 0.3, generator=gen)
    for name, b in tmodel.named_buffers():
      if name.endswith("running_mean"):
        b.normal_(0.0, 0.3, generator=gen)
      elif name.endswith("running_var"):
        b.uniform_(0.5, 2.0, generator=gen)


@functools.lru_cache(maxsize=None)
def case(adapter="beit"):
  torch.manual_seed(0)
  star = adapter == "tinymim_star"
  tmodel = (TStarUperNet if star else TUperNet)(drop=0.0)
  randomize(tmodel, 1)
  backbone = create_model("vit_tiny_patch16", **BACKBONE, **(dict(conv1x1_dim=C1) if star else {}))
  model = seg_lib.Segmenter(backbone, dataclasses.replace(CFG, adapter=adapter), rngs=nnx.Rngs(0))
  load(model, tmodel)
  images = np.random.RandomState(0).randn(2, 128, 128, 3).astype(np.float32)
  return model, tmodel, images


@functools.partial(nnx.jit, static_argnames="train")
def run(model, images, train):
  maps = model.backbone.feature_maps(images, model.config.out_indices)
  return maps, model(images, train=train)


def to_t(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def close(ours, ref, tol=1e-5):
  ours, ref = np.asarray(ours), ref.detach().numpy().transpose(0, 2, 3, 1)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  err = np.max(np.abs(ours - ref))
  assert err <= tol * max(1.0, np.max(np.abs(ref))), f"max abs err {err:.3g}, ref max {np.max(np.abs(ref)):.3g}"


@pytest.mark.parametrize("adapter", ["beit", "tinymim_star"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_mmseg_rederivation(train, adapter):
  model, tmodel, images = case(adapter)
  model = nnx.clone(model)
  maps, out = run(model, images, train)
  tmodel = tmodel.train(train)
  with torch.no_grad():
    ref_logits, ref_aux = tmodel([to_t(m) for m in maps])
  assert out["logits"].shape == (2, 32, 32, NC) and out["aux_logits"].shape == (2, 8, 8, NC)
  close(out["logits"], ref_logits)
  close(out["aux_logits"], ref_aux)
  if train:  # running means follow torch's momentum 0.1 update with the (global) batch mean
    np.testing.assert_allclose(np.asarray(model.fpn1.bn.mean[...]), tmodel.fpn1[1].running_mean.numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.decode_head.bottleneck.bn.mean[...]),
                               tmodel.decode_head.bottleneck.bn.running_mean.numpy(), atol=1e-5)
  tmodel.eval()
  case.cache_clear() if train else None
  if adapter == "tinymim_star":  # every level 4 D wide, the stride-32 one from conv1x1's 24 channels
    levels = nnx.jit(lambda m, x: m.features(x))(model, images)
    assert [l.shape for l in levels] == [(2, 32, 32, 4 * D), (2, 16, 16, 4 * D), (2, 8, 8, 4 * D),
                                         (2, 4, 4, 4 * D)]


def test_batch_norm_is_global_under_sharding():
  """SyncBN: the 8-device sharded train forward equals the single-device one (batch statistics of the global
  batch, not of each shard)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  model, _, images = case()
  images = np.concatenate([images] * 4)  # 8 samples, one per device
  graphdef, state = nnx.split(nnx.clone(model))
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=True)["logits"])
  single = fwd(state, images)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = fwd(state, jax.device_put(images, NamedSharding(mesh, P("data"))))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)
  # ... and differs from statistics over one shard's samples (the test can tell the two apart)
  half = fwd(state, images[:1])
  assert np.max(np.abs(np.asarray(half[0]) - np.asarray(single[0]))) > 1e-3


def test_dropout_and_adaptive_pool():
  x = jnp.ones((2, 3, 3, 64))
  y = seg_lib.dropout2d(x, 0.5, jax.random.key(0))
  per_channel = np.asarray(y).reshape(2, 9, 64)
  assert np.all(per_channel.min(1) == per_channel.max(1))  # whole channels kept or dropped
  assert set(np.unique(per_channel)) == {0.0, 2.0}
  z = np.random.RandomState(0).randn(1, 5, 7, 2).astype(np.float32)
  for s in (1, 2, 3, 6):
    ref = nn.AdaptiveAvgPool2d(s)(torch.from_numpy(z.transpose(0, 3, 1, 2).copy()))
    close(seg_lib.adaptive_avg_pool(jnp.asarray(z), s), ref)


def test_config_errors():
  vit = create_model("vit_tiny_patch16", **BACKBONE)
  with pytest.raises(ValueError, match="four 1-based blocks"):
    seg_lib.Segmenter(vit, seg_lib.SegmenterConfig(out_indices=(1, 2, 9, 4)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="conv1x1_dim > 0"):  # T*'s adapter without its conv1x1 layer
    seg_lib.Segmenter(vit, dataclasses.replace(CFG, adapter="tinymim_star"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="ending at block 4"):
    seg_lib.Segmenter(create_model("vit_tiny_patch16", **BACKBONE, conv1x1_dim=C1),
                      dataclasses.replace(CFG, adapter="tinymim_star", out_indices=(1, 2, 3, 3)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="adapter must be"):
    seg_lib.Segmenter(vit, dataclasses.replace(CFG, adapter="vitdet"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible by 4"):
    seg_lib.Segmenter(create_model("vit_tiny_patch16", img_size=36, patch_size=6, embed_dim=D, depth=4,
                                   num_heads=2), CFG, rngs=nnx.Rngs(0))
