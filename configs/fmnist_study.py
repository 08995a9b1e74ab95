r"""The paper's findings, reproduced small: a Fashion-MNIST study (TinyMIM, Ren et al. CVPR 2023, sections 4-5).

  python -m tinymim_jax.study --config configs/fmnist_study.py --workdir workdirs/fmnist --write-results
  python -m tinymim_jax.study --config configs/fmnist_study.py --workdir workdirs/fmnist_quick --quick
  # data elsewhere: --config configs/fmnist_study.py:idx_dir=/data/fashion-mnist (or data_dir=$TFDS)

Data: Fashion-MNIST (the four idx files of the Debian package dataset-fashion-mnist, or TFDS fashion_mnist),
28x28 grey -> 3 equal channels, the standard 60k train / 10k test split; every epoch is the whole 60k.
Runtime of the full study (83 runs), measured once (RESULTS.md): 2 h 10 min of wall time on a 2-core machine
that other jobs shared (load ~5-7), 2 h 41 min of CPU time (all threads); `--time 60` projected 2 h 21 min of
CPU, about 80 minutes on 2 idle cores. CPU-ms per step at batch 128: teacher 286, distillation 273 (middle 428), MAE student 178,
fine-tuning 180; plus 14-20 CPU-s per run (start, compilation, final evals); RESULTS.md records the
measured time per stage. --quick runs arms 1, 3 and 5 for one seed with 20-30 steps each (3 min of CPU).

Every run is a normal main-job workdir (resumable; finished runs are skipped):
  teacher                      MAE-pretrain the teacher, once, shared by every seed and arm
  middle                       (sequential arm) distil the middle-size student from the teacher, once, shared
  seed{s}/{arm}/pretrain       the arm's pretraining of the student (seed s)
  seed{s}/{arm}/eval           frozen-feature evals of that pretrained student (objective 'eval')
  seed{s}/{arm}/finetune       fine-tuning of that student with the one recipe below (seed s)

Arms (all: the same student, the same pretraining budget, the same fine-tuning recipe):
  tinymim     1. relation target (Q-K + V-V KL) from intermediate teacher block 6 of 8; drop path 0.1
  rel_last    2. relation target from the teacher's last block (8)
  feature     3. feature target: block-6 hidden states (smooth L1 through a linear projection)
  cls         4. class-token target: block-6 CLS token (smooth L1 through a linear projection)
  mae         5. MAE from scratch (no teacher): pixel reconstruction, 75% masked
  masked      6. as 1 with a masked student input (75% of the patches dropped)
  dp0, dp02   7. as 1 with student drop path 0.0 / 0.2 during distillation (arm 1 uses 0.1, the paper's)
  seq         7. sequential: teacher -> middle (block 6 -> its relation block 6) -> student (middle block 6)

Fixed up front for every arm (no tuning per arm):
  image 28 px, patch 7 (4x4 = 16 patches + CLS); fixed 2-D sin-cos positions in pretraining
  teacher ViT D 128, depth 8, 4 heads; middle D 96, depth 6, 4 heads; student D 64, depth 4, 2 heads
  (4 heads, the teacher's, in its relation block); MAE decoder D 64, depth 2, 4 heads, norm_pix_loss
  feature / class-token targets: teacher block 6 (as arm 1), so that the target is the only change;
    smooth L1 against the raw teacher features, through a trained linear projection 64 -> 128
  pretraining: batch 128, AdamW (0.9, 0.95), weight decay 0.05, lr 1e-3 peak (base 2e-3 x 128/256),
    warmup 0.25 epoch then cosine to 0; student / middle 1.25 epochs (585 steps), teacher 4 epochs
    (1872 steps); RandomResizedCrop(0.4, 1) + flip; distillation: ColorJitter 0.4 on the student view
  fine-tuning: 1 epoch (468 steps), batch 128, AdamW (0.9, 0.999), lr 2e-3 peak, warmup 0.25 epoch,
    cosine to 1e-6, layer decay 0.9, weight decay 0.05, drop path 0.1, label smoothing 0.1, RRC(0.7, 1) +
    flip, no mixup / cutmix / RandAugment / erasing; mean-pooled patch tokens -> fc_norm -> head (MAE's)
  frozen-feature evals: main's 'eval' objective on the pretrained student, on the features its workdir
    recorded (a distilled student: the relation block's input; MAE: the last block; mean of the patch tokens,
    parameter-free LayerNorm): k-NN (k 20, T 0.07) and few-shot (1/5/10/25 shots, 3 draws) with the
    neighbours / shots from the first 10,000 train images; a linear probe (BatchNorm + Linear, LARS) on the
    cached features of all 60k train images: batch 256, base lr 25, 10 epochs, 1 warmup, no augmentation
  seeds 0, 1, 2: the seed of each pretraining run and of its fine-tuning run (teacher and middle: seed 0)
"""

