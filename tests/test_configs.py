"""Every config loads and builds abstractly; the paper configs' resolved values match docs/method.md."""

import glob
import os

import jax
import pytest
from flax import nnx

from tinymim_jax import builders, config_base, optim, train_steps as ts
from tinymim_jax.models import vit_config
from tinymim_jax.objectives import distill
from tinymim_jax.study import load_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
ARGS = {
    "tinymim_distill": ["student=tiny", "student=small", "student=base", "student=small,target=feature",
                        "student=small,teacher=base+dinov2_reg_base",
                        "teacher=dinov2_base", "teacher=dinov2_reg_base", "teacher=clip_base",
                        "teacher=clip_quickgelu_base",
                        "student=tiny,target=cls,teacher_block=9,relation_heads=6,mask_ratio=0.5",
                        "student=base,dtype=bfloat16,attention=cudnn"],
    "finetune": ["model=tiny", "model=small", "model=base", "model=tstar,teacher=t.pth"],
    "mae_pretrain": ["model=tiny", "model=base", "model=large"],
    "digits_demo": ["stage=" + s for s in ("teacher_mae", "student_distill", "student_finetune", "baseline_mae",
                                           "baseline_finetune", "student_eval", "baseline_eval",
                                           "control_finetune", "student_segment", "baseline_segment",
                                           "control_segment", "student_finetune_deit")],
    "linprobe": ["model=base", "model=large,pool=cls", "data=digits,augment=False", "objective=eval,block=11"],
    "segment": ["model=base", "model=small", "model=tiny", "model=tiny_star", "model=demo",
                "model=demo,dataset=folder"],
    "fmnist_study": ["stage=teacher", "stage=teacher_eval", "stage=eval", "stage=ft", "stage=ft1",
                     "stage=ft,arm=control", "stage=ft,quick=True"]
                    + [f"stage=pretrain,arm={a}" for a in ("tinymim", "rel_last", "feature", "cls", "mae")],
}


def load(name, arg):
  c = load_config_module(CONFIGS[name]).get_config(arg)
  for name in c.teachers if c.objective == "distill" else ():
    c[name].source = c[name].source or f"{name}.pth"
  if c.objective in ("eval", "linprobe") and not c.init:
    c.init = "model.safetensors"
  return config_base.finalize(c)


