"""Segment losses, metrics, slide inference, layer decay and schedule against re-derivations (torch, numpy)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tinymim_jax import create_model, optim as optim_lib, sharding as sh
from tinymim_jax.objectives import segment
from tinymim_jax.models import segmentation as seg_lib
from tinymim_jax.objectives.segment import inference


# ------------------------------------------------------------------------------------------------------------
# Loss: torch's F.interpolate + F.cross_entropy(reduction='none', ignore_index), then mmseg's reductions.
# ------------------------------------------------------------------------------------------------------------
def labels_with_ignore(rng, shape, c):
  lab = rng.randint(0, c, shape)
  lab[rng.rand(*shape) < 0.3] = 255
  return lab


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_loss_matches_torch(avg_non_ignore):
  rng = np.random.RandomState(0)
  out = {"logits": rng.randn(2, 4, 4, 5).astype(np.float32), "aux_logits": rng.randn(2, 2, 2, 5).astype(np.float32)}
  labels = labels_with_ignore(rng, (2, 16, 16), 5)
  loss, parts = segment.segment_loss({k: jnp.asarray(v) for k, v in out.items()}, jnp.asarray(labels),
                                     avg_non_ignore=avg_non_ignore)
  t_lab = torch.from_numpy(labels)
  ref = {}
  for key in ("logits", "aux_logits"):
    t = F.interpolate(torch.from_numpy(out[key].transpose(0, 3, 1, 2).copy()), size=(16, 16), mode="bilinear",
                      align_corners=False)
    per_pixel = F.cross_entropy(t, t_lab, reduction="none", ignore_index=255)
    ref[key] = (per_pixel.sum() / (t_lab != 255).sum()).item() if avg_non_ignore else per_pixel.mean().item()
  np.testing.assert_allclose(float(parts["loss_decode"]), ref["logits"], rtol=1e-5)
  np.testing.assert_allclose(float(parts["loss_aux"]), ref["aux_logits"], rtol=1e-5)
  np.testing.assert_allclose(float(loss), ref["logits"] + 0.4 * ref["aux_logits"], rtol=1e-5)


def test_loss_padded_samples_count_nothing():
  rng = np.random.RandomState(1)
  logits, labels = rng.randn(3, 8, 8, 4).astype(np.float32), labels_with_ignore(rng, (3, 8, 8), 4)
  full = segment.cross_entropy(logits[:2], labels[:2])
  padded = segment.cross_entropy(logits, labels, valid=jnp.array([True, True, False]))
  np.testing.assert_allclose(float(padded), float(full), rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Metrics: mmseg's intersect_and_union / total_area_to_metrics re-derived in numpy.
# ------------------------------------------------------------------------------------------------------------
def np_areas(pred, label, c, ignore=255):
  mask = label != ignore
  pred, label = pred[mask], label[mask]
  inter = pred[pred == label]
  hist = lambda x: np.histogram(x, bins=c, range=(0, c - 1))[0]  # torch.histc(bins=c, min=0, max=c-1)
  a_i, a_p, a_l = hist(inter), hist(pred), hist(label)
  return a_i, a_p + a_l - a_i, a_p, a_l


def np_metrics(a_i, a_u, a_l):
  with np.errstate(invalid="ignore"):
    iou, acc = a_i / a_u, a_i / a_l  # NaN where 0 / 0
  return np.nanmean(iou), np.nanmean(acc), a_i.sum() / a_l.sum(), iou


@pytest.fixture(scope="module")
def val_set():
  """Three batches of 4; class 5 of 7 never appears (absent: excluded), class 6 only predicted (IoU 0)."""
  rng = np.random.RandomState(2)
  batches = []
  for _ in range(3):
    label = labels_with_ignore(rng, (4, 6, 6), 5)
    pred = np.where(rng.rand(4, 6, 6) < 0.6, np.where(label == 255, 0, label), rng.randint(0, 5, (4, 6, 6)))
    pred[0, 0, :2] = 6
    batches.append((pred, label))
  return batches


def test_metrics_match_mmseg_rederivation(val_set):
  total = np.zeros((4, 7), np.int64)
  ref = [np.zeros(7, np.int64) for _ in range(4)]
  for pred, label in val_set:
    total += np.asarray(segment.intersect_and_union(jnp.asarray(pred), jnp.asarray(label), 7))
    for acc, a in zip(ref, np_areas(pred.reshape(-1), label.reshape(-1), 7)):
      acc += a
  np.testing.assert_array_equal(total, np.stack(ref))
  m = segment.area_metrics(total)
  miou, macc, aacc, iou = np_metrics(ref[0], ref[1], ref[3])
  assert np.isnan(m["IoU"][5]) and m["IoU"][6] == 0  # absent class excluded; predicted-only class counts 0
  np.testing.assert_allclose([m["mIoU"], m["mAcc"], m["aAcc"]], [miou, macc, aacc], rtol=1e-12)
  np.testing.assert_allclose(m["IoU"], iou, rtol=1e-12)


def test_metrics_padded_batch_and_shards(val_set):
  pred = np.concatenate([p for p, _ in val_set])[:10]  # 10 real samples padded to 16 for 8 devices
  label = np.concatenate([l for _, l in val_set])[:10]
  ref = np.stack(np_areas(pred.reshape(-1), label.reshape(-1), 7))
  pad = lambda x: np.concatenate([x, np.full((6,) + x.shape[1:], 3, x.dtype)])  # padding would count if used
  valid = np.arange(16) < 10
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  fn = jax.jit(lambda p, l, v: segment.intersect_and_union(p, l, 7, valid=v))
  np.testing.assert_array_equal(np.asarray(fn(put(pad(pred)), put(pad(label)), put(valid))), ref)
  assert not np.array_equal(np.asarray(fn(pad(pred), pad(label), np.ones(16, bool))), ref)


# ------------------------------------------------------------------------------------------------------------
# Slide inference.
# ------------------------------------------------------------------------------------------------------------
def window_forward(x):
  """A stand-in model whose output depends on the window it sees (its mean), at 1/4 resolution."""
  small = jax.image.resize(x, (x.shape[0], x.shape[1] // 4, x.shape[2] // 4, 3), "linear", antialias=False)
  return small * 2.0 + jnp.mean(x, axis=(1, 2, 3), keepdims=True)


def np_slide(img, crop, stride):
  """mmseg 0.11 EncoderDecoder.slide_inference, in numpy, with window_forward."""
  b, h, w, _ = img.shape
  preds, count = np.zeros((b, h, w, 3)), np.zeros((1, h, w, 1))
  for hi in range(max(h - crop + stride - 1, 0) // stride + 1):
    for wi in range(max(w - crop + stride - 1, 0) // stride + 1):
      y2, x2 = min(hi * stride + crop, h), min(wi * stride + crop, w)
      y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
      out = seg_lib.resize(window_forward(jnp.asarray(img[:, y1:y2, x1:x2])), (y2 - y1, x2 - x1))
      preds[:, y1:y2, x1:x2] += np.asarray(out)
      count[:, y1:y2, x1:x2] += 1
  return preds / count


def test_slide_matches_mmseg_loop():
  img = np.random.RandomState(3).randn(2, 40, 56, 3).astype(np.float32)
  out = jax.jit(lambda x: segment.slide_inference(window_forward, x, crop=16, stride=11))(img)
  ref = np_slide(img, 16, 11)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  assert inference.window_starts(40, 16, 11) == [0, 11, 22, 24]
  resized = segment.slide_inference(window_forward, img, crop=16, stride=11, out_size=(20, 28))
  np.testing.assert_allclose(np.asarray(resized), np.asarray(seg_lib.resize(jnp.asarray(ref, jnp.float32),
                                                                            (20, 28))), atol=1e-5)


def test_slide_areas_compiles_one_forward_and_equals_the_one_jit_path():
  """inference.slide_areas (windows in fixed groups, host-driven) gives the areas of jitting slide_inference +
  intersect_and_union on the batch, for sizes needing 12 windows per image (24: groups of 5, the last one
  zero-filled), one window, and an image smaller than the crop; its forward compiles once for all of them."""
  rng = np.random.RandomState(5)
  calls = []
  fwd = jax.jit(lambda w: seg_lib.resize(window_forward(w), (16, 16)))

  def window_logits(windows):
    calls.append(windows.shape)
    return fwd(windows)

  for shape, label_shape in (((2, 40, 30, 3), (50, 37)), ((3, 16, 16, 3), (16, 16)), ((1, 12, 20, 3), (9, 20))):
    img = rng.randn(*shape).astype(np.float32)
    labels = labels_with_ignore(rng, (shape[0],) + label_shape, 3).astype(np.int32)
    valid = np.arange(shape[0]) < max(shape[0] - 1, 1)  # the last of a batch padded (counts nothing)
    ref = jax.jit(lambda x, y, v: segment.intersect_and_union(jnp.argmax(segment.slide_inference(
        window_forward, x, crop=16, stride=11, out_size=y.shape[1:3]), axis=-1), y, 3, valid=v))(img, labels, valid)
    got = inference.slide_areas(window_logits, img, labels, crop=16, stride=11, num_classes=3, chunk=5, valid=valid)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert np.asarray(got)[3].sum() == np.sum((labels != 255) & valid[:, None, None])
  assert set(calls) == {(5, 16, 16, 3)} and len(calls) == 5 + 1 + 1 and fwd._cache_size() == 1  # 24, 3, 2 windows


def test_slide_one_window_equals_whole_image_forward():
  backbone = create_model("vit_tiny_patch16", img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2)
  model = seg_lib.Segmenter(backbone, seg_lib.SegmenterConfig(num_classes=3, out_indices=(1, 2, 3, 4), channels=8,
                                                              aux_channels=4), rngs=nnx.Rngs(0))
  img = np.random.RandomState(4).randn(2, 64, 64, 3).astype(np.float32)
  fwd = lambda x: model(x)["logits"]
  slid = segment.slide_inference(fwd, img, crop=64, stride=43, out_size=(100, 90))
  whole = seg_lib.resize(seg_lib.resize(fwd(img), (64, 64)), (100, 90))
  np.testing.assert_array_equal(np.asarray(slid), np.asarray(whole))
  # An image smaller than the crop is padded, and the padding's logits are cut away.
  small = segment.slide_inference(fwd, img[:, :50, :60], crop=64, stride=43)
  assert small.shape == (2, 50, 60, 3)


# ------------------------------------------------------------------------------------------------------------
# Layer-wise lr decay (BEiT's LayerDecayOptimizerConstructor) and the schedule (mmcv).
# ------------------------------------------------------------------------------------------------------------
def beit_layer_id(var_name, num_max_layer):
  """BEiT semantic_segmentation mmcv_custom/layer_decay_optimizer_constructor.get_num_layer_for_vit."""
  if var_name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
    return 0
  elif var_name.startswith("backbone.patch_embed"):
    return 0
  elif var_name.startswith("backbone.blocks"):
    layer_id = int(var_name.split('.')[2])
    return layer_id + 1
  else:
    return num_max_layer - 1


@pytest.mark.parametrize("star", [False, True], ids=["vit", "tinymim_star"])
def test_layer_decay_table_matches_authors_rule(star):
  """TinyMIM*-T: its dist_token and conv1x1 fall in the rule's last group (scale 1), unlike MAE's fine-tuning."""
  depth = 4
  extra = dict(dist_token=True, conv1x1_dim=16) if star else {}
  backbone = create_model("vit_tiny_patch16", img_size=64, patch_size=16, embed_dim=32, depth=depth, num_heads=2,
                          use_rel_pos_bias=True, init_values=1.0, pos_embed="learn", **extra)
  model = seg_lib.Segmenter(backbone, seg_lib.SegmenterConfig(num_classes=3, out_indices=(1, 2, 3, 4), channels=8,
                                                              aux_channels=4,
                                                              adapter="tinymim_star" if star else "beit"),
                            rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  table = segment.lr_scales(params, 0.75, depth)
  num_layers = depth + 2  # paramwise_cfg num_layers + 2
  names = jax.tree.leaves(optim_lib.param_names(params))
  for name, scale in zip(names, jax.tree.leaves(table)):
    torch_name = re.sub(r"/(\d+)/", r".\1.", name.replace("/", ".")).replace("backbone.patch_embed.kernel",
                                                                            "backbone.patch_embed.proj.weight")
    assert scale == 0.75 ** (num_layers - beit_layer_id(torch_name, num_layers) - 1), name
  last_group = ("backbone/norm/", "backbone/dist_token", "backbone/conv1x1/")
  assert {n for n, s in zip(names, jax.tree.leaves(table)) if s == 1.0} == {n for n in names
                                                                            if not n.startswith("backbone/")
                                                                            or n.startswith(last_group)}
  assert star == ("backbone/dist_token" in names and "fpn4/kernel" in names)
  # The optimizer applies it: one SGD-like step's relative size per layer (Adam normalises the gradient).
  sched = segment.warmup_poly_schedule(lr=1e-3, total_steps=10, warmup_steps=0)
  tx = segment.make_optimizer(params, schedule=sched, depth=depth, weight_decay=0.0)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name, u, scale in zip(names, jax.tree.leaves(updates), jax.tree.leaves(table)):
    np.testing.assert_allclose(np.asarray(u), -1e-3 * scale, rtol=1e-4, err_msg=name)


def test_weight_decay_as_the_authors():
  """ndim > 1 decayed (pos_embed, cls_token and the bias tables too: the authors' name check misses them)."""
  backbone = create_model("vit_tiny_patch16", img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                          use_rel_pos_bias=True, pos_embed="learn")
  params = nnx.to_pure_dict(nnx.state(backbone, nnx.Param))
  params = {"backbone": params}
  tx = segment.make_optimizer(params, schedule=lambda s: 1.0, depth=1, layer_decay=1.0, weight_decay=0.5)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for name, u, p in zip(jax.tree.leaves(optim_lib.param_names(params)), jax.tree.leaves(updates),
                        jax.tree.leaves(params)):
    expect = -0.5 * np.asarray(p) if p.ndim > 1 else np.zeros_like(p)
    np.testing.assert_allclose(np.asarray(u), expect, rtol=1e-6, atol=1e-12, err_msg=name)


def test_warmup_poly_schedule_matches_mmcv():
  lr, total, warm, ratio = 1e-4, 100, 15, 1e-6
  sched = segment.warmup_poly_schedule(lr=lr, total_steps=total, warmup_steps=warm, warmup_ratio=ratio)
  for it in [0, 1, 7, 14, 15, 16, 50, 99, 100, 120]:
    regular = (lr - 0.0) * (1 - min(it, total) / total) ** 1.0 + 0.0  # PolyLrUpdaterHook.get_lr
    if it < warm:  # LrUpdaterHook.get_warmup_lr, 'linear'
      k = (1 - it / warm) * (1 - ratio)
      regular = regular * (1 - k)
    np.testing.assert_allclose(float(sched(it)), regular, rtol=1e-5, atol=1e-12, err_msg=str(it))
  with pytest.raises(ValueError, match="warmup_steps"):
    segment.warmup_poly_schedule(lr=1.0, total_steps=10, warmup_steps=11)
