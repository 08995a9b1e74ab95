"""objective='segment' end to end: the README command on the digits scenes (train, resume, export) and a run on
a generated ADEChallengeData2016 folder over 8 devices (bad masks skipped, reduced labels, mIoU written)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from tinymim_jax import config_base, main as trainer
from tinymim_jax.study import load_config_module
from tinymim_jax.objectives import segment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "segment.py")
# configs/segment.py:model=demo (patch 4 at 64 px), smaller still (2 blocks of 32 dims, 16-channel heads, 16 scenes).
TINY = {"model.depth": 2, "model.embed_dim": 32, "segment.out_indices": (1, 2, 2, 2), "segment.channels": 16,
        "segment.aux_channels": 8, "segment.pool_scales": (1, 2), "segment.num_train": 16, "segment.num_val": 5,
        "batch_size": 8, "ckpt_every_steps": 2, "log_every_steps": 2, "eval_every_steps": 0, "warmup_steps": 1}


def cli(workdir):
  args = [f"--config={CONFIG}:model=demo,steps=4"] + [f"--config.{k}={v}".replace(" ", "") for k, v in TINY.items()]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
  return subprocess.run([sys.executable, "-m", "tinymim_jax.main", *args, f"--workdir={workdir}"], env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, timeout=900)


def test_digits_scenes_from_the_command_line_resume_and_export(tmp_path):
  wd = str(tmp_path / "seg")
  first = cli(wd)
  assert first.returncode == 0, first.stdout[-3000:]
  done = json.loads(open(os.path.join(wd, "done.json")).read())
  assert done["step"] == 4 and 0 <= done["eval/mIoU"] <= 1 and 0 <= done["eval/aAcc"] <= 1
  per_class = json.load(open(os.path.join(wd, segment.CLASSES_FILE)))
  assert len(per_class["IoU"]) == 11 and sum(per_class["label_pixels"]) == 5 * 64 * 64
  # The backbone with timm names, and the whole model (adapter, heads, BatchNorm statistics).
  backbone = load_file(os.path.join(wd, "model.safetensors"))
  whole = load_file(os.path.join(wd, segment.SEGMENTER_EXPORT))
  assert "blocks.1.attn.qkv.weight" in backbone and "pos_embed" in backbone
  assert {"decode_head.conv_seg.kernel", "auxiliary_head.conv_seg.kernel", "fpn1.bn.mean",
          "backbone.blocks.1.attn.qkv.kernel"} <= set(whole)
  np.testing.assert_array_equal(whole["backbone.blocks.1.attn.qkv.kernel"].T, backbone["blocks.1.attn.qkv.weight"])
  # Resume: drop the last checkpoint and the done marker; the rerun continues from step 2 to the same end.
  shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
  os.remove(os.path.join(wd, "done.json"))
  second = cli(wd)
  assert second.returncode == 0, second.stdout[-3000:]
  assert "resumed from" in second.stdout and "at step 2" in second.stdout
  again = json.loads(open(os.path.join(wd, "done.json")).read())
  assert again["step"] == 4
  np.testing.assert_allclose(again["eval/mIoU"], done["eval/mIoU"], rtol=1e-5)


def test_tinymim_star_file_into_its_segmenter(tmp_path):
  """configs/segment.py:model=tiny_star (shrunk) from a file in TinyMIM*-T's fine-tuned layout: the distillation
  token and conv1x1 load, the classifier heads are left out, the relative position bias covers CLS + dist token,
  the T* adapter's conv levels train and export."""
  import torch  # pylint: disable=g-import-not-at-top
  from tinymim_jax import convert, create_model  # pylint: disable=g-import-not-at-top
  shape = dict(img_size=64, patch_size=4, embed_dim=32, depth=2, num_heads=4, conv1x1_dim=24, dist_token=True)
  clf = create_model("vit_tiny_patch16", **shape, pooling="avg", pos_embed="learn", num_classes=7)
  sd = convert.export_pytorch_weights(clf)
  assert {"dist_token", "conv1x1.1.weight", "head_dist.weight"} <= set(sd)
  torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}}, tmp_path / "Tstar.pth")
  c = load_config_module(CONFIG).get_config(f"model=tiny_star,dataset=digits_scenes,steps=2,init={tmp_path}/Tstar.pth")
  assert (c.model.num_heads, c.model.dist_token, c.model.conv1x1_dim, c.segment.adapter) == (12, True, 1280,
                                                                                              "tinymim_star")
  c.update_from_flattened_dict({**TINY, **{f"model.{k}": v for k, v in shape.items() if k != "img_size"},
                                "segment.crop": 64, "segment.stride": 48, "segment.scale": (128, 64),
                                "segment.num_classes": 11, "segment.reduce_zero_label": False, "model.drop_path": 0.0})
  wd = str(tmp_path / "wd")
  res = trainer.train_and_evaluate(config_base.finalize(c), wd)
  assert res["step"] == 2 and np.isfinite(res["eval/mIoU"])
  whole = load_file(os.path.join(wd, segment.SEGMENTER_EXPORT))
  assert whole["fpn3.kernel"].shape == (1, 1, 32, 128) and whole["fpn4.kernel"].shape == (3, 3, 24, 128)
  assert whole["backbone.blocks.0.attn.relative_position_bias_table"].shape == ((2 * 16 - 1) ** 2 + 6, 4)
  # Loaded, then moved by two AdamW steps of lr <= 1e-4 (a fresh draw would be ~0.02 away).
  np.testing.assert_allclose(whole["backbone.dist_token"].reshape(-1), np.asarray(sd["dist_token"]).reshape(-1),
                             atol=5e-4)
  backbone = load_file(os.path.join(wd, "model.safetensors"))  # timm / the authors' names
  assert {"dist_token", "conv1x1.0.weight", "blocks.1.attn.relative_position_bias_table"} <= set(backbone)


