"""builders: the teacher and init loads as the main job does them (config fields, hints, heads), and restoring a
run's model without writing into its directory."""

import json
import os
import shlex

import numpy as np
import pytest
import torch
from absl import flags
from ml_collections import config_flags

from tests.helpers import torch_ref
from tests.helpers.tiny import IMG, PATCH, distill_config
from tinymim_jax import builders, checkpoint, config_base, convert
from tinymim_jax import train_steps as ts
from tinymim_jax.objectives import distill

TEACHER = dict(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=4, num_heads=4)  # distill_config's teacher


def sd_numpy(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def tree(path):
  return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)))
                for d, _, files in os.walk(path) for f in files)


def typed_flag(tmp_path, flag: str):
  """The config the main job's command line gives for `flag` (exactly as a hint spells it, shell quoting too)."""
  cfg = tmp_path / "base_cfg.py"
  cfg.write_text("from tinymim_jax import config_base\n\ndef get_config():\n  return config_base.base_config()\n")
  argv = ["main", f"--config={cfg}", *shlex.split(flag)]
  fv = flags.FlagValues()
  # sys_argv: what the main job's process sees (config_flags reads it to type an empty tuple's items).
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def hint_flag(message: str) -> str:
  return next(line.split(": ")[-1] for line in message.splitlines() if "hint:" in line)


@pytest.fixture(scope="module")
def finetuned_teacher_file(tmp_path_factory):
  """A teacher with a fine-tuned tail (fc_norm + head, no final norm), as MAE's main_finetune saves it."""
  tm = torch_ref.timm_vit(TEACHER, pooling="avg", num_classes=10, seed=3)
  path = tmp_path_factory.mktemp("teacher") / "vit_finetuned.pth"
  torch.save({"model": tm.state_dict(), "epoch": 99}, path)
  return path, sd_numpy(tm)


# --------------------------------------------------------------------------------------------------------
# The teacher: exactly what it runs.
# --------------------------------------------------------------------------------------------------------
def test_teacher_loads_exactly_the_blocks_it_runs(finetuned_teacher_file, tmp_path):
  path, sd = finetuned_teacher_file
  c = distill_config(teacher_block=3)
  c.teacher.source = str(path)
  teacher = distill.make_teacher(c)
  assert teacher.config.depth == 3 and len(teacher.blocks) == 3
  report = distill.load_teacher(teacher, c)
  not_run = {k for k, r in report.skipped.items() if r.startswith("not run")}
  assert not_run == {k for k in sd if k.startswith(("blocks.3.", "fc_norm.", "head."))}
  assert set(report.loaded) == set(sd) - not_run and report.unused_kept_init == ["norm.weight", "norm.bias"]
  # Block 3's q, k, v are those of the whole fine-tuned model (timm) at block 3.
  full = builders.create_model("vit_tiny_patch16", **TEACHER, pooling="avg", num_classes=10)
  convert.load_pytorch_weights(full, sd)
  x = np.random.RandomState(0).randn(2, IMG, IMG, 3).astype(np.float32)
  a = teacher(x, depth=3, capture=(3,), qkv_only=True)["blocks"][3]
  b = full(x, depth=3, capture=(3,), qkv_only=True)["blocks"][3]
  for k in "qkv":
    np.testing.assert_array_equal(a[k], b[k])
  # A file without one of the parts the teacher runs is still refused, naming it.
  sd = {k: v for k, v in sd.items() if k != "blocks.2.attn.qkv.bias"}
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "holey.pth")
  c.teacher.source = str(tmp_path / "holey.pth")
  with pytest.raises(convert.WeightMismatchError, match=r"blocks\.2\.attn\.qkv\.bias \(192,\)"):
    distill.load_teacher(distill.make_teacher(c), c)


def test_teacher_hint_is_a_config_flag_that_works(finetuned_teacher_file, tmp_path):
  path, sd = finetuned_teacher_file
  torch.save({"model": {**{k: torch.from_numpy(v) for k, v in sd.items()}, "dist_token": torch.zeros(1, 1, 64)}},
             tmp_path / "deit_like.pth")
  c = distill_config(teacher_block=3)
  c.teacher.source = str(tmp_path / "deit_like.pth")
  with pytest.raises(convert.WeightMismatchError) as err:
    distill.load_teacher(distill.make_teacher(c), c)
  flag = hint_flag(str(err.value))
  assert flag == "--config.teacher.skip='^dist_token$'" and "skip=(" not in str(err.value)
  c.teacher.skip = typed_flag(tmp_path, flag).teacher.skip
  report = distill.load_teacher(distill.make_teacher(c), c)
  assert report.skipped["dist_token"] == "matches skip pattern '^dist_token$'"


