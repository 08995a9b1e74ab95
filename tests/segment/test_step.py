"""The segment train step: sharded (data x fsdp) == single device, what moves, learning, NaN guard, eval fn."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers.steps import run
from tinymim_jax import create_model, sharding as sh
from tinymim_jax.objectives import segment
from tinymim_jax.models import segmentation as seg_lib

NC = 3


def tiny_model():
  backbone = create_model("vit_tiny_patch16", img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                          use_rel_pos_bias=True, init_values=1.0, pos_embed="learn", drop_path=0.1)
  return seg_lib.Segmenter(backbone, seg_lib.SegmenterConfig(num_classes=NC, out_indices=(1, 1, 2, 2), channels=8,
                                                             aux_channels=4), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def setup():
  model = tiny_model()
  sched = segment.warmup_poly_schedule(lr=1e-3, total_steps=20, warmup_steps=2)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = segment.make_optimizer(params, schedule=sched, depth=2, layer_decay=0.75)
  graphdef, state = segment.init_state(model, tx)
  rng = np.random.RandomState(0)
  label = np.zeros((8, 32, 32), np.int32)  # a learnable task: class = which third of the image (by column)
  label[:, :, 11:22], label[:, :, 22:] = 1, 2
  label[:, :4] = 255
  images = rng.randn(8, 32, 32, 3).astype(np.float32) * 0.1 + (label[..., None] % 255) * 0.5
  batch = {"image": images, "label": label}
  step_fn = segment.make_train_step(graphdef, tx, sched)
  return graphdef, state, batch, step_fn


def test_sharded_equals_single_device_and_learns(setup):
  graphdef, state0, batch, step_fn = setup
  ref, ref_m = run(step_fn, state0, batch, 6, sh.make_mesh(devices=jax.devices()[:1]), key=jax.random.key(1))
  got, got_m = run(step_fn, state0, batch, 6, sh.make_mesh(fsdp=2), key=jax.random.key(1))
  for a, b in zip(ref_m, got_m):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
  names = jax.tree.leaves(sh.optim.param_names(ref["params"]))
  for name, x, y in zip(names, jax.tree.leaves(ref["params"]), jax.tree.leaves(got["params"])):
    if name.endswith("attn/qkv/bias"):
      # The key bias's true gradient is exactly zero (softmax is shift invariant per query row): its float32
      # gradient is rounding noise that Adam turns into lr-sized steps (as in tests/test_train_steps.py).
      d = x.shape[0] // 3
      np.testing.assert_allclose(y[d:2 * d], x[d:2 * d], atol=1e-4, err_msg=name)
      x, y = np.concatenate([x[:d], x[2 * d:]]), np.concatenate([y[:d], y[2 * d:]])
    # Likewise the adapter's deconvolution biases: a per-channel constant in front of a train-mode BatchNorm
    # (fpn1's own, or a 1x1 lateral conv's), whose batch mean removes it.
    loose = name in ("fpn1/deconv1/bias", "fpn1/deconv2/bias", "fpn2/deconv/bias")
    np.testing.assert_allclose(y, x, atol=1e-4 if loose else 2e-6, rtol=1e-4, err_msg=name)
  for x, y in zip(jax.tree.leaves(ref["batch_stats"]), jax.tree.leaves(got["batch_stats"])):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)
  losses = [float(m["loss"]) for m in ref_m]
  assert losses[-1] < losses[0], losses
  assert int(ref["step"]) == 6 and all(int(m["nonfinite"]) == 0 for m in ref_m)
  np.testing.assert_allclose(ref_m[0]["lr"], 1e-3 * 1e-6, rtol=1e-4)  # warmup starts at warmup_ratio
  # BatchNorm running statistics moved; every param moved (the heads, adapter and backbone all get gradients).
  assert not np.allclose(ref["batch_stats"]["fpn1"]["bn"]["mean"], state0["batch_stats"]["fpn1"]["bn"]["mean"])
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), ref["params"], state0["params"])
  frozen = [k for k, v in zip(jax.tree.leaves(sh.optim.param_names(moved)), jax.tree.leaves(moved)) if not v]
  assert frozen == ["backbone/norm/bias", "backbone/norm/scale"], frozen  # unused: no final norm in UperNet


def test_nonfinite_step_leaves_state(setup):
  graphdef, state0, batch, step_fn = setup
  bad = {**batch, "image": np.full_like(batch["image"], np.nan)}
  state, (m,) = run(step_fn, state0, bad, 1, sh.make_mesh(devices=jax.devices()[:1]), key=jax.random.key(1))
  assert int(m["nonfinite"]) == 1 and int(state["step"]) == 0
  for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state0["params"])):
    np.testing.assert_array_equal(x, y)


def test_eval_fn(setup):
  """The evaluator's path: the Segmenter's eval-mode logits per window (SegmentEvaluator), slide_areas."""
  graphdef, state0, batch, _ = setup
  fwd = jax.jit(lambda st, w: seg_lib.resize(segment.merge(graphdef, st)(w, train=False)["logits"], (32, 32)))
  images = np.concatenate([batch["image"], batch["image"][:, :, :16]], axis=2)  # 32 x 48: two windows
  labels = np.concatenate([batch["label"], batch["label"][:, :, :16]], axis=2)
  areas = np.asarray(segment.slide_areas(lambda w: fwd(state0, w), images, labels, crop=32, stride=21,
                                         num_classes=NC, chunk=4))
  assert areas.shape == (4, NC) and areas[3].sum() == np.sum(labels != 255)
  metrics = segment.area_metrics(areas)
  assert 0.0 <= metrics["mIoU"] <= 1.0 and 0.0 <= metrics["aAcc"] <= 1.0