import os

from tinymim_jax import config_base

IMG, PATCH = 28, 7
TEACHER = dict(name="vit_tiny_patch16", embed_dim=128, depth=8, num_heads=4)
MIDDLE = dict(name="vit_tiny_patch16", embed_dim=96, depth=6, num_heads=4)
STUDENT = dict(name="vit_tiny_patch16", embed_dim=64, depth=4, num_heads=2)
DECODER = dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
TEACHER_BLOCK = 6                 # intermediate (of 8): the paper's 18-of-24 rule of thumb, 3/4 of the depth
NORM = ((0.2860,) * 3, (0.3530,) * 3)  # Fashion-MNIST train mean / std of the pixels in [0, 1]

BATCH = 128
TEACHER_EPOCHS = 4.0
PRETRAIN_EPOCHS = 1.25            # every arm (and the middle), so the budget is equal
FINETUNE_EPOCHS = 1.0
WARMUP_EPOCHS = 0.25
PRETRAIN_LR = 1e-3                # peak lrs; base_lr = peak x 256 / BATCH
FINETUNE_LR = 2e-3
DISTILL_DROP_PATH = 0.1
SEEDS = (0, 1, 2)
KNN_TRAIN = 10_000                # k-NN neighbours and few-shot shots come from the first 10k train images
# The probe on cached features: configs/linprobe.py's small-data recipe (batch 256, base lr 25), 10 epochs of 60k.
PROBE = dict(batch_size=256, base_lr=25.0, epochs=10.0, warmup_epochs=1.0)

# name: (label, paper's prediction against arm 1 for the comparison, what is changed)
ARMS = {
    "tinymim": ("1. relation, teacher block 6 of 8 (TinyMIM)", None, {}),
    "rel_last": ("2. relation, teacher's last block (8)", "lower", {"teacher_block": 8}),
    "feature": ("3. feature target (block 6)", "lower", {"target": "feature"}),
    "cls": ("4. class-token target (block 6)", "lower", {"target": "cls"}),
    "mae": ("5. MAE from scratch (no teacher)", "lower", {"mae": True}),
    "masked": ("6. masked student input (75%), relation", "lower", {"student_mask_ratio": 0.75}),
    "dp0": ("7a. drop path 0.0 in distillation", "lower", {"drop_path": 0.0}),
    "dp02": ("7b. drop path 0.2 in distillation", "lower", {"drop_path": 0.2}),
    "seq": ("7c. sequential: teacher -> middle -> student", "higher", {"middle": True}),
}
CLAIMS = {  # What the paper says, for each comparison with arm 1 (paper sections 4.2-4.4, Tables 3-7).
    "rel_last": "an intermediate teacher block beats the last when the teacher is deeper than the student",
    "feature": "relation targets beat feature targets",
    "cls": "relation targets beat class-token targets",
    "mae": "the distilled student beats the same student MAE-pretrained from scratch at equal budget",
    "masked": "the full image beats a masked student input",
    "dp0": "weak regularisation: drop path 0.1 beats 0",
    "dp02": "weak regularisation: drop path 0.1 beats 0.2",
    "seq": "sequential distillation (large -> middle -> small) beats large -> small directly",
}
QUICK_ARMS = ("tinymim", "feature", "mae")
QUICK = dict(batch=64, teacher_steps=30, pretrain_steps=20, finetune_steps=20, knn_max_train=2000)


def _set(node, **kv):
  for k, v in kv.items():
    node[k] = v


def _vit(c, spec, **kw):
  _set(c, **spec, **kw)
  c.img_size, c.patch_size = IMG, PATCH


def plan(quick=False):
  """The runs in the order they are run: (name, config argument without root/quick), teacher first, then
  seed-major (all arms of seed 0, then seed 1, ...), each arm as pretrain -> eval -> finetune."""
  arms = QUICK_ARMS if quick else tuple(ARMS)
  seeds = SEEDS[:1] if quick else SEEDS
  runs = [("teacher", "stage=teacher")]
  for s in seeds:
    for arm in arms:
      if ARMS[arm][2].get("middle") and ("middle", "stage=middle") not in runs:
        runs.append(("middle", "stage=middle"))
      for stage in ("pretrain", "eval", "finetune"):
        runs.append((f"seed{s}/{arm}/{stage}", f"stage={stage},arm={arm},seed={s}"))
  return runs