def write_ade(root):
  """ADEChallengeData2016 with 8 training and 3 validation pairs (labels 0..150) and one bad training mask."""
  from tinymim_jax.data._tf import tf  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)

  def put(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)

  for split, n in (("training", 8), ("validation", 3)):
    for i in range(n):
      mask = np.zeros((48, 80, 1), np.uint8)
      mask[:, 40:] = 1 + i % 3           # classes 0..2 after reduce_zero_label; 0 stays "other" (ignored)
      mask[10:30, 5:25] = 4
      image = np.where(mask > 0, 60 * mask, 0).repeat(3, -1).astype(np.uint8)
      base = os.path.join(root, "ADEChallengeData2016")
      put(os.path.join(base, "images", split, f"ADE_{split}_{i:08d}.jpg"), tf.io.encode_jpeg(image).numpy())
      put(os.path.join(base, "annotations", split, f"ADE_{split}_{i:08d}.png"), tf.io.encode_png(mask).numpy())
  put(os.path.join(root, "ADEChallengeData2016", "annotations", "training", "ADE_training_00000000.png"),
      tf.io.encode_png(np.zeros((47, 80, 1), np.uint8)).numpy())  # wrong size: named and skipped


def test_ade20k_folder_on_8_devices(tmp_path):
  root = str(tmp_path / "ade")
  write_ade(root)
  c = load_config_module(CONFIG).get_config("model=demo,dataset=ade20k,steps=2")
  for k, v in {**TINY, "segment.path": root, "segment.num_train": 0, "segment.num_val": 0,
               "segment.scale": (80, 48), "mesh.fsdp": 2, "model.patch_size": 16}.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  res = trainer.train_and_evaluate(config_base.finalize(c), str(tmp_path / "wd"))
  assert res["step"] == 2 and np.isfinite(res["eval/mIoU"])
  per_class = json.load(open(tmp_path / "wd" / segment.CLASSES_FILE))
  assert len(per_class["IoU"]) == 150
  # Only classes 0, 1, 2 (raw 1..3) and 3 (raw 4) are labelled in validation; raw 0 is ignored.
  labelled = np.nonzero(per_class["label_pixels"])[0].tolist()
  assert labelled == [0, 1, 2, 3]
  metrics = [json.loads(l) for l in open(tmp_path / "wd" / "metrics.jsonl")]
  assert any(m.get("train/skipped_images", 0) >= 1 for m in metrics)  # the bad mask, named in the log
