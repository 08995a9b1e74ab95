r"""The demo on the embedded digits data (scikit-learn's 1,797 handwritten digits, upsampled to 16 px).

Twelve stages, each a normal run of the main job but the pixel floors (tinymim_jax/floors.py):
  teacher_mae        MAE-pretrain a small ViT teacher (D 128, 6 blocks, 4 heads)
  student_distill    TinyMIM: distill a smaller student (D 64, 4 blocks, 2 heads; 4 in its relation block)
                     from the teacher's intermediate block 4 with Q-K / V-V relation KL
  student_finetune   fine-tune that student on the labels
  baseline_mae       the same student MAE-pretrained from scratch (same epochs as the distillation)
  baseline_finetune  fine-tune the baseline the same way
  student_eval       frozen-feature evals of the distilled student (k-NN, few-shot, linear probe on cached
  baseline_eval      features) and of the MAE baseline (objective 'eval'; seconds each)
  control_finetune   the floor of fine-tuning: the same student and recipe from a random init (no pretraining)
  floors             the floor of the frozen-feature evals: the same k-NN, few-shot and probe on raw pixels
  student_segment    UperNet segmentation of the digits scenes (configs/segment.py:model=demo, 64 px, 40 steps
  baseline_segment   of 8) from the distilled student, from the MAE baseline and, as their floor, from a random
  control_segment    init; mIoU on the scenes' val split.
                     The eval stages also train a linear segmentation probe on the frozen patch tokens
                     (config.eval.segprobe; segprobe.py) on the same scenes
`python -m tinymim_jax.demo` runs them in order with the study runner and prints the table.
Beside them (not run by the demo), DeiT-style distillation fine-tuning as TinyMIM*-T's (docs/method.md section 11):
  student_finetune_deit  fine-tune the distilled student with a distillation token and head, hard distillation
                     from the fine-tuned MAE baseline (baseline_finetune, frozen) and a weight EMA (decay 0.99):
                     python -m tinymim_jax.main --config configs/digits_demo.py:stage=student_finetune_deit,\
                       root=workdirs/demo --workdir workdirs/demo/student_finetune_deit
One stage alone: python -m tinymim_jax.main --config configs/digits_demo.py:stage=teacher_mae,root=workdirs/demo \
                     --workdir workdirs/demo/teacher_mae
The first nine take ~4-5 minutes on 2 uncontended CPU cores (the segmentation stages ~1 minute each); the student
reaches ~0.98+ top-1 on the held-out 20% either way, with the TinyMIM student ahead of the MAE baseline (README:
99.2 vs 98.3; on frozen features k-NN 66.4 vs 63.9, 10-shot 75.2 vs 69.7, linear probe 90.6 vs 85.6), and the raw
pixels ahead of both on frozen features (k-NN 97.8): on digits the comparison supports no claim (README).
"""

import os

from tinymim_jax import config_base

STAGES = ("teacher_mae", "student_distill", "student_finetune", "baseline_mae", "baseline_finetune", "student_eval",
          "baseline_eval", "control_finetune", "floors", "student_segment", "baseline_segment", "control_segment")
# The segmentation stages: configs/segment.py:model=demo (UperNet on the student's architecture, digits scenes)
# from each student's workdir, and from a random init as their floor (None).
SEGMENT_INIT = {"student_segment": "student_distill", "baseline_segment": "baseline_mae", "control_segment": None}
EXTRA_STAGES = ("student_finetune_deit",)
TITLE = "The digits demo: TinyMIM vs MAE from scratch, one seed"
SEEDS = (0,)


def plan(quick=False):
  """The stages in the order they run (the study runner's plan: (run name, config argument))."""
  del quick  # the demo is small already
  return [(stage, f"stage={stage}") for stage in STAGES]
IMG, PATCH = 16, 4
# Of configs/segment.py:model=demo's 600 steps of 16: its step costs ~1.4 CPU-s per 8 crops on these cores
# (BENCHMARKS.md "Segment step"), so each of the three segmentation stages stays near a minute on 2 idle cores.
SEGMENT_STEPS, SEGMENT_BATCH = 40, 8
# The eval stages' linear segmentation probe (config.eval.segprobe; segprobe.py) on the same digits scenes at 64 px:
# DINOv2's recipe (lr 1e-3, batch 16) shortened to 500 steps (8 epochs of the scenes' 1,000 windows).
SEGPROBE = dict(enabled=True, dataset="digits_scenes", num_classes=11, reduce_zero_label=False, num_train=1000,
                num_val=200, scene_size=64, crop=64, stride=48, scale=(64, 64), max_train=1000, steps=500,
                batch_size=16, warmup_steps=50)
TEACHER = dict(name="vit_tiny_patch16", embed_dim=128, depth=6, num_heads=4)
STUDENT = dict(name="vit_tiny_patch16", embed_dim=64, depth=4, num_heads=2)


def _model(c, spec, **kw):
  for k, v in {**spec, **kw}.items():
    c[k] = v
  c.img_size, c.patch_size = IMG, PATCH


