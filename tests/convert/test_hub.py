"""timm hub folders both ways: a folder timm's save_for_hf wrote is imported with its config.json (architecture,
size, classes, pooling); `convert export --hub` writes one that timm loads with its own local-dir loader."""

import json

import numpy as np
import pytest
import timm
import torch
from flax import nnx
from timm.models._hub import save_for_hf

from tests.helpers.torch_ref import randomize_
from tinymim_jax import convert, convert_cli, create_model


def logits_close(model, tm, tol=1e-5):
  img = model.config.img_size
  x = np.random.RandomState(0).randn(2, img, img, 3).astype(np.float32)
  out = nnx.jit(lambda m, x: m(x))(model, x)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  key = "logits" if "logits" in out else "pooled"
  np.testing.assert_allclose(np.asarray(out[key]), ref, atol=tol)


@pytest.mark.parametrize("name,kw", [
    ("vit_tiny_patch16_224", dict(img_size=48, embed_dim=64, depth=2, num_heads=4, global_pool="avg", num_classes=10)),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28, embed_dim=64, depth=2, num_heads=4, num_classes=0)),
])
def test_import_reads_timms_config(name, kw, tmp_path, capsys):
  tm = timm.create_model(name, pretrained=False, **kw)
  randomize_(tm, 0)
  tm.eval()
  folder = tmp_path / "timm_folder"
  save_for_hf(tm, str(folder), safe_serialization=True)
  out = str(tmp_path / "x.safetensors")
  assert convert_cli.main(["import", str(folder), "--out", out]) == 0  # no --model, no --img-size
  text = capsys.readouterr().out
  assert "timm_folder/config.json (timm)" in text
  side = json.loads((tmp_path / "x.config.json").read_text())
  assert side["img_size"] == kw["img_size"] and side["num_classes"] == kw["num_classes"]
  assert side["global_pool"] == kw.get("global_pool", "token")
  model = nnx.eval_shape(lambda: create_model(*convert.sidecar_model(side)[:1], **convert.sidecar_model(side)[1]))
  convert.load_pytorch_weights(model, out)
  logits_close(model, tm)


def test_export_hub_loads_in_timm(tmp_path, capsys):
  model = create_model("vit_small_patch16", img_size=32, embed_dim=64, depth=2, num_heads=4, pooling="avg",
                       num_classes=5, pos_embed="learn", head_overrides={2: 8})
  rs = np.random.RandomState(0)
  weights = {k: (v + rs.normal(0, 0.05, v.shape)).astype(np.float32)
             for k, v in convert.export_pytorch_weights(model).items()}
  convert.load_pytorch_weights(model, weights)
  src = str(tmp_path / "student.safetensors")
  convert.save_pytorch_weights(model, src)
  hub = str(tmp_path / "hub")
  assert convert_cli.main(["export", "--weights", src, "--hub", hub]) == 0
  text = capsys.readouterr().out
  assert "config.json (vit_tiny_patch16_224)" in text  # a custom size: the patch-16 name, every shape argument set and "regrouped" in text
  tm = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
  assert tm.blocks[1].attn.num_heads == 4  # timm has one head count for every block
  # ours, regrouped the same way, against timm's own loading of the folder
  uniform = create_model("vit_small_patch16", img_size=32, embed_dim=64, depth=2, num_heads=4, pooling="avg",
                         num_classes=5, pos_embed="learn")
  convert.load_pytorch_weights(uniform, weights)
  logits_close(uniform, tm)
  card = (tmp_path / "hub" / "README.md").read_text()
  assert "library_name: timm" in card and "local-dir:" in card
  # and back: the folder is a source, read with its exact fields (per-block heads included)
  back = nnx.eval_shape(lambda: create_model("vit_small_patch16", img_size=32, embed_dim=64, depth=2, num_heads=4,
                                             pooling="avg", num_classes=5, pos_embed="learn", head_overrides={2: 8}))
  report = convert.load_pytorch_weights(back, hub)
  assert "block 2: 8" in str(report) and "as hub/config.json (timm) records" in str(report)
  for k, v in convert.export_pytorch_weights(back).items():
    np.testing.assert_array_equal(v, weights[k])


def test_model_card_names_training_and_evals():
  cfg, _ = convert.timm_hub_config(convert.architecture(create_model("vit_tiny_patch16", img_size=32, depth=2)))
  run = {"objective": "distill", "teachers": ["teacher"], "batch_size": 64, "total_steps": 100,
         "teacher": {"name": "vit_small_patch16_dinov3", "source": "dinov3.pth", "block": None},
         "distill": {"target": "relation", "teacher_block": 12, "student_block": 2},
         "data": {"name": "digits", "image_size": 32}}
  card = convert_cli._model_card("out/hub", cfg, "wd/s", run, {"step": 100, "eval/knn_top1": 0.66})
  for want in ("timm `vit_tiny_patch16_224`", "teacher `teacher`: `vit_small_patch16_dinov3` from `dinov3.pth`, "
               "block 12, target `relation`", "`digits` at 32 px; batch 64, 100 steps", "| eval/knn_top1 | 0.66 |"):
    assert want in card, want


def test_export_hub_refuses_an_mae(tmp_path):
  mae = nnx.eval_shape(lambda: create_model("mae_vit_tiny_patch16", img_size=32, depth=1,
                                            decoder=dict(embed_dim=32, depth=1, num_heads=4)))
  with pytest.raises(convert.ConvertError, match="MAE .* is not a timm model"):
    convert.timm_hub_config(convert.architecture(mae))
