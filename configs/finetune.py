r"""ImageNet-1K fine-tuning of a TinyMIM / MAE encoder (MAE's recipe; docs/method.md section 4).

  python -m tinymim_jax.main --config configs/finetune.py:model=base \
      --config.init=wd/tinymim_b --config.data.data_dir=$TFDS --workdir wd/tinymim_b_ft

ViT-B: 100 epochs at batch 1024 on 8 H100s / TPU v4-32, ~1 day. Targets (docs/method.md section 5, top-1):
TinyMIM-T 75.8, TinyMIM-S 83.0, TinyMIM-B 85.0 (MAE-T/S/B 71.6 / 80.6 / 83.6). `init` takes a tinymim-jax workdir or a .pth /
.safetensors file (official MAE / TinyMIM releases); the fine-tuning layout re-splits heads to 3 / 6 / 12.

T and S use "the same recipe with a higher lr and larger batch" (values unpublished): we use batch 2048 and
base lr 1e-3 for them (our choice; override with --config.optim.base_lr / --config.batch_size).
TinyMIM*-T (model=tstar; docs/method.md section 11, ../shared/SPEC.md section 8): TinyMIM-T with 12 heads, a
distillation token + head_dist and the conv1x1 layer (LayerNorm -> Linear(192, 1280) -> GELU), fine-tuned for 1000
epochs with DeiT-style hard distillation (Touvron et al. 2021; DeiT main.py defaults: alpha 0.5, tau 1.0, EMA
0.99996) from a frozen classifier; target 79.6 top-1 (paper Table 1, 5.8 M parameters, 1.3 GFLOPs). The authors
never released this code or name the teacher: the teacher is yours (teacher=<fine-tune workdir or .pth /
.safetensors classifier>, teacher_model=<its variant>); the rest is the tiny recipe above at 1000 epochs (our
choice). The dist token, its positional row, head_dist and conv1x1 start fresh on a TinyMIM-T pretrain init.
  python -m tinymim_jax.main --config configs/finetune.py:model=tstar,teacher=wd/vit_b_ft,init=wd/tinymim_t12h \
      --config.data.data_dir=$TFDS --workdir wd/tinymim_tstar_ft
Cost, from our measured throughput (BENCHMARKS.md, one H200: a ViT-S student from a ViT-B teacher at 34% of the
bf16 matmul peak, 3540 img/s ~ 213 TFLOP/s of model FLOPs): per image the student trains at ~3 x 2 x 1.3 = 7.8
GFLOP (forward MACs x 2 FLOP, x 3 with the backward), a ViT-B teacher's forward adds 2 x 17.6 = 35 GFLOP: ~43 GFLOP,
so ~213e12 / 43e9 = ~5000 img/s per H200 (optimistic: a D-192 model's matmuls are narrower still). 1000 epochs x
1.281 M images = 1.28e9 images / 5000 = 2.6e5 s = ~71 H200-hours (~9 h on 8); the teacher's forward is 80% of it.
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
  a = config_base.parse_arg(arg, model="base", init="", epochs=None, teacher="", teacher_model="vit_base_patch16")
  c = config_base.base_config()
  c.objective = "finetune"
  tstar = a.model == "tstar"
  name, heads, blr, batch = MODELS["tiny" if tstar else a.model]
  if tstar:
    heads = 12                          # TinyMIM*-T: head dim 16
  epochs = a.epochs if a.epochs is not None else 1000.0 if tstar else 100.0
  c.init = a.init

  c.model.name, c.model.num_heads = name, heads
  c.model.img_size = 224
  c.model.pooling = "avg"               # mean of patch tokens -> fresh fc_norm -> head
  c.model.num_classes = 1000
  c.model.pos_embed = "learn"
  c.model.drop_path = 0.2 if a.model == "base" else 0.1
  c.model.drop_path_mode = "linear"

  c.batch_size = batch
  c.total_epochs = epochs
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

  if tstar:
    c.model.dist_token = True
    c.model.conv1x1_dim = 1280
    c.finetune.distillation_type = "hard"   # DeiT's default; alpha / tau as DeiT's (0.5, 1.0)
    c.finetune.ema_decay = 0.99996          # DeiT's --model-ema-decay
    c.finetune_teacher = config_base.teacher_config(a.teacher_model, source=a.teacher)

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
