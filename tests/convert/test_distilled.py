"""The distilled layouts both ways, strict: timm's deit_*_distilled_patch16_224 (VisionTransformerDistilled) and
TinyMIM*-T's fine-tuned file (dist_token, conv1x1.{0,1}, fc_norm, head, head_dist; SPEC 8, the authors'
Segmentation/TinyMIMstar-T/backbone/mae.py and its log), with BEiT-style gamma_1 / gamma_2 layer scale."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from tests.convert.convert_testlib import assert_close, images, nchw, torch_resample
from tests.helpers.torch_ref import randomize_
from tinymim_jax import convert, create_model

SHAPE = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
C, WIDTH = 7, 96  # classes; conv1x1 width (1280 in TinyMIM*-T)


def timm_distilled(seed=0, **kw):
  tm = VisionTransformerDistilled(**{**SHAPE, **kw}, mlp_ratio=4, qkv_bias=True, num_classes=C)
  randomize_(tm, seed)
  return tm.eval()


def ours(**overrides):
  return create_model("vit_tiny_patch16", **{**SHAPE, "pooling": "cls", "dist_token": True, "pos_embed": "learn",
                                             "num_classes": C, **overrides})


@nnx.jit
def forward(model, x):
  return model(x)


def test_timm_distilled_file_both_ways(tmp_path):
  tm = timm_distilled()
  path = tmp_path / "deit_distilled.pth"
  torch.save({"model": tm.state_dict()}, path)  # DeiT's release format
  model = ours()
  report = convert.load_pytorch_weights(model, str(path))
  assert "DeiT distilled" in report.layout and not report.missing_kept_init
  assert {"dist_token", "head_dist.weight", "head_dist.bias"} <= set(report.loaded)
  x = images()
  with torch.no_grad():
    ref = tm(nchw(x)).numpy()
  assert_close(forward(model, x)["logits"], ref)
  # Export: into a fresh timm VisionTransformerDistilled, strict, same logits; the sidecar records the layout.
  out = tmp_path / "export.safetensors"
  weights = convert.save_pytorch_weights(model, str(out))
  assert list(weights) == list(tm.state_dict())  # timm's names and order
  back = VisionTransformerDistilled(**SHAPE, mlp_ratio=4, qkv_bias=True, num_classes=C).eval()
  back.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
  with torch.no_grad():
    np.testing.assert_array_equal(back(nchw(x)).numpy(), ref)
  side = convert.read_sidecar(str(out))
  assert side["model_args"]["dist_token"] is True and side["model_args"]["conv1x1_dim"] == 0
  enc, _ = convert.sidecar_configs(side)
  assert enc == model.config


def test_resample_keeps_both_prefix_rows():
  """A 4x4-grid file into a 6x6-grid model: the CLS and distillation rows are kept, the grid resampled as timm's
  resample_abs_pos_embed(num_prefix_tokens=2) does."""
  tm = timm_distilled(seed=1)
  model = ours(img_size=48)
  report = convert.load_pytorch_weights(model, tm.state_dict())
  assert "pos_embed" in report.resampled
  ref = torch_resample(tm.pos_embed.detach().numpy(), 6, prefix=2)
  got = np.asarray(model.pos_embed[...])
  assert got.shape == (1, 2 + 36, 64)
  np.testing.assert_array_equal(got[:, :2], tm.pos_embed.detach().numpy()[:, :2])
  assert_close(got, ref, tol=1e-6)


class TStar(nn.Module):
  """TinyMIM*-T's classifier as its files lay it out, in PyTorch: the backbone (timm's distilled embedding and
  blocks), `conv1x1` (LayerNorm(D) eps 1e-5 -> Linear(D, W) -> GELU) on every token, then `fc_norm` on the mean
  patch token (class head) and on the distillation token (distillation head); eval prediction their mean."""

  def __init__(self, init_values=None):
    super().__init__()
    tm = timm_distilled(seed=2, init_values=init_values)
    self.cls_token, self.dist_token, self.pos_embed = tm.cls_token, tm.dist_token, tm.pos_embed
    self.patch_embed, self.blocks = tm.patch_embed, tm.blocks
    self.conv1x1 = nn.Sequential(nn.LayerNorm(SHAPE["embed_dim"]), nn.Linear(SHAPE["embed_dim"], WIDTH), nn.GELU())
    self.fc_norm = nn.LayerNorm(WIDTH, eps=1e-6)
    self.head, self.head_dist = nn.Linear(WIDTH, C), nn.Linear(WIDTH, C)
    randomize_(self.conv1x1, 3)
    randomize_(self.fc_norm, 4)
    randomize_(self.head, 5)
    randomize_(self.head_dist, 6)
    self._tm = [tm]  # its _pos_embed, not registered

  def forward(self, x):
    x = self._tm[0]._pos_embed(self.patch_embed(x))
    x = self.conv1x1(self.blocks(x))
    cls, dist = self.fc_norm(x[:, 2:].mean(dim=1)), self.fc_norm(x[:, 1])
    return (self.head(cls) + self.head_dist(dist)) / 2


def tstar_state_dict(module, gamma_names=False):
  sd = {k: v for k, v in module.state_dict().items() if not k.startswith("_tm")}
  if gamma_names:  # the segmentation backbone's layer-scale names
    sd = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v for k, v in sd.items()}
  return sd


@pytest.mark.parametrize("layer_scale", [False, True], ids=["ft_file", "gamma_1_gamma_2"])
def test_tstar_file_both_ways(tmp_path, layer_scale):
  ref_model = TStar(init_values=1.0 if layer_scale else None).eval()
  sd = tstar_state_dict(ref_model, gamma_names=layer_scale)
  assert {"conv1x1.0.weight", "conv1x1.1.weight", "fc_norm.weight", "head_dist.weight"} <= set(sd)
  assert layer_scale == ("blocks.0.gamma_1" in sd)
  path = tmp_path / "TinyMIM-FT-Tstar.pth"
  torch.save({"model": sd}, path)
  model = ours(pooling="avg", conv1x1_dim=WIDTH, init_values=1.0 if layer_scale else 0.0)
  report = convert.load_pytorch_weights(model, str(path))
  assert "TinyMIM*-T" in report.layout and not report.missing_kept_init and not report.skipped
  assert layer_scale == any("read under timm's names" in line and "gamma_1" in line for line in report.notes)
  x = images(seed=3)
  with torch.no_grad():
    ref = ref_model(nchw(x)).numpy()
  out = forward(model, x)
  assert out["tokens"].shape == (2, 2 + 16, WIDTH)
  assert_close(out["logits"], ref)
  exported = convert.export_pytorch_weights(model)
  plain = tstar_state_dict(ref_model)  # layer scale exported under timm's names
  assert set(exported) == set(plain)
  for k, v in plain.items():
    np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)


def test_distilled_file_into_plain_model_says_which_fields():
  with pytest.raises(convert.WeightMismatchError, match=r"build the model with dist_token=True"):
    convert.load_pytorch_weights(ours(dist_token=False), timm_distilled().state_dict())
  sd = tstar_state_dict(TStar())
  with pytest.raises(convert.WeightMismatchError, match=r"dist_token=True, conv1x1_dim=<the file's conv1x1.1 rows"):
    convert.load_pytorch_weights(ours(dist_token=False, pooling="avg"), sd)


def test_pretrain_file_into_a_distilled_student_starts_the_dist_parts_fresh():
  """Fine-tuning's init (builders.FRESH_PARTS): a plain pretrained encoder loads into a student with a distillation
  token; the file's CLS and patch rows of pos_embed land around the dist row, which keeps the student's init."""
  from tinymim_jax import builders
  plain = create_model("vit_tiny_patch16", **{**SHAPE, "pooling": "cls", "pos_embed": "learn"}, seed=3)
  sd = convert.export_pytorch_weights(plain)
  student = ours(num_classes=5, conv1x1_dim=24, pooling="avg")  # TinyMIM*-T: fc_norm, the file's norm dropped
  init_row = np.asarray(student.pos_embed[...])[:, 1]
  with pytest.raises(convert.WeightMismatchError):  # strict without the fresh parts allowed
    convert.load_pytorch_weights(ours(num_classes=5), sd)
  report = convert.load_pytorch_weights(student, sd, allow_missing=builders.FRESH_PARTS)
  got = np.asarray(student.pos_embed[...])
  np.testing.assert_array_equal(got[:, 0], sd["pos_embed"][:, 0])
  np.testing.assert_array_equal(got[:, 2:], sd["pos_embed"][:, 1:])
  np.testing.assert_array_equal(got[:, 1], init_row)
  assert "dist_token" in report.missing_kept_init and any("conv1x1" in n for n in report.missing_kept_init)
  assert any("distillation token's row" in n for n in report.missing_kept_init)