def get_config(arg=None):
  a = config_base.parse_arg(arg, stage="pretrain", arm="tinymim", seed=0, root="workdirs/fmnist", quick=False,
                            idx_dir="", data_dir="")
  if a.stage not in ("teacher", "middle", "pretrain", "eval", "finetune"):
    raise ValueError(f"stage must be teacher|middle|pretrain|eval|finetune, got {a.stage!r}")
  if a.arm not in ARMS:
    raise ValueError(f"arm must be one of {list(ARMS)}, got {a.arm!r}")
  arm = ARMS[a.arm][2]
  pretrain_dir = os.path.join(a.root, f"seed{a.seed}", a.arm, "pretrain")

  c = config_base.base_config()
  c.seed = a.seed
  d = c.data
  d.name = "fashion_mnist"
  d.idx_dir = a.idx_dir or None
  d.data_dir = a.data_dir or None
  d.image_size, d.crop_pct = IMG, 1.0
  d.teacher_norm = d.student_norm = NORM
  d.flip = True
  d.distill_crop_scale = d.mae_crop_scale = (0.4, 1.0)
  d.ft_crop_scale = (0.7, 1.0)
  d.color_jitter = 0.4
  d.randaug, d.reprob = "", 0.0

  c.batch_size = BATCH
  c.total_epochs, c.warmup_epochs = PRETRAIN_EPOCHS, WARMUP_EPOCHS
  c.optim.base_lr = PRETRAIN_LR * 256 / BATCH
  c.optim.b1, c.optim.b2, c.optim.weight_decay = 0.9, 0.95, 0.05
  c.log_every_steps = 25
  c.ckpt_every_steps = 500
  c.keep_ckpts = 1
  c.eval_every_steps = 0              # final evals only: they cost as much as ~100 steps
  c.eval.knn.k, c.eval.max_train = 20, KNN_TRAIN
  _set(c.linprobe, **PROBE)
  c.export = False                    # the workdirs' checkpoints are what the next stage reads

  if a.stage == "teacher" or (a.stage == "pretrain" and arm.get("mae")):
    c.objective = "mae_pretrain"
    _vit(c.model, TEACHER if a.stage == "teacher" else STUDENT)
    _set(c.mae, mask_ratio=0.75, norm_pix=True, **DECODER)
    if a.stage == "teacher":
      c.seed, c.total_epochs = 0, TEACHER_EPOCHS
  elif a.stage in ("middle", "pretrain"):
    c.objective = "distill"
    from_middle = a.stage == "pretrain" and arm.get("middle")
    student = MIDDLE if a.stage == "middle" else STUDENT
    teacher = MIDDLE if from_middle else TEACHER
    _vit(c.model, student, drop_path=arm.get("drop_path", DISTILL_DROP_PATH), drop_path_mode="constant")
    _vit(c.teacher, teacher)
    c.teacher.dtype = "float32"
    c.teacher.source = os.path.join(a.root, "middle" if from_middle else "teacher")
    c.distill.target = arm.get("target", "relation")
    c.distill.teacher_block = MIDDLE["depth"] if from_middle else arm.get("teacher_block", TEACHER_BLOCK)
    c.distill.student_block = student["depth"]
    c.distill.student_mask_ratio = arm.get("student_mask_ratio", 0.0)
    if a.stage == "middle":
      c.seed = 0
  elif a.stage == "eval":
    c.objective = "eval"
    _vit(c.model, STUDENT)
    c.init = pretrain_dir
  else:
    c.objective = "finetune"
    _vit(c.model, STUDENT, drop_path=0.1, pooling="avg", num_classes=10, pos_embed="learn")
    c.init = pretrain_dir
    c.total_epochs = FINETUNE_EPOCHS
    _set(c.optim, base_lr=FINETUNE_LR * 256 / BATCH, b2=0.999, layer_decay=0.9, min_lr=1e-6,
         no_decay=("pos_embed", "cls_token"))
    _set(c.finetune, mixup=0.0, cutmix=0.0, label_smoothing=0.1)
    c.eval.knn.enabled = c.eval.fewshot.enabled = False

  if a.stage in ("middle", "pretrain"):
    c.eval.knn.enabled = c.eval.fewshot.enabled = False   # the eval stage scores the pretrained students

  if a.quick:
    c.batch_size = QUICK["batch"]
    c.total_steps = QUICK[{"teacher": "teacher_steps", "finetune": "finetune_steps"}.get(a.stage, "pretrain_steps")]
    c.warmup_steps = 5
    c.log_every_steps, c.ckpt_every_steps = 5, 1000
    c.eval.max_train = QUICK["knn_max_train"]
    c.linprobe.epochs, c.linprobe.warmup_epochs = 1.0, 0.0
  return c