def test_teacher_ema_and_prefix_fields(finetuned_teacher_file, tmp_path):
  _, sd = finetuned_teacher_file
  ema = {k: v + 1.0 for k, v in sd.items()}
  wrap = lambda d: {f"model.{k}": torch.from_numpy(v) for k, v in d.items()}
  torch.save({"state_dict": wrap(sd), "state_dict_ema": wrap(ema)}, tmp_path / "lightning.ckpt")
  c = distill_config(teacher_block=3)
  c.teacher.source = str(tmp_path / "lightning.ckpt")
  for use_ema, want in ((True, ema), (False, sd)):
    c.teacher.ema = use_ema
    teacher = distill.make_teacher(c)
    report = distill.load_teacher(teacher, c)
    got = convert.export_pytorch_weights(teacher)
    np.testing.assert_array_equal(got["blocks.0.attn.qkv.weight"], want["blocks.0.attn.qkv.weight"])
    flip = f"--config.teacher.ema={str(not use_ema).lower()}"
    assert f"{flip} loads" in str(report) and "prefix: 'model.' removed" in str(report)
  both = {**{f"student.{k}": torch.from_numpy(v) for k, v in sd.items()},
          **{f"teacher.{k}": torch.from_numpy(v) for k, v in ema.items()}}
  torch.save(both, tmp_path / "dino.pth")
  c.teacher.source = str(tmp_path / "dino.pth")
  with pytest.raises(convert.AmbiguousCheckpointError, match="--config.teacher.prefix=teacher"):
    distill.load_teacher(distill.make_teacher(c), c)
  c.teacher.prefix = typed_flag(tmp_path, "--config.teacher.prefix=teacher").teacher.prefix
  teacher = distill.make_teacher(c)
  distill.load_teacher(teacher, c)
  np.testing.assert_array_equal(convert.export_pytorch_weights(teacher)["cls_token"], ema["cls_token"])


# --------------------------------------------------------------------------------------------------------
# init: a class-count mismatch hints at init_skip.
# --------------------------------------------------------------------------------------------------------
def finetune_config(init, num_classes=5, num_heads=None):
  c = config_base.base_config()
  c.objective, c.init = "finetune", str(init)
  c.model.update(dict(name="vit_tiny_patch16", **{**TEACHER, "num_heads": num_heads}, pooling="avg",
                      num_classes=num_classes))
  return c


def test_init_class_count_mismatch_hints_at_init_skip(finetuned_teacher_file, tmp_path):
  path, sd = finetuned_teacher_file  # 10 classes
  c = finetune_config(path, num_classes=5, num_heads=4)
  model = builders.make_model(c)
  with pytest.raises(convert.WeightMismatchError) as err:
    builders.load_init(model, c)
  assert "head.weight: file (10, 64), model expects (5, 64)" in str(err.value)
  flag = hint_flag(str(err.value))
  assert flag == r"--config.init_skip='^head\.'"
  c.init_skip = typed_flag(tmp_path, flag).init_skip
  report = builders.load_init(model, c)
  assert sorted(report.missing_kept_init) == ["head.bias", "head.weight"]
  np.testing.assert_array_equal(convert.export_pytorch_weights(model)["fc_norm.weight"], sd["fc_norm.weight"])


def test_init_ema_and_prefix_fields(finetuned_teacher_file, tmp_path):
  _, sd = finetuned_teacher_file
  ema = {k: v * 0.5 for k, v in sd.items()}
  torch.save({"model": {f"backbone.{k}": torch.from_numpy(v) for k, v in sd.items()},
              "model_ema": {f"backbone.{k}": torch.from_numpy(v) for k, v in ema.items()}}, tmp_path / "deit.pth")
  for use_ema, want in ((True, ema), (False, sd)):
    c = finetune_config(tmp_path / "deit.pth", num_classes=10, num_heads=4)
    c.init_ema = use_ema
    model = builders.make_model(c)
    report = builders.load_init(model, c)
    assert f"--config.init_ema={str(not use_ema).lower()} loads" in str(report)
    np.testing.assert_array_equal(convert.export_pytorch_weights(model)["head.weight"], want["head.weight"])
  c.init_prefix = "nothing"
  with pytest.raises(convert.ConvertError, match="prefix 'nothing' names none"):
    builders.load_init(builders.make_model(c), c)