def get_config(arg=None):
  a = config_base.parse_arg(arg, stage="student_distill", root="workdirs/demo", pretrain_epochs=25.0,
                            finetune_epochs=30.0, quick=False, segment_steps=SEGMENT_STEPS,
                            segment_batch=SEGMENT_BATCH)
  if a.stage not in STAGES + EXTRA_STAGES:
    raise ValueError(f"stage must be one of {STAGES + EXTRA_STAGES}, got {a.stage!r}")
  if a.stage in SEGMENT_INIT:
    from tinymim_jax import study  # pylint: disable=g-import-not-at-top
    segment = study.load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "segment.py"))
    c = segment.get_config(f"model=demo,steps={a.segment_steps}")
    c.init = SEGMENT_INIT[a.stage] and os.path.join(a.root, SEGMENT_INIT[a.stage])
    c.batch_size = a.segment_batch
    c.eval_every_steps = 0               # the final eval only
    c.warmup_steps = min(c.warmup_steps, c.total_steps // 4)  # a quarter of a short run at most
    return c
  c = config_base.base_config()
  c.seed = 0
  c.data.name = "digits"
  c.data.image_size = IMG
  c.data.crop_pct = 1.0
  # Small, centred digits: milder crops than ImageNet's, and no flips (a flipped digit is another symbol).
  c.data.flip = False
  c.data.distill_crop_scale = (0.6, 1.0)
  c.data.mae_crop_scale = (0.6, 1.0)
  c.data.ft_crop_scale = (0.85, 1.0)
  c.data.randaug = ""
  c.data.reprob = 0.0
  c.data.color_jitter = 0.4
  c.batch_size = 128
  c.total_epochs = a.pretrain_epochs
  c.warmup_epochs = 3.0
  c.optim.base_lr = 1.5e-4 * 8         # tiny models and ~300 steps: a higher lr than ImageNet's
  c.log_every_steps = 10
  c.ckpt_every_steps = 100
  c.eval_every_steps = 100
  c.eval.knn.k = 10
  c.eval.max_train = 2000
  # The linear probe of the eval stages, as configs/linprobe.py:data=digits (MAE's recipe at a small batch and
  # a higher lr; see there).
  c.linprobe.batch_size, c.linprobe.base_lr, c.linprobe.epochs, c.linprobe.warmup_epochs = 256, 25.0, 90.0, 10.0

  if a.stage in ("teacher_mae", "baseline_mae"):
    c.objective = "mae_pretrain"
    _model(c.model, TEACHER if a.stage == "teacher_mae" else STUDENT)
    c.mae.decoder_embed_dim, c.mae.decoder_depth, c.mae.decoder_num_heads = 64, 2, 4
    c.mae.mask_ratio = 0.75
  elif a.stage == "student_distill":
    c.objective = "distill"
    _model(c.model, STUDENT, drop_path=0.1, drop_path_mode="constant")
    _model(c.teacher, TEACHER)
    c.teacher.dtype = "float32"
    c.teacher.source = os.path.join(a.root, "teacher_mae")
    c.distill.teacher_block = 4          # an intermediate teacher block (of 6)
    c.distill.student_block = STUDENT["depth"]
  elif a.stage in ("student_eval", "baseline_eval", "floors"):
    c.objective = "eval"
    _model(c.model, STUDENT)
    c.init = (None if a.stage == "floors" else
              os.path.join(a.root, "student_distill" if a.stage == "student_eval" else "baseline_mae"))
    for k, v in SEGPROBE.items():
      c.eval.segprobe[k] = v
  else:
    c.objective = "finetune"
    _model(c.model, STUDENT, drop_path=0.1, pooling="avg", num_classes=10, pos_embed="learn")
    c.init = {"student_finetune": os.path.join(a.root, "student_distill"),
              "student_finetune_deit": os.path.join(a.root, "student_distill"),
              "baseline_finetune": os.path.join(a.root, "baseline_mae"), "control_finetune": None}[a.stage]
    c.total_epochs = a.finetune_epochs
    c.optim.base_lr = 4e-3
    c.optim.b2 = 0.999
    c.optim.layer_decay = 0.9
    c.optim.min_lr = 1e-6
    c.optim.no_decay = ("pos_embed", "cls_token")
    c.finetune.mixup, c.finetune.cutmix, c.finetune.label_smoothing = 0.0, 0.0, 0.1
    c.eval.knn.enabled = c.eval.fewshot.enabled = False
    if a.stage == "student_finetune_deit":
      c.model.dist_token = True            # CLS + dist tokens, head + head_dist (both fresh on the distilled init)
      c.finetune.distillation_type = "hard"  # DeiT's and TinyMIM*-T's
      _model(c.finetune_teacher, STUDENT)  # the baseline: the student's size
      c.finetune_teacher.update(dict(dtype="float32",
                                     source=os.path.join(a.root, "baseline_finetune")))
      c.finetune.ema_decay = 0.99          # DeiT's 0.99996 is for ~1.25 M steps; ~300 here
  return c
