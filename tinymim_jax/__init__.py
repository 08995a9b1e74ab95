"""tinymim-jax: TinyMIM (distilling MAE pre-trained ViTs through token relations) in JAX / Flax NNX.

Public API:
  create_model(name, **overrides)           a ViT variant ('vit_tiny_patch16' ... 'vit_huge_patch14') or
                                            'mae_<variant>'; calling it on NHWC images returns a dict of
                                            named intermediates (see tinymim_jax.models.vit).
  load_pytorch_weights(model, source)       .pth / .safetensors path or a state dict -> report of skipped keys
  export_pytorch_weights(model)             -> {timm/MAE name: np.ndarray}
"""

from tinymim_jax.models import create_model


def load_pytorch_weights(model, source, **kwargs):
  from tinymim_jax import convert  # lazy: keeps `import tinymim_jax` light
  return convert.load_pytorch_weights(model, source, **kwargs)


def export_pytorch_weights(model, **kwargs):
  from tinymim_jax import convert
  return convert.export_pytorch_weights(model, **kwargs)


__all__ = ["create_model", "load_pytorch_weights", "export_pytorch_weights"]
__version__ = "0.1.0"
