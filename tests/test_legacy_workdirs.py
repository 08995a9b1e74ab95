"""Workdirs written before the trainer was split into objectives (tests/testdata/legacy, see
tests/helpers/legacy.py) still restore, resume bit-identically, export, and serve as a teacher and as init."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from tinymim_jax import builders, convert, main as trainer, workdir as workdir_lib
from tinymim_jax import config_identity
from tinymim_jax.objectives import distill

from tests.helpers import legacy


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return legacy.relocate(legacy.HERE, str(tmp_path_factory.mktemp("legacy") / "root"))


def _arrays(wd, step, item):
  restored = ocp.PyTreeCheckpointer().restore(os.path.join(wd, "checkpoints", str(step), item))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}


def _assert_same(a: dict, b: dict, what: str):
  assert sorted(a) == sorted(b), what
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}")


@pytest.mark.parametrize("kind", legacy.KINDS)
def test_restores_and_exports_what_it_exported(root, kind):
  wd = os.path.join(root, kind)
  exported = convert.export_pytorch_weights(builders.restore_model(wd))
  _assert_same(exported, load_file(os.path.join(wd, "model.safetensors")), f"{kind}: export of the restored model")
  # The config the test rebuilds is the one the workdir holds: no change, fixed or not.
  assert config_identity.config_changes(workdir_lib.saved_config(wd), legacy.config(kind, root)) == {}


# finetune: the same restore-and-resume path as distill, slow only (its restore and export stay in CI)
@pytest.mark.parametrize("kind", [k if k == "distill" else pytest.param(k, marks=pytest.mark.slow)
                                  for k in legacy.KINDS])
def test_resumes_bit_identically(root, kind, monkeypatch):
  """Resumed from step 2, the run ends with the step-4 checkpoint, export and evals the old code wrote."""
  old, new = os.path.join(root, kind), os.path.join(root, f"{kind}_resumed")
  shutil.copytree(old, new)
  os.remove(os.path.join(new, "done.json"))
  shutil.rmtree(os.path.join(new, "checkpoints", "4"))
  res = trainer.train_and_evaluate(legacy.config(kind, root), new)
  assert res["step"] == 4
  for item in ("model", "opt"):
    _assert_same(_arrays(new, 4, item), _arrays(old, 4, item), f"{kind}: checkpoint 4 {item}")
  _assert_same(load_file(os.path.join(new, "model.safetensors")), load_file(os.path.join(old, "model.safetensors")),
               f"{kind}: export")
  done = json.load(open(os.path.join(old, "done.json")))
  assert {k: v for k, v in res.items() if k.startswith("eval/")} == {
      k: v for k, v in done.items() if k.startswith("eval/")}
  assert res["feature"] == done["feature"]
  # The checkpoint written now records the model it holds (builders.model_record): restoring it needs no
  # objective code (the legacy ones above are rebuilt from their saved config by their objective).
  meta = json.load(open(os.path.join(new, "checkpoints", "4", "meta", "metadata")))
  assert meta[builders.MODEL_KEY]["architecture"]["heads_per_block"]
  monkeypatch.setattr(builders, "make_trainable", lambda *a, **k: pytest.fail("restored by objective code"))
  _assert_same(convert.export_pytorch_weights(builders.restore_model(new)),
               load_file(os.path.join(old, "model.safetensors")), f"{kind}: the self-described checkpoint")


def test_a_distilled_workdir_serves_as_teacher(root):
  wd = os.path.join(root, "distill")
  c = legacy.config("distill", root, **{"teacher.source": wd, "distill.teacher_block": 2})
  teacher = distill.make_teacher(c)
  report = distill.load_teacher(teacher, c)
  assert not report.missing_kept_init
  trained = convert.export_pytorch_weights(builders.restore_model(wd))
  mine = convert.export_pytorch_weights(teacher)
  assert set(mine) <= set(trained) and "blocks.1.attn.qkv.weight" in mine
  for k in mine:
    np.testing.assert_array_equal(mine[k], trained[k], err_msg=k)
