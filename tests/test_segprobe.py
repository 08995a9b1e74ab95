"""The linear segmentation probe (segprobe.py): its loss, gradients and BatchNorm statistics against torch's
BatchNorm2d + 1x1 conv + F.interpolate + F.cross_entropy with the same weights, the frozen encoder at the crop's
resolution, and the probe end to end through the `eval` objective on the digits scenes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinymim_jax import config_base, convert, features, main as trainer, segprobe
from tinymim_jax.models import create_model
from tinymim_jax.study import load_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_probe(params, consts, x, labels, ignore_index=255):
  """mmseg's BNHead (BatchNorm2d, conv_seg 1x1) in train mode, logits resized as BaseDecodeHead.losses, mmseg 0.x's
  cross-entropy (sum over labelled pixels / all pixels) -> (loss, {name: grad}, running mean, running var)."""
  d, c = params["conv"]["kernel"].shape
  bn = torch.nn.BatchNorm2d(d, eps=1e-5, momentum=0.1).double()
  conv = torch.nn.Conv2d(d, c, 1).double()
  with torch.no_grad():
    bn.weight.copy_(torch.tensor(np.asarray(params["bn"]["scale"])))
    bn.bias.copy_(torch.tensor(np.asarray(params["bn"]["bias"])))
    bn.running_mean.copy_(torch.tensor(np.asarray(consts["bn"]["mean"])))
    bn.running_var.copy_(torch.tensor(np.asarray(consts["bn"]["var"])))
    conv.weight.copy_(torch.tensor(np.asarray(params["conv"]["kernel"]).T[:, :, None, None]))
    conv.bias.copy_(torch.tensor(np.asarray(params["conv"]["bias"])))
  bn.train()
  logits = conv(bn(torch.tensor(np.asarray(x, np.float64)).permute(0, 3, 1, 2)))
  logits = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
  lab = torch.tensor(np.asarray(labels, np.int64))
  loss = F.cross_entropy(logits, lab, ignore_index=ignore_index, reduction="none").sum() / lab.numel()
  loss.backward()
  grads = {"bn": {"scale": bn.weight.grad.numpy(), "bias": bn.bias.grad.numpy()},
           "conv": {"kernel": conv.weight.grad.numpy()[:, :, 0, 0].T, "bias": conv.bias.grad.numpy()}}
  return loss.item(), grads, bn.running_mean.numpy(), bn.running_var.numpy()


def test_probe_loss_gradients_and_statistics_equal_torch():
  rng = np.random.RandomState(0)
  x = rng.normal(1.0, 2.0, (2, 3, 4, 5)).astype(np.float32)
  labels = rng.randint(0, 3, (2, 12, 16))
  labels[0, :4] = 255                                   # ignored pixels
  labels[1, 5, 7] = 255
  params, consts = segprobe.init_probe(5, 3, seed=1)
  params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
  (loss, new), grads = jax.value_and_grad(lambda p: segprobe.probe_loss(p, consts, x, labels), has_aux=True)(params)
  ref_loss, ref_grads, ref_mean, ref_var = _torch_probe(params, consts, x, labels)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new["bn"]["mean"]), ref_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new["bn"]["var"]), ref_var, rtol=1e-5)
  # Eval mode: the running statistics, (x - mean) / sqrt(var + eps) * scale + bias, then the 1x1 conv.
  logits, same = segprobe.apply_probe(params, new, x, train=False)
  h = (x - ref_mean) / np.sqrt(ref_var + 1e-5) * np.asarray(params["bn"]["scale"]) + np.asarray(params["bn"]["bias"])
  want = h @ np.asarray(params["conv"]["kernel"], np.float64) + np.asarray(params["conv"]["bias"])
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-5)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), same, new))  # eval mode moves nothing


def test_the_frozen_encoder_at_the_crop_reads_the_resampled_table():
  vit = create_model("vit_tiny_patch16", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, seed=0)
  assert segprobe.at_resolution(vit, 16) is vit
  big = segprobe.at_resolution(vit, 32)
  want = convert.resample_pos_embed(np.asarray(vit.pos_embed[...]), 8, vit.num_prefix_tokens)
  np.testing.assert_allclose(np.asarray(big.pos_embed[...]), want, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(big.blocks[1].attn.qkv.kernel[...]),
                                np.asarray(vit.blocks[1].attn.qkv.kernel[...]))
  spec = features.FeatureSpec(block=1)
  tokens = features.patch_tokens(big, jnp.zeros((2, 32, 32, 3)), spec)
  assert tokens.shape == (2, 8, 8, 32) and tokens.dtype == jnp.float32


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
  """A random 16 px ViT (patch 4, 32 dims, 2 blocks) exported as a .safetensors."""
  path = str(tmp_path_factory.mktemp("enc") / "enc.safetensors")
  model = create_model("vit_tiny_patch16", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, seed=0)
  convert.save_pytorch_weights(model, path)
  return path


def test_the_eval_objective_reports_the_probe_on_digits_scenes(tiny_encoder, tmp_path):
  c = load_config_module(os.path.join(ROOT, "configs", "digits_demo.py")).get_config("stage=student_eval")
  c.init = tiny_encoder
  c.model.embed_dim, c.model.depth = 32, 2
  c.eval.knn.enabled = c.eval.fewshot.enabled = c.eval.cached_probe = False
  c.eval.max_train = 64
  p = c.eval.segprobe
  p.enabled, p.dataset, p.num_train, p.num_val = True, "digits_scenes", 12, 3
  p.crop, p.stride, p.scale = 32, 32, (32, 32)     # the 64 px scenes read at 32 px: 8 x 8 tokens
  p.steps, p.batch_size, p.warmup_steps, p.base_lr = 30, 8, 2, 3e-2
  res = trainer.train_and_evaluate(config_base.finalize(c), str(tmp_path / "eval"))
  done = json.load(open(tmp_path / "eval" / "done.json"))
  for k in ("miou", "macc", "aacc"):
    assert 0 <= res[f"eval/segprobe_{k}"] <= 1 and done[f"eval/segprobe_{k}"] == res[f"eval/segprobe_{k}"]
  # Background covers most pixels: even random features learn at least that much.
  assert res["eval/segprobe_aacc"] > 0.5 and res["eval/segprobe_miou"] <= res["eval/segprobe_macc"] + 1e-9
