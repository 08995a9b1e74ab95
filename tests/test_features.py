"""Feature spec: defaults per model kind (a distilled student reads its relation block's input), precedence of
overrides / recorded spec / default, and the pooled features against a numpy re-derivation."""

import os

import jax
import numpy as np
import pytest

from tinymim_jax import builders, config_base, create_model, features, objectives
from tinymim_jax.study import load_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "digits_demo.py")


def _images(n=6, size=16, seed=0):
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, 3)), np.float32)


def _numpy_feature(hidden, pool, norm):
  h = np.asarray(hidden, np.float64)
  if norm:
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
  return h[:, 0] if pool == "cls" else h[:, 1:].mean(1)


@pytest.mark.parametrize("stage,target,block", [("student_distill", "relation", 3), ("student_distill", "feature", 4),
                                                ("student_distill", "cls", 4), ("baseline_mae", None, 4),
                                                ("student_finetune", None, 4)])
def test_default_block_per_model_kind(stage, target, block):
  c = load_config_module(DEMO).get_config(f"stage={stage}")
  if target:
    c.distill.target = target
  assert c.model.depth == 4
  spec = features.resolve(c.eval.feature, depth=4,
                          default_block=objectives.default_feature_block(config_base.finalize(c), 4))
  assert spec == features.FeatureSpec(block=block, pool="mean", norm=True)


def test_distilled_student_reads_the_relation_block_input_not_the_final_tokens():
  c = config_base.finalize(load_config_module(DEMO).get_config("stage=student_distill"))
  student = builders.make_model(c)
  spec = features.resolve(c.eval.feature, depth=student.config.depth,
                          default_block=objectives.default_feature_block(c, student.config.depth))
  assert spec.block == c.distill.student_block - 1 == 3
  x = _images()
  got = np.asarray(features.extract(student, x, spec)["feature"])
  out = student(x, capture=(3,))
  np.testing.assert_allclose(got, _numpy_feature(out["blocks"][3]["hidden"], "mean", True), rtol=1e-4, atol=1e-5)
  # The old monitor's features (final tokens: through the relation block's untrained proj / MLP and the final
  # norm) are not these.
  final = np.asarray(out["tokens"][:, 1:].mean(1))
  assert not np.allclose(got, final, atol=1e-2)
  last = np.asarray(features.extract(student, x, features.FeatureSpec(block=4))["feature"])
  assert not np.allclose(got, last, atol=1e-2)


@pytest.mark.parametrize("block,pool,norm", [(0, "cls", False), (0, "mean", True), (2, "cls", True),
                                             (3, "mean", False)])
def test_extract_matches_numpy_and_head_logits(block, pool, norm):
  vit = create_model("vit_tiny_patch16", img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                     pooling="avg", num_classes=5, seed=1)
  x = _images(4)
  spec = features.FeatureSpec(block=block, pool=pool, norm=norm)
  res = features.extract(vit, x, spec, logits=True)
  out = vit(x, capture=tuple(range(1, 4)))
  hidden = vit.embed(x) if block == 0 else out["blocks"][block]["hidden"]
  np.testing.assert_allclose(res["feature"], _numpy_feature(hidden, pool, norm), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(res["logits"], out["logits"], rtol=1e-5, atol=1e-6)
  assert "logits" not in features.extract(vit, x, spec)  # without logits the forward stops at the block


def test_resolve_precedence_and_errors():
  fields = dict(block=None, pool=None, norm=None)
  recorded = dict(block=2, pool="cls", norm=False)
  assert features.resolve(fields, depth=4, recorded=recorded) == features.FeatureSpec(2, "cls", False)
  assert features.resolve({**fields, "pool": "mean"}, depth=4, recorded=recorded) == features.FeatureSpec(2, "mean",
                                                                                                         False)
  assert features.resolve({**fields, "block": 0}, depth=4, recorded=recorded).block == 0
  assert features.resolve(fields, depth=4) == features.FeatureSpec(4, "mean", True)
  with pytest.raises(ValueError, match="blocks 1..4"):
    features.resolve({**fields, "block": 5}, depth=4)
  with pytest.raises(ValueError, match="eval.feature.pool"):
    features.resolve({**fields, "pool": "max"}, depth=4)


def test_mean_pool_skips_register_tokens():
  """With registers the prefix is CLS + registers: 'mean' averages the patch tokens only."""
  vit = create_model("vit_small_patch14_reg4_dinov2", img_size=28, embed_dim=32, depth=1, num_heads=2)
  x = np.random.RandomState(0).rand(2, 28, 28, 3).astype(np.float32)
  spec = features.FeatureSpec(block=1, pool="mean", norm=False)
  hidden = np.asarray(vit(x, capture=(1,))["blocks"][1]["hidden"])
  assert vit.num_prefix_tokens == 5 and hidden.shape[1] == 5 + 4
  np.testing.assert_allclose(features.extract(vit, x, spec)["feature"], hidden[:, 5:].mean(1), rtol=1e-5, atol=1e-6)