# --------------------------------------------------------------------------------------------------------
# Workdirs: read, never written; heads recorded beside the weights.
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny run's workdir (one checkpoint) whose model has 8 heads, not its variant's 3."""
  wd = str(tmp_path_factory.mktemp("run") / "wd")
  c = finetune_config("", num_classes=10, num_heads=8)
  c.init = ""
  model, extras = builders.make_trainable(c, num_classes=10)
  tx, _, _ = builders.make_optimizer(c, ts.split_model(model, extras)[1], total_steps=10, warmup_steps=1)
  _, _, state = ts.init_state(model, tx, extras=extras)
  ckpt = checkpoint.Checkpointer(wd, async_save=False)
  ckpt.save(1, {k: v for k, v in state.items() if k != "teachers"}, {"config": json.loads(c.to_json_best_effort()), "num_classes": 10})
  ckpt.close()
  return wd, convert.export_pytorch_weights(model)


def test_restore_model_reads_only(run_dir, tmp_path):
  wd, weights = run_dir
  before = tree(wd)
  model = builders.restore_model(wd)
  assert tree(wd) == before and model.config.num_heads == 8
  for k, v in convert.export_pytorch_weights(model).items():
    np.testing.assert_array_equal(v, weights[k])
  # A directory that is not a run: a clear error, and nothing created in it.
  plain = tmp_path / "photos"
  plain.mkdir()
  for fn in (builders.restore_model, lambda d: builders.load_weights(builders.make_model(finetune_config("", num_heads=4)), d)):
    with pytest.raises(convert.MissingSourceError, match="is not a tinymim-jax workdir"):
      fn(str(plain))
    assert os.listdir(plain) == []
  with pytest.raises(convert.MissingSourceError, match="neither a file nor a tinymim-jax workdir"):
    builders.load_weights(builders.make_model(finetune_config("", num_heads=4)), str(tmp_path / "absent"))
  assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("kind", ["file", "workdir"])
def test_recorded_heads_are_used_unless_the_config_says_otherwise(run_dir, tmp_path, kind):
  wd, weights = run_dir
  source = wd
  if kind == "file":
    source = str(tmp_path / "tinymim_t.safetensors")
    convert.save_pytorch_weights(builders.restore_model(wd), source)
  # A teacher: the recorded 8 heads where the config leaves them to the variant (3 for vit_tiny) ...
  c = distill_config(teacher_block=2)
  c.teacher.update(dict(num_heads=None, embed_dim=64, depth=2, source=source))
  notes = builders.resolve_source_heads(c, teachers=c.teachers)
  assert c.teacher.num_heads == 8 and "config.teacher.num_heads = 8" in notes[0]
  teacher = distill.make_teacher(c)
  c.model.num_heads = None
  report = distill.load_teacher(teacher, c)
  assert "heads: 8 per block, as " in str(report)
  # ... and a clear error where the config names another count.
  c.teacher.num_heads = 4
  with pytest.raises(convert.ConvertError, match="config.teacher.num_heads=4, but .* records 8 heads.*"
                                                 "--config.teacher.num_heads=8"):
    builders.resolve_source_heads(c, teachers=c.teachers)
  # init: the same; an explicit count regroups the same weights (fine-tuning's standard heads) and is noted.
  c = finetune_config(source, num_classes=10, num_heads=None)
  builders.resolve_source_heads(c)
  assert c.model.num_heads == 8
  c = finetune_config(source, num_classes=10, num_heads=4)
  assert "regrouped into 4 heads" in builders.resolve_source_heads(c)[0] and c.model.num_heads == 4


def test_model_record_rebuilds_the_model_and_its_extra_layers():
  """A checkpoint's record of its model (builders.model_record) gives back the same architecture and the same
  extra layers' params (the feature target's width projection, 48 -> 64) without the objective's builder."""
  import jax  # pylint: disable=g-import-not-at-top
  model, extras = builders.make_trainable(distill_config(target="feature"))
  assert set(extras) == {"distill_proj"}
  record = json.loads(json.dumps(builders.model_record(model, extras)))  # as the checkpoint's JSON holds it
  built, built_extras = builders._saved_trainable({builders.MODEL_KEY: record})
  assert convert.architecture(built) == convert.architecture(model)
  assert convert.architecture(model)["heads_per_block"] == [2, 2, 4]  # the relation block's own head count
  shapes = lambda t: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), t)
  assert shapes(built_extras) == shapes({"distill_proj": ts.split_model(extras["distill_proj"])[1]})
  assert shapes(built_extras)["distill_proj"]["linear"]["kernel"] == ((48, 64), "float32")
