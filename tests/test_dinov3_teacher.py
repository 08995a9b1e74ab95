"""A DINOv3 teacher in a digits distillation: a random one written in the original DINOv3 hub layout, read by the
main job as teacher.source; its storage tokens take no part in the relation maps (as registers)."""

import os

import jax
import numpy as np
import torch

from tests.helpers import tiny
from tinymim_jax import builders, config_base, convert, create_model, losses, main as trainer
from tinymim_jax import train_steps as ts
from tinymim_jax.study import load_config_module
from tinymim_jax.objectives import distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DINOV3 = "vit_small_patch16_dinov3_qkvb"
SHAPE = dict(embed_dim=64, depth=2, num_heads=4)


def test_relation_maps_read_cls_and_patches_of_the_rotated_qk():
  c = tiny.distill_config(teacher_depth=2, teacher_block=2, student_block=3)
  c.model.drop_path = 0.0
  c.teacher.update(dict(name=DINOV3, img_size=None, patch_size=None, **SHAPE))
  assert distill.teacher_img_size(c) == 64  # the student's 4 x 4 grid of 16 px patches
  student, extras = builders.make_trainable(c)
  teacher = distill.make_teacher(c)
  tx, schedule, _ = distill.make_optimizer(c, ts.split_model(student, extras)[1], total_steps=10, warmup_steps=1)
  modeldef, tdefs, state = ts.init_state(student, tx, teachers={"teacher": teacher}, extras=extras)
  step = jax.jit(distill.make_distill_step(modeldef, tdefs, tx, schedule, distill.distill_spec(c),
                                           distill.teacher_specs(c)))
  x = tiny.images(4)
  _, metrics = step(state, {"teacher": x, "student": x}, jax.random.PRNGKey(0))
  t = teacher(jax.image.resize(x, (4, 64, 64, 3), "bicubic"), depth=2, capture=(2,), qkv_only=True)["blocks"][2]
  assert t["q"].shape[2] == 1 + 4 + 16
  t = {k: np.asarray(v)[:, :, np.r_[0, 5:21]] for k, v in t.items()}
  s = student(x, depth=3, capture=(3,), qkv_only=True)["blocks"][3]
  np.testing.assert_allclose(metrics["loss"], losses.relation_loss(t, s)[0], rtol=1e-5)


def test_digits_distillation_from_a_random_dinov3_hub_file(tmp_path):
  teacher = create_model(DINOV3, img_size=64, **SHAPE)
  source = str(tmp_path / "dinov3_vits16_pretrain.pth")
  torch.save({k: torch.from_numpy(v) for k, v in convert.export_pytorch_weights(teacher, layout="dinov3").items()},
             source)
  c = load_config_module(os.path.join(ROOT, "configs", "digits_demo.py")).get_config(
      f"stage=student_distill,root={tmp_path}")
  c.batch_size, c.log_every_steps, c.eval_every_steps, c.eval.max_train = 32, 2, 0, 256
  c.total_steps, c.ckpt_every_steps = 6, 6
  c.teacher.update(dict(name=DINOV3, img_size=None, patch_size=None, source=source, **SHAPE))
  c.distill.teacher_block = 2
  res = trainer.train_and_evaluate(config_base.finalize(c), str(tmp_path / "run"))
  assert res["step"] == 6 and not res.get("nonfinite"), res
  assert np.isfinite(res["eval/knn_top1"]), res
