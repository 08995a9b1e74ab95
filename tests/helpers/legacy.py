"""The workdirs in tests/testdata/legacy/: tiny finished runs written by the code of commit 5c004f4 (before the
trainer was split into objectives), kept so that every later version is checked against what that one wrote.

  teacher.safetensors (+ .config.json)  a random ViT (D 16, 2 blocks, 2 heads), the distillation's teacher
  distill/    TinyMIM relation distillation from it: student D 16, 2 blocks, 2 heads; 4 steps, checkpoints 2, 4
  finetune/   fine-tuning of that student (init: distill/); 4 steps, checkpoints 2, 4

Made with `python -m tests.helpers.legacy` (from the repo root); the paths in their configs start with
CREATED_AT, which a test replaces by where its copy lies (`relocate`).
"""

import json
import os
import shutil
import sys

CREATED_AT = "/tmp/tinymim_legacy"
HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "testdata", "legacy")
KINDS = ("distill", "finetune")
TINY = dict(embed_dim=16, depth=2, num_heads=2)


def config(kind: str, root: str, **overrides):
  """The config that made `root/<kind>` (the digits demo's stage, tiny), finalised; `overrides` as tiny_config's."""
  from tests.test_main import tiny_config
  common = {"total_steps": 4, "warmup_steps": 1, "ckpt_every_steps": 2, "keep_ckpts": 2, "log_every_steps": 2, "eval.max_train": 64,
            "eval.fewshot.shots": (1, 2), "eval.fewshot.draws": 1, "eval.fewshot.val_per_class": 1,
            **{f"model.{k}": v for k, v in TINY.items()}}
  if kind == "distill":
    stage = "student_distill"
    common.update({"teacher.source": os.path.join(root, "teacher.safetensors"), "teacher.embed_dim": 16,
                   "teacher.depth": 2, "teacher.num_heads": 2, "distill.teacher_block": 2,
                   "distill.student_block": 2})
  else:
    stage = "student_finetune"
    common.update({"init": os.path.join(root, "distill")})
  return tiny_config(stage, root, **{**common, **overrides})


def relocate(src: str, dst: str) -> str:
  """A copy of the legacy workdirs at `dst`, the paths in their configs pointing there; -> dst."""
  shutil.copytree(src, dst)
  for kind in KINDS:
    path = os.path.join(dst, kind, "config.json")
    with open(path) as f:
      text = f.read()
    with open(path, "w") as f:
      f.write(text.replace(CREATED_AT, dst))
  return dst


def make() -> None:
  from tinymim_jax import convert, main as trainer
  from tinymim_jax.models import create_model
  shutil.rmtree(CREATED_AT, ignore_errors=True)
  os.makedirs(CREATED_AT)
  teacher = create_model("vit_tiny_patch16", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, seed=7)
  convert.save_pytorch_weights(teacher, os.path.join(CREATED_AT, "teacher.safetensors"))
  for kind in KINDS:
    wd = os.path.join(CREATED_AT, kind)
    res = trainer.train_and_evaluate(config(kind, CREATED_AT), wd)
    assert res["step"] == 4, res
    for extra in ("tensorboard", "curves.png"):  # not read by anything the tests check
      p = os.path.join(wd, extra)
      shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
  shutil.rmtree(HERE, ignore_errors=True)
  shutil.copytree(CREATED_AT, HERE)
  print(json.dumps({k: json.load(open(os.path.join(HERE, k, "done.json"))) for k in KINDS}, indent=1))


if __name__ == "__main__":
  sys.exit(make())
