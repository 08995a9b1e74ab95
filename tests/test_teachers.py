"""Distillation from teachers of other families: a DINOv2 teacher with registers (patch 14) beside a patch-8 /
patch-4 student, the teacher's own input statistics, a digits run from a random such teacher; several teachers
at once (config.teachers): the weighted sum of their losses and gradients, and a digits run from two."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import tiny
from tinymim_jax import builders, config_base, convert, create_model, losses, main as trainer
from tinymim_jax import train_steps as ts
from tinymim_jax.study import load_config_module
from tinymim_jax.models.variants import IMAGENET_NORM, OPENAI_CLIP_NORM
from tinymim_jax.objectives import distill

REG = "vit_small_patch14_reg4_dinov2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_teacher_input_renormalises_to_the_teachers_statistics_and_resizes():
  pixels = np.random.RandomState(0).rand(2, 8, 8, 3).astype(np.float32)
  (vm, vs), (m, s) = (np.asarray(a, np.float32) for a in IMAGENET_NORM), (np.asarray(a, np.float32)
                                                                            for a in OPENAI_CLIP_NORM)
  ti = distill.TeacherInput(img_size=None, view_norm=IMAGENET_NORM, norm=OPENAI_CLIP_NORM)
  np.testing.assert_allclose(ti(jnp.asarray((pixels - vm) / vs)), (pixels - m) / s, rtol=1e-5, atol=1e-5)
  out = distill.TeacherInput(img_size=14)(jnp.asarray(pixels))
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
  assert distill.teacher_img_size(c) == 56  # 4 x 4 patches of 14 px
  student, extras = builders.make_trainable(c)
  teacher = distill.make_teacher(c)
  spec = distill.distill_spec(c)
  tx, schedule, _ = distill.make_optimizer(c, ts.split_model(student, extras)[1], total_steps=10, warmup_steps=1)
  modeldef, tdefs, state = ts.init_state(student, tx, teachers={"teacher": teacher}, extras=extras)
  step = jax.jit(distill.make_distill_step(modeldef, tdefs, tx, schedule, spec, distill.teacher_specs(c)))
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


# --------------------------------------------------------------------------------------------------------
# Several teachers (config.teachers).
# --------------------------------------------------------------------------------------------------------
def two_teacher_config(target="relation"):
  """tiny.distill_config's student with two teachers: the tiny MAE-layout one (block 2 of 4, weight 2) and a
  DINOv2-with-registers one (block 1 of 2, weight 0.5; width 96 against the first's 64)."""
  c = tiny.distill_config(target=target, teacher_depth=4, teacher_block=2, student_block=3)
  c.model.drop_path = 0.0
  c.teacher.weight = 2.0
  c.teacher2 = config_base.teacher_config(REG, img_size=None, patch_size=None, embed_dim=96, depth=2, num_heads=4,
                                          dtype="float32", source="unused", block=1, weight=0.5)
  c.teachers = ("teacher", "teacher2")
  return c


def _grads_and_metrics(c, teachers, specs, x):
  """One step of the distillation step with the gradient recorder: -> (grads, metrics)."""
  from tests.helpers import exact
  student, extras = builders.make_trainable(c)
  rec = exact.grad_recorder()
  modeldef, tdefs, state = ts.init_state(student, rec, teachers=teachers, extras=extras)
  step = jax.jit(distill.make_distill_step(modeldef, tdefs, rec, optax_constant, distill.distill_spec(c), specs))
  new, metrics = step(state, {"teacher": x, "student": x}, jax.random.PRNGKey(0))
  return new["opt"], metrics


def optax_constant(step):
  return 0.0


def test_two_teachers_give_the_weighted_sum_of_their_losses_and_gradients():
  c = two_teacher_config()
  teachers, specs = distill.make_teachers(c), distill.teacher_specs(c)
  # Each teacher is built, and runs, only up to its own block.
  assert {n: len(t.blocks) for n, t in teachers.items()} == {"teacher": 2, "teacher2": 1}
  assert (specs["teacher"].block, specs["teacher2"].block, specs["teacher2"].input.reg_tokens) == (2, 1, 4)
  x = tiny.images(4)
  grads, metrics = _grads_and_metrics(c, teachers, specs, x)
  alone = {}
  for name in teachers:  # the same student, each teacher alone with weight 1
    one = dict(specs[name].__dict__, weight=1.0, extras=None)
    alone[name] = _grads_and_metrics(c, {name: teachers[name]}, {name: distill.TeacherSpec(**one)}, x)
  want = 2.0 * alone["teacher"][1]["loss"] + 0.5 * alone["teacher2"][1]["loss"]
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-6)
  for name in teachers:
    np.testing.assert_allclose(metrics[f"loss_{name}"], alone[name][1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics[f"loss_qk_{name}"], alone[name][1]["loss_qk"], rtol=1e-6)
  got, g1, g2 = (jax.tree.leaves(g) for g in (grads, alone["teacher"][0], alone["teacher2"][0]))
  for a, b, c_ in zip(got, g1, g2):
    np.testing.assert_allclose(a, 2.0 * b + 0.5 * c_, rtol=1e-4, atol=1e-7)
  assert abs(float(metrics["loss"]) - float(alone["teacher"][1]["loss"] + alone["teacher2"][1]["loss"])) > 1e-3


def test_feature_target_trains_one_width_projection_per_teacher():
  c = two_teacher_config("feature")
  student, extras = builders.make_trainable(c)
  assert {k: v.linear.kernel.shape for k, v in extras.items()} == {"distill_proj": (48, 64),
                                                                   "distill_proj_teacher2": (48, 96)}
  specs = distill.teacher_specs(c)
  assert (specs["teacher"].extras, specs["teacher2"].extras) == ((("distill_proj", "distill_proj"),),
                                                                  (("distill_proj", "distill_proj_teacher2"),))
  _, metrics = _grads_and_metrics(c, distill.make_teachers(c), specs, tiny.images(4))
  np.testing.assert_allclose(metrics["loss"], 2.0 * metrics["loss_teacher"] + 0.5 * metrics["loss_teacher2"],
                             rtol=1e-6)


def test_teacher_sections_are_checked():
  c = two_teacher_config()
  c.teachers = ("teacher", "teacher3")
  with pytest.raises(config_base.ConfigError, match="config.teacher3 is not a teacher section"):
    config_base.finalize(c)
  c = two_teacher_config()
  c.teacher2.source = ""
  with pytest.raises(config_base.ConfigError, match="config.teacher2.source is empty"):
    config_base.finalize(c)
  c = two_teacher_config()
  c.teacher2.block = 3
  with pytest.raises(ValueError, match=r"config.teacher2.block=3, but config.teacher2 .* has blocks 1..2"):
    distill.make_teachers(c)


def _resolve(c):
  from tinymim_jax import objectives
  return objectives.resolve_run(config_base.finalize(c))


def test_distillations_the_step_cannot_compute_are_refused_up_front_naming_the_field():
  c = two_teacher_config()
  c.teacher2.num_heads = 8  # 8 heads against the first teacher's 4: per-head maps cannot be matched
  with pytest.raises(config_base.ConfigError, match=r"pick blocks with equal head counts \(teacher.block, "
                                                    r"teacher2.block\)") as e:
    _resolve(c)
  assert "relation_heads" not in str(e.value)  # the advice that led into a crash inside the step
  c.distill.relation_heads = 4  # ... and following the old advice is refused as well
  with pytest.raises(config_base.ConfigError, match="equal head counts"):
    _resolve(c)
  c = tiny.distill_config(teacher_depth=4, teacher_block=2, student_block=3)
  c.distill.relation_heads = 2
  with pytest.raises(config_base.ConfigError, match=r"config.distill.relation_heads=2, but the teacher's block has "
                                                    r"4 heads.*set it to 4"):
    _resolve(c)
  c.distill.relation_heads = 4
  assert _resolve(c).distill.relation_heads == 4
  c.distill.update(relation_heads=2, target="feature")  # no per-head maps: any count
  _resolve(c)
  c = tiny.distill_config(teacher_depth=4, teacher_block=2, student_block=3)
  c.model.reg_tokens = 4
  with pytest.raises(config_base.ConfigError, match=r"config.model.reg_tokens=4: a distillation student has no "
                                                    r"register tokens.*--config.model.reg_tokens=0"):
    _resolve(c)


def test_digits_distillation_from_two_teachers(tmp_path):
  dinov2 = create_model(REG, img_size=56, embed_dim=64, depth=2, num_heads=4)
  mae = create_model("vit_base_patch16", img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=4)
  sources = {"dinov2": str(tmp_path / "dinov2_reg.safetensors"), "mae": str(tmp_path / "mae.safetensors")}
  convert.save_pytorch_weights(dinov2, sources["dinov2"])
  convert.save_pytorch_weights(mae, sources["mae"])
  c = load_config_module(os.path.join(ROOT, "configs", "digits_demo.py")).get_config(
      f"stage=student_distill,root={tmp_path}")
  c.batch_size, c.log_every_steps, c.eval_every_steps, c.eval.max_train = 32, 2, 0, 256
  c.total_steps, c.ckpt_every_steps = 6, 6
  c.teacher.update(dict(name="vit_base_patch16", img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=4,
                        source=sources["mae"]))
  c.distill.teacher_block = 3
  c.dinov2 = config_base.teacher_config(REG, img_size=None, patch_size=None, embed_dim=64, depth=2, num_heads=4,
                                        source=sources["dinov2"], block=2, weight=0.5)
  c.teachers = ("teacher", "dinov2")
  res = trainer.train_and_evaluate(config_base.finalize(c), str(tmp_path / "run"))
  assert res["step"] == 6 and not res.get("nonfinite"), res
  assert np.isfinite(res["eval/knn_top1"]), res
  # The teachers are never checkpointed: the saved trees hold the student's params and no teacher array.
  saved = "".join(p.read_text() for p in (tmp_path / "run" / "checkpoints").rglob("_METADATA"))
  assert "'params', 'blocks'" in saved and "teacher" not in saved
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  train = [m for m in logged if "train/loss_dinov2" in m]
  assert train and all(np.isclose(m["train/loss"], m["train/loss_teacher"] + 0.5 * m["train/loss_dinov2"], rtol=1e-5)
                       for m in train)
