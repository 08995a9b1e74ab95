r"""Semantic segmentation: UperNet on a distilled ViT (objective 'segment'; docs/method.md section 10).

The paper's ADE20K rows (512 x 512 crops, batch 16, 160k iterations, slide inference; mIoU targets from
docs/method.md section 10.7):

  python -m tinymim_jax.main --config configs/segment.py:model=base \
      --config.init=wd/tinymim_b --config.segment.path=/data/ADEChallengeData2016.zip --workdir wd/tinymim_b_ade

  model=base       ViT-B from TinyMIM-B (init: its distilled workdir or file)     target 52.2 mIoU
  model=small      ViT-S from TinyMIM-S                                            target 48.4
  model=tiny       ViT-T from TinyMIM-T                                            target 44.0
  model=tiny_star  TinyMIM*-T (its fine-tuned file TinyMIM-FT-Tstar.pth; layer decay 0.8)  target 45.0
                   the authors' T* backbone and adapter: 12 heads, distillation token, the conv1x1 layer
                   (1280), relative position bias over CLS + dist token, adapter levels 4 x 192 = 768 wide,
                   the stride-32 level a 3x3 stride-2 conv on conv1x1's output (docs/method.md 10.2)

GPU-hours from our measured throughput (BENCHMARKS.md, "Segment step"): 160,000 steps x batch 16 = 2.56M
crops of 512 x 512. XLA counts 2.92 / 3.04 / 3.09 / 3.65 TFLOP per crop (train step, ViT-T / TinyMIM*-T / S / B
with the 768-channel UPerHead; most of it the head's convolutions at stride 4), so 7.5e18 / 7.8e18 / 7.9e18 /
9.4e18 FLOP per run; at the 295 TFLOP/s our distillation step reaches on one H200 (bf16) that is
2.56e6 x 2.92e12 / 2.95e14 / 3600 = 7.0 GPU-hours for ViT-T, 7.3 for TinyMIM*-T, 7.4 for ViT-S and 8.8 for ViT-B,
a lower bound (the segment step itself has not been timed on a GPU; evals every 16k steps add slide inference
over 2,000 images).

The small task that runs here (digits scenes: sklearn's real 8x8 digit photos pasted on 64 x 64 canvases, 11
classes; data/segmentation.digits_scenes):

  python -m tinymim_jax.main --config configs/segment.py:model=demo --workdir wd/seg_digits \
      [--config.init=wd/digits_student]

  model=demo  the digits demo's student architecture (patch 4, dim 64, 4 blocks) at 64 px crops, 1,000 train /
              200 val scenes, 600 steps of 16; the demo's segmentation stage is this row with init= each student's
              workdir (configs/segment.py:model=demo,init=workdirs/demo/student_distill, and the MAE student's).

`dataset` (argument) picks the data: 'ade20k' (config.segment.path: the ADEChallengeData2016 folder, its parent
or the zip), 'scene_parse150' (TFDS, prepared under config.data.data_dir), 'folder' (images/<split>/,
annotations/<split>/ under config.segment.path, with config.segment.num_classes), 'digits_scenes'.
"""

import ml_collections

from tinymim_jax import config_base

# name, heads, layer decay, drop path, UPerHead channels, rel pos bias + layer scale (the authors' backbone)
MODELS = {
    "base": ("vit_base_patch16", 12, 0.75, 0.1, 768, True),
    "small": ("vit_small_patch16", 6, 0.75, 0.1, 768, True),    # S / T: ViT-B's values (unpublished)
    "tiny": ("vit_tiny_patch16", 3, 0.75, 0.1, 768, True),
    "tiny_star": ("vit_tiny_patch16", 12, 0.8, 0.1, 768, True),
    "demo": ("vit_tiny_patch16", 2, 0.75, 0.0, 64, False),
}
# TinyMIM*-T beyond its heads (Segmentation/TinyMIMstar-T: backbone/mae.py, configs/mae/upernet_mae_tiny_12_...).
TINY_STAR = dict(dist_token=True, conv1x1_dim=1280)


def segment_section() -> ml_collections.ConfigDict:
  """config.segment: the data source, the transforms, the heads and the loss (ADE20K defaults)."""
  return ml_collections.ConfigDict(dict(
      dataset="ade20k", path="", data_seed=0,
      num_classes=150, reduce_zero_label=True, on_bad="skip",   # 'folder' only (ade20k: 150, reduced)
      num_train=1000, num_val=200, scene_size=64,                # 'digits_scenes' only
      crop=512, stride=341, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, photometric=True,
      out_indices=(4, 6, 8, 12), channels=768, pool_scales=(1, 2, 3, 6), aux_channels=256, dropout_ratio=0.1,
      aux_weight=0.4, ignore_index=255, adapter="beit",           # adapter: 'beit' | 'tinymim_star'
      warmup_ratio=1e-6, power=1.0,
  ))


def get_config(arg=None):
  a = config_base.parse_arg(arg, model="base", dataset="", init="", steps=160000)
  c = config_base.base_config()
  c.objective = "segment"
  c.segment = segment_section()
  name, heads, layer_decay, drop_path, channels, beit = MODELS[a.model]
  c.init = a.init
  c.model.name, c.model.num_heads = name, heads
  c.model.pooling = "avg"
  c.model.pos_embed = "learn"
  c.model.drop_path = drop_path
  c.model.drop_path_mode = "linear"
  c.model.use_rel_pos_bias = beit
  c.model.init_values = 1.0 if beit else 0.0
  c.segment.channels = channels
  if a.model == "tiny_star":
    for k, v in TINY_STAR.items():
      c.model[k] = v
    c.segment.adapter = "tinymim_star"

  c.batch_size = 16
  c.total_steps = a.steps
  c.warmup_steps = 1500
  c.optim.base_lr = 1e-4                 # absolute (mmseg: no batch scaling)
  c.optim.min_lr = 0.0
  c.optim.layer_decay = layer_decay
  c.optim.weight_decay = 0.05
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.eval.knn.enabled = c.eval.fewshot.enabled = False
  c.eval.cached_probe = False
  c.log_every_steps = 50
  c.ckpt_every_steps = 4000
  c.eval_every_steps = 16000             # mmseg: every 16k iterations

  c.segment.dataset = a.dataset or ("digits_scenes" if a.model == "demo" else "ade20k")
  if a.model == "demo":
    # The digits demo's student (configs/digits_demo.py STUDENT: patch 4, 64 dims, 4 blocks), so init= takes its
    # workdirs; its 16 px pos table is resampled to the 64 px crop's 16 x 16 grid.
    c.model.patch_size, c.model.depth, c.model.embed_dim = 4, 4, 64
    c.segment.out_indices = (1, 2, 3, 4)
    c.segment.aux_channels = 32
    c.segment.crop, c.segment.stride, c.segment.scale = 64, 48, (128, 64)
    c.segment.num_classes, c.segment.reduce_zero_label = 11, False
    c.batch_size = 16
    c.total_steps = a.steps if a.steps != 160000 else 600
    c.warmup_steps = 50
    c.optim.base_lr = 1e-3
    c.log_every_steps = 50
    c.ckpt_every_steps = 200
    c.eval_every_steps = 300
  return c
