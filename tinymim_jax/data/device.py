"""Data helpers that run in JAX, on the global batch: no TensorFlow here."""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


def to_global(batch, mesh, spec=PartitionSpec('data')):
  """Host-local numpy arrays -> global jax.Arrays whose leading (batch) dim is sharded by `spec`.

  Every process passes its own slice; the global batch is their concatenation in process order.
  `spec` may name several mesh axes for the batch dim, e.g. PartitionSpec(('data', 'fsdp')).
  """
  sharding = NamedSharding(mesh, spec)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def mix_params(rng, *, height, width, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5):
  """The random draws of one batch, as timm's Mixup (mode 'batch', prob 1, correct_lam=True).

  Returns a dict: use_cutmix; lam, the mixup lambda or, under cutmix, 1 - (clipped box area) / (H W);
  box = (y0, y1, x0, x1), the region taken from the reversed batch under cutmix; and the raw draws
  beta (of the chosen branch) and center = (cy, cx). The box is timm 0.3.2's (the reference's):
  [c - cut // 2, c + cut // 2); timm >= 0.9 makes odd-sized boxes one pixel larger.
  """
  k_switch, k_mixup, k_cutmix, k_y, k_x = jax.random.split(rng, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1)
  lam_cutmix = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1)
  # timm rand_bbox: a box of side int(size * sqrt(1 - lam)) centered uniformly, clipped to the image.
  ratio = jnp.sqrt(1.0 - lam_cutmix)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  lam_box = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
  lam = jnp.where(use_cutmix, lam_box, lam_mixup).astype(jnp.float32)
  return dict(use_cutmix=use_cutmix, lam=lam, box=(y0, y1, x0, x1),
              beta=jnp.where(use_cutmix, lam_cutmix, lam_mixup), center=(cy, cx))


def mixup_cutmix(rng, images, labels, *, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
                 label_smoothing=0.1):
  """timm Mixup in 'batch' mode on a (global) NHWC batch, inside jit.

  One lambda and one mixup-or-cutmix choice per batch; the batch is mixed with itself reversed.
  Returns (mixed images, soft targets (B, num_classes) float32): targets are
  lam * smooth(y) + (1 - lam) * smooth(y reversed), smooth() being timm's one-hot with
  off = smoothing / num_classes and on = 1 - smoothing + off.
  """
  height, width = images.shape[1], images.shape[2]
  params = mix_params(rng, height=height, width=width, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                      switch_prob=switch_prob)
  use_cutmix, lam, (y0, y1, x0, x1) = params['use_cutmix'], params['lam'], params['box']
  flipped = images[::-1]
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  cutmixed = jnp.where(box[None, :, :, None], flipped, images)
  mixed = lam * images + (1.0 - lam) * flipped
  images = jnp.where(use_cutmix, cutmixed, mixed).astype(images.dtype)

  off = label_smoothing / num_classes
  on = 1.0 - label_smoothing + off
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off
  return images, lam * targets + (1.0 - lam) * targets[::-1]
