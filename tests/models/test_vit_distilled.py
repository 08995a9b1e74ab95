"""The distillation token and head_dist: parity with timm's VisionTransformerDistilled (DeiT), float32 on CPU;
the frozen-feature and relation machinery with two prefix tokens."""

import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from timm.models.deit import VisionTransformerDistilled

from tests.helpers.torch_ref import randomize_
from tests.models.test_vit import assert_close, images, to_torch
from tinymim_jax import convert, create_model, features
from tinymim_jax.objectives.distill.teachers import drop_registers

SHAPES = {
    # timm's deit_tiny_distilled_patch16_224 arguments (timm deit.py), and a small one
    "deit_tiny_distilled_patch16_224": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "custom": dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4),
}
NUM_CLASSES = 7


def timm_distilled(shape, num_classes=NUM_CLASSES, seed=0):
  """timm's VisionTransformerDistilled as deit_*_distilled_patch16_224 builds it, every parameter random."""
  if shape["img_size"] == 224:
    import timm
    tm = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=num_classes)
  else:
    tm = VisionTransformerDistilled(**shape, mlp_ratio=4, qkv_bias=True, num_classes=num_classes)
  randomize_(tm, seed)
  return tm.eval()


def ours(shape, **overrides):
  return nnx.eval_shape(lambda: create_model("vit_tiny_patch16", **shape, pooling="cls", dist_token=True,
                                             pos_embed="learn", **overrides))


@functools.partial(nnx.jit, static_argnames=("train", "capture", "depth"))
def forward(model, x, train=False, capture=(), depth=None):
  return model(x, rng=jax.random.PRNGKey(0) if train else None, capture=capture, depth=depth)


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request):
  shape = SHAPES[request.param]
  tm = timm_distilled(shape)
  model = ours(shape, num_classes=NUM_CLASSES)
  report = convert.load_pytorch_weights(model, tm.state_dict())
  assert not report.skipped and not report.missing_kept_init  # strict: every key both ways
  return shape, tm, model


def test_eval_logits_average_the_heads(case):
  shape, tm, model = case
  x = images(shape)
  out = forward(model, x)
  with torch.no_grad():
    feats = tm.forward_features(to_torch(x))
    ref_logits = tm(to_torch(x)).numpy()  # eval mode: (head(cls) + head_dist(dist)) / 2
    ref_pooled = tm.forward_head(feats, pre_logits=True).numpy()
  assert_close(out["tokens"], feats.numpy())
  assert_close(out["logits"], ref_logits)
  assert_close(out["pooled"], ref_pooled)
  np.testing.assert_allclose(np.asarray(out["logits"]), (np.asarray(out["logits_cls"]) + np.asarray(
      out["logits_dist"])) / 2, rtol=1e-6, atol=1e-7)


def test_train_mode_logits_both_heads(case):
  shape, tm, model = case
  x = images(shape, seed=1)
  out = forward(model, x, train=True)  # drop path 0: the rng changes nothing but the mode
  tm.train()
  tm.set_distilled_training(True)
  try:
    with torch.no_grad():
      ref_cls, ref_dist = tm(to_torch(x))
  finally:
    tm.set_distilled_training(False)
    tm.eval()
  assert_close(out["logits_cls"], ref_cls.numpy())
  assert_close(out["logits_dist"], ref_dist.numpy())
  # The two heads differ (else a swapped head / token would pass).
  assert np.max(np.abs(np.asarray(out["logits_cls"]) - np.asarray(out["logits_dist"]))) > 1e-3


def test_prefix_and_pos_table():
  model = create_model("vit_tiny_patch16", img_size=32, patch_size=8, depth=1, dist_token=True, reg_tokens=2)
  assert model.num_prefix_tokens == 4  # CLS, dist, 2 registers
  assert model.pos_embed[...].shape == (1, 4 + 16, 192)
  np.testing.assert_array_equal(np.asarray(model.pos_embed[...][0, :4]), 0.0)  # sin-cos: prefix rows zero
  out = model(np.zeros((1, 32, 32, 3), np.float32))
  assert out["tokens"].shape == (1, 20, 192) and "logits" not in out
  assert model.head_dist is None  # no classes, no heads
  plain = create_model("vit_tiny_patch16", img_size=32, patch_size=8, depth=1, num_classes=3)
  assert plain.dist_token is None and plain.head_dist is None and plain.num_prefix_tokens == 1


def test_features_and_relations_skip_two_prefix_tokens():
  """Frozen features pool the patch tokens after CLS + dist; the relation machinery (train_steps.drop_registers
  with the prefix beyond CLS) keeps CLS + patches: the token set of a student without a distillation token."""
  shape = SHAPES["custom"]
  tm = timm_distilled(shape, seed=2)
  model = ours(shape, num_classes=NUM_CLASSES)
  convert.load_pytorch_weights(model, tm.state_dict())
  x = images(shape, seed=2)
  hidden = {}
  hook = tm.blocks[1].register_forward_hook(lambda mod, inp, out: hidden.__setitem__("h", out.numpy()))
  try:
    with torch.no_grad():
      tm.forward_features(to_torch(x))
  finally:
    hook.remove()
  spec = features.FeatureSpec(block=2, pool="mean", norm=False)
  got = features.extract(model, x, spec)["feature"]
  assert_close(got, hidden["h"][:, 2:].mean(axis=1))  # 16 patch tokens, CLS and dist excluded
  got_cls = features.extract(model, x, features.FeatureSpec(block=2, pool="cls", norm=False))["feature"]
  assert_close(got_cls, hidden["h"][:, 0])
  block = forward(model, x, capture=(2,), depth=2)["blocks"][2]
  kept = drop_registers(block, model.num_prefix_tokens - 1)
  n = 1 + (shape["img_size"] // shape["patch_size"]) ** 2
  assert kept["q"].shape[2] == n and kept["hidden"].shape[1] == n
  assert_close(kept["hidden"], np.concatenate([hidden["h"][:, :1], hidden["h"][:, 2:]], axis=1))


def test_mae_refuses_distilled_layout():
  with pytest.raises(ValueError, match="dist_token and conv1x1_dim belong to the distilled fine-tuning"):
    create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, dist_token=True)
