r"""Linear probe on a frozen encoder (MAE's protocol, main_linprobe.py), and the `eval` objective.

  # ImageNet-1K, MAE's recipe: BatchNorm (no affine) + Linear, LARS, base lr 0.1 x 16384 / 256, 90 epochs
  # (10 warmup), RandomResizedCrop + flip. ViT-B: 90 encoder passes, 2h20m on 32 V100s in MAE's code.
  python -m tinymim_jax.main --config configs/linprobe.py:init=wd/tinymim_s \
      --config.data.data_dir=$TFDS --workdir wd/tinymim_s_linprobe
  # An official release (`model=` its size; MAE's exact input: pool=cls, the CLS token after LayerNorm):
  python -m tinymim_jax.main --config configs/linprobe.py:init=mae_pretrain_vit_base.pth,model=base,pool=cls \
      --config.data.data_dir=$TFDS --workdir wd/mae_b_linprobe
  # Features once, then the probe on them (no augmentation; minutes instead of a day):
  ... configs/linprobe.py:init=wd/tinymim_s,augment=False ...
  # Every frozen-feature eval of a model (k-NN, few-shot 1/5/10/25-shot, the probe on cached features, and
  # the head's top-1 if it has one), no training; metrics in workdir/done.json:
  ... configs/linprobe.py:init=wd/tinymim_s,objective=eval ...
  # Small data (the demo's digits, 16 px): ~2 minutes on 2 CPU cores (augment=False: seconds). The demo's
  # students: 86.9 (TinyMIM) / 83.1 (MAE) top-1; on cached features 90.6 / 85.6.
  python -m tinymim_jax.main --config configs/linprobe.py:init=workdirs/demo/student_distill,data=digits \
      --workdir workdirs/demo/student_linprobe

Features (eval.feature, features.py): by default the ones the init workdir recorded: the last block for MAE and
fine-tuned models, the relation block's input for a TinyMIM student (its later layers are never trained);
mean of the patch tokens after a parameter-free LayerNorm. `block=`, `pool=` override. A .pth / .safetensors
file is read into `model=`'s size at the data's resolution.
Targets: MAE's pretrain checkpoints reach 68.0 / 75.8 / 76.6 top-1 (ViT-B / L / H; MAE paper, and its
repository's FINETUNE.md) with pool=cls. Differences: MAE's BatchNorm sees each GPU's 512 images, ours the
global batch; MAE's RandomResizedCrop draws once and clamps (BYOL style), ours is torchvision's.
"""

from tinymim_jax import config_base

MODELS = {"tiny": "vit_tiny_patch16", "small": "vit_small_patch16", "base": "vit_base_patch16",
          "large": "vit_large_patch16", "huge": "vit_huge_patch14"}
# Small data (as the demo's eval stages, configs/digits_demo.py): MAE's scaling would give lr 0.1 at batch 256,
# which LARS turns into steps far too small for a few hundred updates. lr 25 reaches what a converged logistic
# regression (scikit-learn) reaches on the demo students' features (0.906 / 0.856 against 0.908 / 0.858);
# ImageNet's peak 6.4 stops short (0.883 / 0.833), 400 diverges.
SMALL = dict(batch_size=256, base_lr=25.0, epochs=90.0, warmup_epochs=10.0)


def get_config(arg=None):
  a = config_base.parse_arg(arg, init="", model="base", data="imagenet", augment=True, objective="linprobe",
                            block=-1, pool="")
  if a.objective not in ("linprobe", "eval"):
    raise ValueError(f"objective must be 'linprobe' or 'eval', got {a.objective!r}")
  if a.data not in ("imagenet", "digits"):
    raise ValueError(f"data must be 'imagenet' or 'digits', got {a.data!r}")
  c = config_base.base_config()
  c.objective = a.objective
  c.init = a.init
  c.model.name = MODELS[a.model]
  c.model.img_size = 224
  c.linprobe.augment = a.augment
  if a.block >= 0:
    c.eval.feature.block = a.block
  if a.pool:
    c.eval.feature.pool = a.pool

  # MAE's recipe (main_linprobe.py): batch 16384, blr 0.1, wd 0, 90 epochs, 10 warmup, LARS.
  c.linprobe.batch_size, c.linprobe.base_lr, c.linprobe.weight_decay = 16384, 0.1, 0.0
  c.linprobe.epochs, c.linprobe.warmup_epochs = 90.0, 10.0
  c.linprobe.momentum, c.linprobe.trust_coefficient = 0.9, 0.001
  c.batch_size = c.linprobe.batch_size
  c.optim.lr_scaling_batch, c.optim.min_lr = 256, 0.0

  if a.data == "imagenet":
    c.data.name = "imagenet2012"
    c.data.ft_crop_scale = (0.08, 1.0)    # RandomResizedCrop's default scale
    c.data.crop_pct = 224 / 256           # eval: resize 256, center crop 224
    c.eval.max_train = 50_000             # k-NN / few-shot of the eval objective
  else:
    c.data.name = "digits"
    c.model.img_size = c.data.image_size = 16
    c.data.crop_pct = 1.0
    c.data.flip = False                   # a flipped digit is another symbol
    c.data.ft_crop_scale = (0.85, 1.0)
    c.eval.knn.k = 10
    c.eval.max_train = 2000
    for k, v in SMALL.items():
      c.linprobe[k] = v
    c.batch_size = SMALL["batch_size"]   # the eval passes' batch
  c.data.randaug, c.data.reprob = "", 0.0  # unused by the probe's pipeline; stated for the record
  if a.objective == "linprobe":           # the eval objective reports these; a probe run needs only its own
    c.eval.knn.enabled = c.eval.fewshot.enabled = False
  c.log_every_steps = 50 if a.data == "imagenet" else 10
  c.ckpt_every_steps = 1000
  c.eval_every_steps = 780 if a.data == "imagenet" else 100   # ~10 epochs at batch 16384
  c.export = False
  return c
