"""The ViT sizes by name (MAE / timm; docs/method.md section 1): the fields each variant sets in ViTConfig.

Plain Python without imports, so that tools that must not load jax (the PyTorch benchmark workers) can read it.
"""

VARIANTS = {
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}

# Teachers from other families, by their timm names and with timm's defaults (timm 1.0 vision_transformer.py:
# the model function's args, plus the img_size of its default pretrained tag). Their input statistics are in
# INPUT_NORM below.
_DINOV2 = dict(patch_size=14, img_size=518, init_values=1e-5, pos_embed="learn")
_REG4 = dict(reg_tokens=4, no_embed_class=True)
_CLIP = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True, norm_eps=1e-5, pos_embed="learn")
VARIANTS.update({
    "vit_small_patch14_dinov2": dict(_DINOV2, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14_dinov2": dict(_DINOV2, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14_dinov2": dict(_DINOV2, embed_dim=1024, depth=24, num_heads=16),
    "vit_small_patch14_reg4_dinov2": dict(_DINOV2, **_REG4, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14_reg4_dinov2": dict(_DINOV2, **_REG4, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14_reg4_dinov2": dict(_DINOV2, **_REG4, embed_dim=1024, depth=24, num_heads=16),
    "vit_base_patch16_clip_224": dict(_CLIP),
    "vit_base_patch16_clip_quickgelu_224": dict(_CLIP, act_layer="quick_gelu"),
})

# DINOv3 (Simeoni et al. 2025) as timm 1.0 has it (eva.py: Eva with rope_type='dinov3', rope_temperature 100,
# 4 storage tokens as registers, LayerScale 1e-5, LayerNorm eps 1e-5, no positional table, img 256 of its
# lvd1689m tag); '_qkvb': with the qkv bias the releases carry (k part 0); S+ / H+: SwiGLU MLP.
_DINOV3 = dict(patch_size=16, img_size=256, init_values=1e-5, reg_tokens=4, no_embed_class=True, pos_embed="none",
               rope="dinov3", rope_temperature=100.0, qkv_bias=False, norm_eps=1e-5)
for _name, _shape in {"vit_small_patch16_dinov3": dict(embed_dim=384, depth=12, num_heads=6),
                      "vit_small_plus_patch16_dinov3": dict(embed_dim=384, depth=12, num_heads=6, mlp_type="swiglu"),
                      "vit_base_patch16_dinov3": dict(embed_dim=768, depth=12, num_heads=12),
                      "vit_large_patch16_dinov3": dict(embed_dim=1024, depth=24, num_heads=16),
                      "vit_huge_plus_patch16_dinov3": dict(embed_dim=1280, depth=32, num_heads=20,
                                                           mlp_type="swiglu")}.items():
  VARIANTS[_name] = dict(_DINOV3, **_shape)
  VARIANTS[_name + "_qkvb"] = dict(_DINOV3, **_shape, qkv_bias=True)

# (mean, std) in [0, 1] pixel units each model expects at its input, by name (timm's pretrained cfgs):
# ImageNet's (timm IMAGENET_DEFAULT_MEAN / STD) for MAE and DINOv2, OpenAI's for the CLIP towers
# (timm OPENAI_CLIP_MEAN / STD).
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
INPUT_NORM = {name: (OPENAI_CLIP_NORM if "_clip" in name else IMAGENET_NORM) for name in VARIANTS}