def test_every_config_file_is_covered():
  assert set(CONFIGS) == set(ARGS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_config_builds_abstractly(name, arg):
  c = load(name, arg)
  model, extras = nnx.eval_shape(lambda: builders.make_trainable(c, num_classes=1000))
  _, params, _ = ts.split_model(model, extras)
  if c.objective == "segment":  # its optimizer (the Segmenter's layer ids): tests/segment/test_pieces.py
    assert model.decode_head.conv_seg.kernel.shape[-1] == 1000
    assert model.backbone.config.use_rel_pos_bias == c.model.use_rel_pos_bias
    if arg == "model=tiny_star":  # SPEC 8-9: 12 heads, dist token, conv1x1 1280, the T* adapter
      assert model.fpn4.kernel.shape == (3, 3, 1280, 768) and model.fpn3.kernel.shape == (1, 1, 192, 768)
      g = model.backbone.grid
      assert model.backbone.blocks[0].attn.relative_position_bias_table.shape == ((2 * g - 1) ** 2 + 6, 12)
      assert model.decode_head.lateral_convs[0].conv.kernel.shape == (1, 1, 768, 768)
    return
  spec = None
  if c.objective == "distill":
    teacher = nnx.eval_shape(lambda: distill.make_teacher(c))
    assert teacher.config.depth == c.distill.teacher_block
    for name, t in nnx.eval_shape(lambda: distill.make_teachers(c)).items():
      assert t.config.depth == distill.teacher_block(c, name) and t.config.attention == c[name].attention
    assert model.config.dtype == jax.numpy.dtype(c.model.dtype)
    assert (model.config.param_dtype, teacher.config.param_dtype) == (jax.numpy.dtype(c.model.param_dtype),
                                                                      jax.numpy.dtype(c.teacher.param_dtype))
    spec = distill.distill_spec(c)
  tx, _, _ = builders.make_optimizer(c, params, total_steps=100, warmup_steps=10,
                                     frozen=distill.distill_frozen_patterns(spec, params) if spec else ())
  opt_state = jax.eval_shape(tx.init, params)
  # One update of the config's optimizer: one array per param, of its shape.
  updates, _ = jax.eval_shape(tx.update, params, opt_state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert [u.shape for u in jax.tree.leaves(updates)] == [p.shape for p in jax.tree.leaves(params)]


def test_unknown_field_in_a_config_is_an_error():
  c = load("finetune", "model=base")
  with pytest.raises(AttributeError, match="bse_lr"):
    c.optim.bse_lr = 1.0


# docs/method.md sections 2-3: distillation recipe and student layouts.
@pytest.mark.parametrize("student,name,heads,rel_heads,teacher,tblock", [
    ("tiny", "vit_tiny_patch16", 6, 12, "vit_base_patch16", 12),
    ("small", "vit_small_patch16", 6, 12, "vit_base_patch16", 12),
    ("base", "vit_base_patch16", 12, 16, "vit_large_patch16", 18),
])
def test_distill_configs_match_spec(student, name, heads, rel_heads, teacher, tblock):
  c = load("tinymim_distill", f"student={student}")
  assert (c.objective, c.model.name, c.model.num_heads, c.teacher.name) == ("distill", name, heads, teacher)
  assert (c.distill.target, c.distill.teacher_block, c.distill.student_block) == ("relation", tblock, 12)
  assert (c.distill.w_qk, c.distill.w_vv, c.distill.student_mask_ratio) == (1.0, 1.0, 0.0)
  model = nnx.eval_shape(lambda: builders.make_model(c))
  assert model.config.block_heads(12) == rel_heads and all(model.config.block_heads(i) == heads for i in range(1, 12))
  assert model.config.embed_dim // rel_heads == {"tiny": 16, "small": 32, "base": 48}[student]
  assert [model.config.block_drop_path(i) for i in (1, 11, 12)] == [0.1, 0.1, 0.0]
  student = vit_config(c.model.name, **builders.vit_kwargs(c.model))  # None fields: the variant's
  assert (student.img_size, student.pos_embed, distill.teacher_vit_config(c).img_size) == (224, "sincos", 224)
  assert (c.batch_size, c.total_epochs, c.warmup_epochs) == (4096, 300.0, 15.0)
  o = c.optim
  assert (o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip_norm, o.min_lr) == (0.9, 0.95, 1e-8, 0.05, None, 0.0)
  assert optim.peak_lr(base_lr=o.base_lr, global_batch_size=c.batch_size, lr_scaling_batch=o.lr_scaling_batch) == \
      pytest.approx(2.4e-3)
  assert tuple(o.no_decay) == ()  # cls_token decayed, 1-D params never, pos_embed fixed (not a param)
  d = c.data
  assert (d.name, d.image_size, tuple(d.distill_crop_scale), d.color_jitter) == ("imagenet2012", 224, (0.2, 1.0), 0.4)
  assert tuple(map(tuple, d.teacher_norm)) == tuple(map(tuple, d.student_norm)) == (
      (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_finetune_config_matches_spec():
  c = load("finetune", "model=base")
  assert (c.objective, c.model.name, c.model.num_heads, c.model.pooling, c.model.pos_embed) == (
      "finetune", "vit_base_patch16", 12, "avg", "learn")
  assert (c.model.drop_path, c.model.drop_path_mode, c.model.num_classes) == (0.2, "linear", 1000)
  assert (c.total_epochs, c.warmup_epochs, c.batch_size) == (100.0, 5.0, 1024)
  o = c.optim
  assert (o.base_lr, o.min_lr, o.layer_decay, o.weight_decay, o.b1, o.b2) == (5e-4, 1e-6, 0.65, 0.05, 0.9, 0.999)
  assert set(o.no_decay) == {"pos_embed", "cls_token"} and o.grad_clip_norm is None
  f = c.finetune
  assert (f.mixup, f.cutmix, f.switch_prob, f.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
  d = c.data
  assert (tuple(d.ft_crop_scale), d.randaug, d.reprob) == ((0.08, 1.0), "rand-m9-mstd0.5-inc1", 0.25)
  assert round(d.image_size / d.crop_pct) == 256
  for model, heads in (("tiny", 3), ("small", 6)):
    assert load("finetune", f"model={model}").model.num_heads == heads
  t = load("finetune", "model=tstar,teacher=t.pth")
  assert (t.model.num_heads, t.model.dist_token, t.model.conv1x1_dim, t.total_epochs) == (12, True, 1280, 1000.0)
  assert (t.finetune.distillation_type, t.finetune.alpha, t.finetune.tau, t.finetune.ema_decay) == (
      "hard", 0.5, 1.0, 0.99996)
  assert t.finetune_teacher.source == "t.pth" and t.finetune.mixup == 0.8


def test_mae_config_matches_spec():
  c = load("mae_pretrain", "model=base")
  assert (c.mae.mask_ratio, c.mae.norm_pix) == (0.75, True)
  assert (c.mae.decoder_embed_dim, c.mae.decoder_depth, c.mae.decoder_num_heads) == (512, 8, 16)
  assert (c.optim.b1, c.optim.b2, c.optim.base_lr, c.optim.weight_decay) == (0.9, 0.95, 1.5e-4, 0.05)
  assert (c.batch_size, c.warmup_epochs, tuple(c.data.mae_crop_scale)) == (4096, 40.0, (0.2, 1.0))


def test_linprobe_config_matches_mae_recipe():
  c = load("linprobe", "model=base")
  assert (c.objective, c.model.name, c.linprobe.augment, c.export) == ("linprobe", "vit_base_patch16", True, False)
  lp = c.linprobe
  assert (lp.batch_size, lp.base_lr, lp.weight_decay, lp.epochs, lp.warmup_epochs) == (16384, 0.1, 0.0, 90.0, 10.0)
  assert (lp.momentum, lp.trust_coefficient, c.optim.min_lr) == (0.9, 0.001, 0.0)
  assert optim.peak_lr(base_lr=lp.base_lr, global_batch_size=lp.batch_size,
                       lr_scaling_batch=c.optim.lr_scaling_batch) == pytest.approx(6.4)
  d = c.data
  assert (d.name, tuple(d.ft_crop_scale), d.flip, d.image_size, round(d.image_size / d.crop_pct)) == (
      "imagenet2012", (0.08, 1.0), True, 224, 256)
  assert [c.eval.feature[k] for k in ("block", "pool", "norm")] == [None, None, None]  # the workdir's spec
  e = load("linprobe", "objective=eval,block=11,pool=cls")
  assert (e.objective, e.eval.feature.block, e.eval.feature.pool, e.eval.cached_probe) == ("eval", 11, "cls", True)
  assert e.eval.knn.enabled and e.eval.fewshot.enabled and tuple(e.eval.fewshot.shots) == (1, 5, 10, 25)
  # The demo's eval stages probe with the small-data recipe of configs/linprobe.py:data=digits.
  small, demo = load("linprobe", "data=digits").linprobe, load("digits_demo", "stage=student_eval").linprobe
  assert small.to_dict() == {**demo.to_dict(), "augment": True}


@pytest.mark.parametrize("teacher,name,regs,norm", [
    ("dinov2_base", "vit_base_patch14_dinov2", 0, "imagenet"),
    ("dinov2_reg_base", "vit_base_patch14_reg4_dinov2", 4, "imagenet"),
    ("clip_base", "vit_base_patch16_clip_224", 0, "clip"),
    ("clip_quickgelu_base", "vit_base_patch16_clip_quickgelu_224", 0, "clip")])
def test_distill_teachers_of_other_families(teacher, name, regs, norm):
  from tinymim_jax.models.variants import IMAGENET_NORM, OPENAI_CLIP_NORM
  c = load("tinymim_distill", f"student=small,teacher={teacher}")
  t = nnx.eval_shape(lambda: distill.make_teacher(c))
  assert c.teacher.name == name and t.config.reg_tokens == regs
  # The student's 14 x 14 grid on both sides: 196 px for patch 14, 224 px for patch 16.
  assert t.config.img_size == 14 * t.config.patch_size and t.grid == 14
  ti = distill.teacher_input(c)
  assert (ti.img_size, ti.reg_tokens) == (t.config.img_size, regs)
  assert ti.norm == (IMAGENET_NORM if norm == "imagenet" else OPENAI_CLIP_NORM)


def _numeric_fields(c, prefix=""):
  for k, v in c.items():
    if k == "data":
      continue
    if hasattr(v, "items"):
      yield from _numeric_fields(v, f"{prefix}{k}.")
    elif not isinstance(v, bool) and (isinstance(v, (int, float)) or c.get_type(k) in (int, float)):
      yield f"{prefix}{k}"


def test_every_numeric_field_has_a_checked_range():
  c = config_base.base_config()
  sections = ("model", "teacher", "finetune_teacher")
  ranges = set(config_base.RANGES) | {f"{s}.{k}" for s in sections for k in config_base.VIT_RANGES}
  ranges |= {f"{s}.{k}" for s in sections[1:] for k in config_base.TEACHER_RANGES}
  assert set(_numeric_fields(c)) <= ranges, set(_numeric_fields(c)) - ranges


@pytest.mark.parametrize("field,value", [
    ("batch_size", 0), ("ckpt_every_steps", 0), ("log_every_steps", 0), ("optim.base_lr", -1e-4),
    ("keep_ckpts", 0), ("keep_every_steps", 0), ("total_steps", 0), ("total_epochs", 0.0), ("warmup_steps", -1),
    ("eval_every_steps", -5), ("optim.b2", 1.0), ("optim.eps", 0.0), ("optim.weight_decay", -0.1),
    ("optim.layer_decay", 1.5), ("optim.grad_clip_norm", 0.0), ("optim.grad_accum_steps", 0), ("mesh.fsdp", 0),
    ("eval.knn.k", 0), ("eval.knn.temperature", 0.0), ("mae.mask_ratio", 1.0), ("distill.student_mask_ratio", -0.1),
    ("finetune.label_smoothing", 1.0), ("model.depth", 0), ("teacher.num_heads", 0), ("teacher.block", 0), ("teacher.weight", -1.0), ("model.drop_path", 1.0),
    ("seed", -1), ("batch_size", 2.5), ("data.image_size", 0), ("data.max_image_pixels", 0),
    ("data.digits_split_seed", -1),
])
def test_a_value_that_would_crash_later_is_an_error_naming_the_field(field, value):
  c = load_config_module(CONFIGS["digits_demo"]).get_config("stage=teacher_mae")
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  with c.ignore_type():
    node[leaf] = value
  with pytest.raises(config_base.ConfigError, match=f"config.{field}="):
    config_base.finalize(c)


@pytest.mark.parametrize("overrides,message", [
    (dict(total_steps=10, warmup_steps=20), "config.warmup_steps=20 is more than config.total_steps=10"),
    (dict(total_epochs=5.0, warmup_epochs=6.0), "config.warmup_epochs=6.0 is more than config.total_epochs=5.0"),
    (dict(ckpt_every_steps=100, keep_every_steps=150), "config.keep_every_steps=150 must be a multiple of"),
])
def test_inconsistent_lengths_are_an_error(overrides, message):
  c = load_config_module(CONFIGS["digits_demo"]).get_config("stage=teacher_mae")
  c.update(overrides)
  with pytest.raises(config_base.ConfigError, match=message):
    config_base.finalize(c)


def test_the_demo_segment_stages_are_segment_py_model_demo_after_the_others():
  from tinymim_jax import demo
  module = load_config_module(CONFIGS["digits_demo"])
  names = [n for n, _ in module.plan()]
  # Appended: the earlier stages (their seeds and numbers) are those of the demo before them.
  assert names[:9] == ["teacher_mae", "student_distill", "student_finetune", "baseline_mae", "baseline_finetune",
                       "student_eval", "baseline_eval", "control_finetune", "floors"]
  assert names[9:] == ["student_segment", "baseline_segment", "control_segment"]
  ref = load_config_module(CONFIGS["segment"]).get_config("model=demo,steps=40").to_dict()
  own = ("init", "eval_every_steps", "batch_size", "warmup_steps")   # what the demo sets on top
  for stage, init in (("student_segment", "/r/student_distill"), ("baseline_segment", "/r/baseline_mae"),
                      ("control_segment", None)):
    c = module.get_config(f"stage={stage},root=/r").to_dict()
    assert c["init"] == init and c["total_steps"] == 40 and c["batch_size"] == 8 and c["warmup_steps"] == 10
    assert {k: v for k, v in c.items() if k not in own} == {k: v for k, v in ref.items() if k not in own}
  ev = module.get_config("stage=student_eval,root=/r")
  assert ev.eval.segprobe.enabled and ev.eval.segprobe.dataset == "digits_scenes"
  # The table: the probe's mIoU beside the frozen-feature columns, UperNet's beside fine-tuning; None where a stage
  # has no such number (the pixel floors have no patch tokens).
  frozen = {"eval/knn_top1": 0.5, "eval/fewshot_1shot_top1": 0.2, "eval/fewshot_5shot_top1": 0.3,
            "eval/fewshot_10shot_top1": 0.4, "eval/fewshot_25shot_top1": 0.45, "eval/linprobe_top1": 0.6}
  results = {"student_eval": {**frozen, "eval/segprobe_miou": 0.31}, "baseline_eval": {**frozen, "eval/segprobe_miou": 0.21},
             "floors": frozen, "student_finetune": {"eval/top1": 0.99}, "baseline_finetune": {"eval/top1": 0.98},
             "control_finetune": {"eval/top1": 0.9}, "student_segment": {"eval/mIoU": 0.7},
             "baseline_segment": {"eval/mIoU": 0.6}, "control_segment": {"eval/mIoU": 0.4}}
  rows = dict(demo.summary_rows(results))
  assert rows["TinyMIM"]["seg. probe mIoU"] == 0.31 and rows["TinyMIM"]["segment mIoU"] == 0.7
  assert rows["MAE"]["segment mIoU"] == 0.6 and rows["floor: random init"]["segment mIoU"] == 0.4
  assert rows["floor: raw pixels"]["seg. probe mIoU"] is None and rows["floor: raw pixels"]["segment mIoU"] is None
