r"""MAE pixel pretraining on ImageNet-1K: the scratch-MIM baseline, and how to pretrain a teacher
(docs/method.md section 6).

  python -m tinymim_jax.main --config configs/mae_pretrain.py:model=small \
      --config.data.data_dir=$TFDS --workdir wd/mae_s

Batch 4096, 1600 epochs (MAE's longest; `epochs=` to shorten), 40 warmup epochs, mask 75%, norm_pix loss.
ViT-B: ~4 days on 64 TPU v3 cores in the MAE paper. Fine-tuned, MAE-T/S/B reach 71.6 / 80.6 / 83.6 top-1
(docs/method.md section 5), the baselines TinyMIM is compared against.
"""

from tinymim_jax import config_base

MODELS = {"tiny": "vit_tiny_patch16", "small": "vit_small_patch16", "base": "vit_base_patch16",
          "large": "vit_large_patch16", "huge": "vit_huge_patch14"}


def get_config(arg=None):
  a = config_base.parse_arg(arg, model="base", epochs=1600.0)
  c = config_base.base_config()
  c.objective = "mae_pretrain"
  c.model.name = MODELS[a.model]
  c.model.img_size = 224
  c.model.pooling = "cls"
  c.mae.mask_ratio = 0.75
  c.mae.norm_pix = True
  c.mae.decoder_embed_dim, c.mae.decoder_depth, c.mae.decoder_num_heads = 512, 8, 16

  c.batch_size = 4096
  c.total_epochs = a.epochs
  c.warmup_epochs = 40.0
  c.optim.base_lr = 1.5e-4
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.05

  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.mae_crop_scale = (0.2, 1.0)
  c.ckpt_every_steps = 2 * 312    # every 2 epochs at batch 4096
  c.keep_every_steps = 100 * 312   # keep every 100 epochs (a multiple of the save interval, or none is kept)
  c.eval_every_steps = 50 * 312
  return c
