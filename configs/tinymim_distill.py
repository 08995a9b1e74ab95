r"""TinyMIM relation distillation on ImageNet-1K (paper Table 1/2; docs/method.md sections 2-3).

The sequential chain, each command on a TPU v4-64 / 32-64 H100s (global batch 4096, 300 epochs):

  # 1. TinyMIM-B from the official MAE ViT-L (teacher block 18 of 24); ~2.5 days on 64 H100s.
  python -m tinymim_jax.main --config configs/tinymim_distill.py:student=base \
      --config.teacher.source=mae_pretrain_vit_large.pth --config.data.data_dir=$TFDS --workdir wd/tinymim_b
  # 2. TinyMIM-S and TinyMIM-T from TinyMIM-B (block 12, its last): point the teacher at step 1's workdir.
  python -m tinymim_jax.main --config configs/tinymim_distill.py:student=small \
      --config.teacher.source=wd/tinymim_b --config.data.data_dir=$TFDS --workdir wd/tinymim_s
  python -m tinymim_jax.main --config configs/tinymim_distill.py:student=tiny \
      --config.teacher.source=wd/tinymim_b --config.data.data_dir=$TFDS --workdir wd/tinymim_t

Then fine-tune with configs/finetune.py (init=the workdir). Published ImageNet top-1 after fine-tuning
(docs/method.md section 5): TinyMIM-T 75.8, TinyMIM-S 83.0, TinyMIM-B 85.0 (MAE: 71.6 / 80.6 / 83.6).

Ablation axes, as config arguments (comma-separated key=value after the ':'):
  target=relation|feature|cls   what is distilled (relation = softmax(QK^T) + softmax(VV^T) KL; default)
  teacher_block=N               teacher layer (default: 18 for ViT-L teachers, 12 for ViT-B)
  relation_heads=N              heads of the student's relation block (default: the teacher's; with the
                                relation target it must equal the teacher's count, else refused)
  mask_ratio=R                  masked student input (0 = full image, the paper's choice)
  drop_path=P                   student drop path in blocks before the relation block (default 0.1)
  teacher=base|large            the MAE teacher's size (default: large for student=base, else base)
  teacher=dinov2_base|clip_base|...  a teacher of another family by its timm weights (TEACHERS below: DINOv2
                                with and without registers, small / base / large; CLIP ViT-B/16, QuickGELU or not),
                                e.g. with timm's vit_base_patch14_reg4_dinov2.lvd142m model.safetensors:
  python -m tinymim_jax.main --config configs/tinymim_distill.py:student=small,teacher=dinov2_reg_base \
      --config.teacher.source=dinov2_reg_base.safetensors --config.data.data_dir=$TFDS --workdir wd/s_dinov2
                                The teacher reads 196 px (14 x 14 patches of 14, the student's grid) resized from
                                the student's crop, normalised with its own mean / std (CLIP: OpenAI's), and its
                                register tokens take no part in the relations (objectives/distill/teachers.drop_registers).
  teacher=dinov3_base|dinov3_small_plus_qkvb|...  DINOv3 (S, S+, B, L, H+, each also '_qkvb') by timm's
                                weights, the original hub file (dinov3_vitb16_pretrain_lvd1689m-*.pth) or a hub
                                folder; rotary positions, so no table is resampled; storage tokens left out of the
                                relations as registers.
  teacher=A+B                   several teachers at once: sections teacher, teacher2, ... (config.teachers), each
                                with its own source, block (the first's: teacher_block) and weight; the loss is
                                the weighted sum (docs/method.md section 9), e.g. MAE and DINOv2-register relations:
  python -m tinymim_jax.main --config configs/tinymim_distill.py:student=small,teacher=base+dinov2_reg_base \
      --config.teacher.source=mae_pretrain_vit_base.pth --config.teacher2.source=dinov2_reg_base.safetensors \
      --config.teacher2.weight=0.5 --config.data.data_dir=$TFDS --workdir wd/s_mae_dinov2
                                Cost per step against the MAE ViT-B teacher (ViT-S student, CPU, BENCHMARKS.md
                                "Distillation step per teacher kind"): DINOv2 1.00x,
                                DINOv2 + registers 1.01x, CLIP 1.02x (QuickGELU 1.01x), MAE + DINOv2-reg 1.56x.
e.g. `configs/tinymim_distill.py:student=small,target=feature,teacher_block=9`.

Speed on GPUs (H100 / H200), without changing the recipe:
  dtype=bfloat16                the student computes in bfloat16 (params, gradients, AdamW stay float32;
                                the teacher computes in bfloat16 either way)
  attention=cudnn               cuDNN flash attention in the blocks of both models (bfloat16 only)
`:student=base,dtype=bfloat16,attention=cudnn` ran the ViT-B-from-ViT-L step at 1858 img/s on one H200,
1.94x the PyTorch reference under fp16 autocast (float32 student: 1.09x; BENCHMARKS.md).
"""

