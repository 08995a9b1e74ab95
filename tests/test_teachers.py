"""Distillation from teachers of other families: a DINOv2 teacher with registers (patch 14) beside a patch-8 /
patch-4 student, the teacher's own input statistics, and a digits run from a random such teacher."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import tiny
from tinymim_jax import builders, config_base, convert, create_model, losses, main as trainer
from tinymim_jax import train_steps as ts
from tinymim_jax.demo import load_config_module
from tinymim_jax.models.variants import IMAGENET_NORM, OPENAI_CLIP_NORM

REG = "vit_small_patch14_reg4_dinov2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_teacher_input_renormalises_to_the_teachers_statistics_and_resizes():
  pixels = np.random.RandomState(0).rand(2, 8, 8, 3).astype(np.float32)
  (vm, vs), (m, s) = (np.asarray(a, np.float32) for a in IMAGENET_NORM), (np.asarray(a, np.float32)
                                                                            for a in OPENAI_CLIP_NORM)
  ti = ts.TeacherInput(img_size=None, view_norm=IMAGENET_NORM, norm=OPENAI_CLIP_NORM)
  np.testing.assert_allclose(ti(jnp.asarray((pixels - vm) / vs)), (pixels - m) / s, rtol=1e-5, atol=1e-5)
  out = ts.TeacherInput(img_size=14)(jnp.asarray(pixels))
  assert out.shape == (2, 14, 14, 3)
  np.testing.assert_allclose(out, jax.image.resize(pixels, (2, 14, 14, 3), "bicubic"), atol=1e-6)


def reg_config():
  """tiny.distill_config's student (32 px, patch 8: a 4 x 4 grid) with a DINOv2-with-registers teacher."""
  c = tiny.distill_config(teacher_depth=2, teacher_block=2, student_block=3)
  c.model.drop_path = 0.0
  c.teacher.update(dict(name=REG, img_size=None, patch_size=None, embed_dim=64, depth=2, num_heads=4))
  return c


def test_relation_maps_exclude_register_tokens():
  c = reg_config()
  assert builders.teacher_img_size(c) == 56  # 4 x 4 patches of 14 px
  student, extras = builders.make_trainable(c)
  teacher = builders.make_teacher(c)
  spec = builders.distill_spec(c)
  tx, schedule, _ = builders.make_optimizer(c, ts.split_model(student, extras)[1], total_steps=10, warmup_steps=1,
                                            spec=spec)
  modeldef, tdef, state = ts.init_state(student, tx, teacher=teacher, extras=extras)
  step = jax.jit(ts.make_distill_step(modeldef, tdef, tx, schedule, spec, builders.teacher_input(c)))
  x = tiny.images(4)
  _, metrics = step(state, {"teacher": x, "student": x}, jax.random.PRNGKey(0))
  # By hand: the teacher's 1 + 4 + 16 tokens; the maps keep CLS (0) and the patches (5..20), not the registers.
  t = teacher(jax.image.resize(x, (4, 56, 56, 3), "bicubic"), depth=2, capture=(2,), qkv_only=True)["blocks"][2]
  assert t["q"].shape[2] == 21
  keep = np.r_[0, 5:21]
  t = {k: np.asarray(v)[:, :, keep] for k, v in t.items()}
  s = student(x, depth=3, capture=(3,), qkv_only=True)["blocks"][3]
  want, _ = losses.relation_loss(t, s)
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
  # Including the registers (or dropping other rows) changes the loss: the test above can tell.
  wrong = {k: np.asarray(v)[:, :, np.r_[0:5, 9:21]] for k, v in
           teacher(jax.image.resize(x, (4, 56, 56, 3), "bicubic"), depth=2, capture=(2,), qkv_only=True)["blocks"][2].items()}
  assert abs(float(losses.relation_loss(wrong, s)[0]) - float(want)) > 1e-4


def test_digits_distillation_from_a_random_dinov2_register_teacher(tmp_path):
  teacher = create_model(REG, img_size=56, embed_dim=64, depth=2, num_heads=4)
  source = str(tmp_path / "dinov2_reg.safetensors")
  convert.save_pytorch_weights(teacher, source)
  c = load_config_module(os.path.join(ROOT, "configs", "digits_demo.py")).get_config(
      f"stage=student_distill,root={tmp_path}")
  c.batch_size, c.log_every_steps, c.eval_every_steps, c.eval.max_train = 32, 2, 0, 256
  c.total_steps, c.ckpt_every_steps = 6, 6
  c.teacher.update(dict(name=REG, img_size=None, patch_size=None, embed_dim=64, depth=2, num_heads=4,
                        source=source))
  c.distill.teacher_block = 2
  res = trainer.train_and_evaluate(config_base.finalize(c), str(tmp_path / "run"))
  assert res["step"] == 6 and not res.get("nonfinite"), res  # a non-finite loss stops a run before its last step
  assert np.isfinite(res["eval/knn_top1"]), res
