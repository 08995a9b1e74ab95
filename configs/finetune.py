r"""ImageNet-1K fine-tuning of a TinyMIM / MAE encoder (MAE's recipe; docs/method.md section 4).

  python -m tinymim_jax.main --config configs/finetune.py:model=base \
      --config.init=wd/tinymim_b --config.data.data_dir=$TFDS --workdir wd/tinymim_b_ft

ViT-B: 100 epochs at batch 1024 on 8 H100s / TPU v4-32, ~1 day. Targets (docs/method.md section 5, top-1):
TinyMIM-T 75.8, TinyMIM-S 83.0, TinyMIM-B 85.0 (MAE-T/S/B 71.6 / 80.6 / 83.6). `init` takes a tinymim-jax workdir or a .pth /
.safetensors file (official MAE / TinyMIM releases); the fine-tuning layout re-splits heads to 3 / 6 / 12.

T and S use "the same recipe with a higher lr and larger batch" (values unpublished): we use batch 2048 and
base lr 1e-3 for them (our choice; override with --config.optim.base_lr / --config.batch_size).
To evaluate a fine-tuned model: add --config.objective=eval --config.init=<workdir or file> (the head's top-1;
configs/linprobe.py:objective=eval adds k-NN, few-shot and a linear probe on frozen features).
"""

from tinymim_jax import config_base

MODELS = {  # name, heads, base lr, batch
    "tiny": ("vit_tiny_patch16", 3, 1e-3, 2048),
    "small": ("vit_small_patch16", 6, 1e-3, 2048),
    "base": ("vit_base_patch16", 12, 5e-4, 1024),
}


def get_config(arg=None):
  a = config_base.parse_arg(arg, model="base", init="", epochs=100.0)
  c = config_base.base_config()
  c.objective = "finetune"
  name, heads, blr, batch = MODELS[a.model]
  c.init = a.init

  c.model.name, c.model.num_heads = name, heads
  c.model.img_size = 224
  c.model.pooling = "avg"               # mean of patch tokens -> fresh fc_norm -> head
  c.model.num_classes = 1000
  c.model.pos_embed = "learn"
  c.model.drop_path = 0.2 if a.model == "base" else 0.1
  c.model.drop_path_mode = "linear"

  c.batch_size = batch
  c.total_epochs = a.epochs
  c.warmup_epochs = 5.0
  c.optim.base_lr = blr
  c.optim.lr_scaling_batch = 256
  c.optim.min_lr = 1e-6
  c.optim.layer_decay = 0.65 if a.model == "base" else 0.75
  c.optim.weight_decay = 0.05
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.no_decay = ("pos_embed", "cls_token")   # plus every 1-D param
  c.optim.grad_clip_norm = None

  c.finetune.mixup = 0.8
  c.finetune.cutmix = 1.0
  c.finetune.switch_prob = 0.5
  c.finetune.label_smoothing = 0.1

  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.ft_crop_scale = (0.08, 1.0)
  c.data.randaug = "rand-m9-mstd0.5-inc1"
  c.data.reprob = 0.25
  c.data.crop_pct = 224 / 256           # eval: resize 256, center crop 224

  c.eval.knn.enabled = c.eval.fewshot.enabled = False   # top-1 of the head is the metric
  c.eval.cached_probe = False
  c.log_every_steps = 50
  c.ckpt_every_steps = 1000
  c.eval_every_steps = 1250             # ~every epoch at batch 1024
  return c