from tinymim_jax import config_base

# Student layouts during distillation (docs/method.md section 2): heads in blocks 1..11 / in the relation block.
STUDENTS = {"tiny": ("vit_tiny_patch16", 6), "small": ("vit_small_patch16", 6), "base": ("vit_base_patch16", 12)}
TEACHERS = {"base": ("vit_base_patch16", 12), "large": ("vit_large_patch16", 18),
            # Other families by their timm names (README, "Teachers"); block 12 of 12, 18 of 24 as for MAE.
            "dinov2_small": ("vit_small_patch14_dinov2", 12), "dinov2_base": ("vit_base_patch14_dinov2", 12),
            "dinov2_large": ("vit_large_patch14_dinov2", 18),
            "dinov2_reg_small": ("vit_small_patch14_reg4_dinov2", 12),
            "dinov2_reg_base": ("vit_base_patch14_reg4_dinov2", 12),
            "dinov2_reg_large": ("vit_large_patch14_reg4_dinov2", 18),
            "clip_base": ("vit_base_patch16_clip_224", 12),
            "clip_quickgelu_base": ("vit_base_patch16_clip_quickgelu_224", 12)}
# DINOv3 (timm's names; '_qkvb' for the qkv-bias variants): patch 16, so it reads the student's 224 px crop as it
# is; its 4 storage tokens take no part in the relations, as registers. Block 12 of 12, 18 of 24, 24 of 32.
for _size, _block in (("small", 12), ("small_plus", 12), ("base", 12), ("large", 18), ("huge_plus", 24)):
  for _qkvb in ("", "_qkvb"):
    TEACHERS[f"dinov3_{_size}{_qkvb}"] = (f"vit_{_size}_patch16_dinov3{_qkvb}", _block)


def get_config(arg=None):
  a = config_base.parse_arg(arg, student="small", target="relation", teacher="", teacher_block=0,
                            relation_heads=0, mask_ratio=0.0, drop_path=0.1, dtype="float32",
                            attention="default")
  c = config_base.base_config()
  c.objective = "distill"
  c.seed = 0

  c.model.name, c.model.num_heads = STUDENTS[a.student]
  c.model.img_size = 224
  c.model.drop_path = a.drop_path
  c.model.drop_path_mode = "constant"   # 0.1 in every block but the relation block
  c.model.pooling = "cls"
  c.model.dtype = a.dtype
  c.model.attention = a.attention

  # Several teachers: teacher=A+B+... -> sections teacher, teacher2, ... (config.teachers), each with its source.
  keys = (a.teacher or ("large" if a.student == "base" else "base")).split("+")
  c.teachers = tuple("teacher" if i == 0 else f"teacher{i + 1}" for i in range(len(keys)))
  for i, (section, key) in enumerate(zip(c.teachers, keys)):
    if key not in TEACHERS:
      raise ValueError(f"teacher={key!r}: expected one of {sorted(TEACHERS)} (several joined by '+')")
    name, block = TEACHERS[key]
    # MAE teachers: 224. Others: their variant's (518 for DINOv2); a teacher runs at the student's patch grid
    # anyway (objectives/distill: teacher_img_size, 196 px for a patch-14 teacher), its pos_embed resampled on load.
    c[section] = config_base.teacher_config(
        name, img_size=224 if key in ("base", "large") else None,
        source="",                          # set on the command line: a .pth / .safetensors / workdir
        dtype="bfloat16", attention=a.attention,
        block=None if i == 0 else block)    # the first teacher's: distill.teacher_block
  default_block = TEACHERS[keys[0]][1]

  c.distill.target = a.target
  c.distill.teacher_block = a.teacher_block or default_block
  c.distill.student_block = 12
  c.distill.relation_heads = a.relation_heads or None   # None: the teacher's head count (12 or 16)
  c.distill.student_mask_ratio = a.mask_ratio

  c.batch_size = 4096
  c.total_epochs = 300.0
  c.warmup_epochs = 15.0
  c.optim.base_lr = 1.5e-4              # lr = 1.5e-4 * 4096 / 256 = 2.4e-3
  c.optim.lr_scaling_batch = 256
  c.optim.min_lr = 0.0
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.05
  c.optim.no_decay = ()                 # 1-D params are never decayed; cls_token is; pos_embed is fixed
  c.optim.grad_clip_norm = None

  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.distill_crop_scale = (0.2, 1.0)
  c.data.color_jitter = 0.4

  c.log_every_steps = 50
  c.ckpt_every_steps = 2 * 312          # every 2 epochs at batch 4096
  c.keep_every_steps = 50 * 312         # keep every 50 epochs (a multiple of the save interval, or none is kept)
  c.eval_every_steps = 20 * 312         # k-NN / few-shot monitors every 20 epochs
  c.eval.max_train = 50_000           # k-NN and few-shot monitors
  return c
