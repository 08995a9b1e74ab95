"""The evals report what their names say: a k-shot score from k shots, or none (with a warning naming the class
counts); what the data cannot give is found when the run starts, and the run still finishes."""

import json
import logging
import os

import ml_collections
import numpy as np

from tinymim_jax import config_base, evals
from tinymim_jax import main as trainer
from tinymim_jax.data.pipeline import DatasetInfo

from test_main import tiny_config


def _features(per_class, num_classes=10, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(num_classes), per_class)
  return rng.normal(size=(len(y), dim)) + 3 * np.eye(num_classes, dim)[y], y


def test_a_k_shot_score_uses_k_shots_or_is_not_reported(caplog):
  section = config_base.base_config().eval.fewshot
  f_train, y_train = _features(12)  # 10 held out per class leave 2: a 1-shot, no 5/10/25-shot
  f_test, y_test = _features(5, seed=1)
  with caplog.at_level(logging.WARNING):
    res = evals._fewshot(section, f_train, y_train, f_test, y_test, 10)
  assert list(res) == ["eval/fewshot_1shot_top1"]
  assert "5-shot, 10-shot, 25-shot not reported" in caplog.text and "min 12" in caplog.text


def test_what_the_data_cannot_give_is_planned_at_start():
  e = config_base.base_config().eval
  e.max_train = 150
  sections, notes = evals.plan_feature_evals(e, DatasetInfo("digits", 10, 1437, 360, 32))
  assert list(sections) == ["knn", "fewshot"] and tuple(sections["fewshot"].shots) == (1, 5)
  assert len(notes) == 1 and "10-shot, 25-shot skipped" in notes[0] and "at most 15 per class" in notes[0]
  e.max_train = 50
  sections, notes = evals.plan_feature_evals(e, DatasetInfo("digits", 10, 1437, 360, 32))
  assert list(sections) == ["knn"] and "few-shot eval skipped" in notes[0] and "raise eval.max_train" in notes[0]


def test_a_run_on_data_too_small_for_few_shot_finishes_with_one_warning(tmp_path, caplog):
  config = tiny_config("teacher_mae", str(tmp_path), total_steps=1, ckpt_every_steps=1)
  config.unlock()
  config.eval.max_train = 64  # 6 per class: fewer than the 10 held out
  config.lock()
  with caplog.at_level(logging.WARNING):
    res = trainer.train_and_evaluate(config, str(tmp_path / "wd"))
  assert res["step"] == 1 and "eval/knn_top1" in res and not any("fewshot" in k for k in res)
  assert os.path.exists(tmp_path / "wd" / "done.json") and os.path.exists(tmp_path / "wd" / "model.safetensors")
  assert sum("few-shot eval skipped" in r.getMessage() for r in caplog.records) == 1
