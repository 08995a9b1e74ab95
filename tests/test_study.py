"""The study runner: statistics, the report from finished (and unfinished) runs, and the quick study end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import fake_fmnist
from tinymim_jax import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fmnist_study.py")


# ---------------------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------------------
def test_paired_difference_is_a_t_interval_over_seed_differences():
  x, ref = {0: 0.80, 1: 0.83, 2: 0.81, 3: 0.90}, {0: 0.78, 1: 0.80, 2: 0.80}  # seed 3 has no partner
  n, mean, (lo, hi) = study.paired_difference(x, ref)
  d = np.array([0.02, 0.03, 0.01])
  half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # t_{0.975, 2} from a table
  assert n == 3 and mean == pytest.approx(0.02) and (lo, hi) == pytest.approx((0.02 - half, 0.02 + half))
  assert study.t_quantile(4) == pytest.approx(2.7764451051977987)
  assert study.paired_difference({0: 0.5}, {0: 0.4})[:3] == (1, pytest.approx(0.1), None)
  assert study.paired_difference({}, {0: 0.4}) == (0, None, None)


@pytest.mark.parametrize("prediction,ci,expected", [
    ("lower", (-0.03, -0.01), "held"), ("lower", (-0.01, 0.02), "not significant"),
    ("lower", (0.01, 0.03), "contradicted"), ("higher", (0.01, 0.03), "held"),
    ("higher", (-0.03, -0.01), "contradicted"), ("higher", (-0.01, 0.01), "not significant"),
    ("lower", None, "n/a (< 2 paired seeds)"), (None, (0.1, 0.2), ""),
])
def test_verdict(prediction, ci, expected):
  assert study.verdict(prediction, ci) == expected


# ---------------------------------------------------------------------------------------------------------
# The report from done.json files (no training).
# ---------------------------------------------------------------------------------------------------------
def _fake_runs(root, module, *, drop=(), frozen_keys=("eval/knn_top1",)):
  """done.json for every planned run but `drop`: arm 'mae' 2 points below arm 1 in fine-tuning on every seed."""
  rng = np.random.default_rng(0)
  for name, _ in module.plan(False):
    if name in drop:
      continue
    os.makedirs(os.path.join(root, name), exist_ok=True)
    done = {"step": 10}
    if name.startswith("seed"):
      seed, arm, stage = name.split("/")
      base = 0.85 + 0.01 * int(seed[4:]) - (0.02 if arm == "mae" else 0.0) + 0.001 * rng.standard_normal()
      if stage == "finetune":
        done["eval/top1"] = base
      elif stage == "eval":
        done.update({k: base - 0.1 for k in frozen_keys})
    elif name == "teacher":
      done["eval/knn_top1"] = 0.8
    with open(os.path.join(root, name, "done.json"), "w") as f:
      json.dump(done, f)
    with open(os.path.join(root, name, "metrics.jsonl"), "w") as f:
      for step in (5, 10):
        f.write(json.dumps({"step": step, "time": 0.0, "train/loss": 1.0 / step}) + "\n")


def _rows(text, heading):
  """{first cell: line} of the Markdown table under `heading`."""
  section = text.split(heading, 1)[1].split("\n## ", 1)[0]
  return {l.split(" | ")[0][2:]: l for l in section.splitlines() if l.startswith("| ")}


def test_report_table_predictions_and_missing_runs(tmp_path):
  module = study.load_config_module(CONFIG)
  drop = ("seed2/cls/finetune", "seed1/seq/eval")
  _fake_runs(str(tmp_path / "wd"), module, drop=drop)
  path = str(tmp_path / "out" / "REPORT.md")
  os.makedirs(os.path.dirname(path))
  text = study.write_report(module, str(tmp_path / "wd"), path, config_path="configs/fmnist_study.py")
  assert open(path).read() == text
  rows = _rows(text, "## Scores")
  assert list(rows)[1:] == [label for label, _, _ in module.ARMS.values()]
  # The MAE arm is 2 points below arm 1 on every seed: held, with a tight interval around -2.00.
  mae = _rows(text, "## The paper's predictions")["5. MAE from scratch (no teacher)"]
  assert "| -2.0" in mae and "**held**" in mae.split(" | ")[3]
  assert "(n=2/3)" in rows["4. class-token target (block 6)"]  # one fine-tune missing
  assert "Partial: 2 of" in text and "`seed2/cls/finetune`" in text and "`seed1/seq/eval`" in text
  # Columns main does not produce yet are named, not faked.
  assert "| — |" in rows["1. relation, teacher block 6 of 8 (TinyMIM)"]
  assert "Not reported by this version of the `eval` objective: linear probe top-1" in text
  assert "teacher (MAE, trained once, shared by all seeds and arms): k-NN top-1 80.00" in text
  assert "Fixed up front for every arm" in text  # the hyper-parameters, from the config docstring
  for png in ("report_scores.png", "report_curves.png"):
    p = tmp_path / "out" / "results" / png
    assert p.exists() and p.stat().st_size < 150_000


def test_report_shows_frozen_feature_columns_when_present(tmp_path):
  module = study.load_config_module(CONFIG)
  keys = ("eval/knn_top1", "eval/linprobe_top1", "eval/linprobe_top5", "eval/fewshot_1shot_top1",
          "eval/fewshot_10shot_top1")
  _fake_runs(str(tmp_path), module, frozen_keys=keys)
  text = study.write_report(module, str(tmp_path), str(tmp_path / "R.md"))
  header = next(l for l in text.splitlines() if l.startswith("| arm |"))
  for title in ("linear probe top-1", "linear probe top-5", "k-NN top-1", "1-shot top-1", "10-shot top-1"):
    assert title in header
  assert "5-shot" not in header and "Partial" not in text
  verdicts = next(l for l in text.splitlines() if l.startswith("| comparison |"))
  assert "Δ 10-shot top-1" in verdicts and "Δ linear probe top-1" in verdicts


def test_plan_is_teacher_first_then_seed_major():
  module = study.load_config_module(CONFIG)
  names = [n for n, _ in module.plan(False)]
  assert names[0] == "teacher" and len(names) == len(set(names))
  seeds = [int(n.split("/")[0][4:]) for n in names if n.startswith("seed")]
  assert seeds == sorted(seeds) and set(seeds) == set(module.SEEDS)
  assert names.index("middle") < names.index("seed0/seq/pretrain")
  assert len([n for n in names if n.endswith("/pretrain")]) == len(module.ARMS) * len(module.SEEDS)
  quick = [n for n, _ in module.plan(True)]
  assert quick == ["teacher"] + [f"seed0/{a}/{s}" for a in module.QUICK_ARMS for s in ("pretrain", "eval", "finetune")]


def test_hyperparameters_in_the_docstring_match_the_config():
  module = study.load_config_module(CONFIG)
  doc = " ".join(module.__doc__.split())  # line breaks inside phrases do not count
  spe = 60000 // module.BATCH
  lr = lambda v: f"{v:.0e}".replace("e-0", "e-")
  for text in (f"student / middle {module.PRETRAIN_EPOCHS:g} epochs ({int(module.PRETRAIN_EPOCHS * spe)} steps)",
               f"teacher {module.TEACHER_EPOCHS:g} epochs ({int(module.TEACHER_EPOCHS * spe)} steps)",
               f"fine-tuning: {module.FINETUNE_EPOCHS:g} epoch", f"({int(module.FINETUNE_EPOCHS * spe)} steps)",
               f"batch {module.BATCH},", f"lr {lr(module.PRETRAIN_LR)} peak", f"lr {lr(module.FINETUNE_LR)} peak",
               f"warmup {module.WARMUP_EPOCHS:g} epoch", f"seeds {', '.join(map(str, module.SEEDS))}",
               f"drop path {module.DISTILL_DROP_PATH:g}", f"first {module.KNN_TRAIN:,} train images",
               f"D {module.TEACHER['embed_dim']}, depth {module.TEACHER['depth']}",
               f"D {module.MIDDLE['embed_dim']}, depth {module.MIDDLE['depth']}",
               f"D {module.STUDENT['embed_dim']}, depth {module.STUDENT['depth']}",
               f"image {module.IMG} px, patch {module.PATCH}", f"teacher block {module.TEACHER_BLOCK}",
               f"batch {module.PROBE['batch_size']}, base lr {module.PROBE['base_lr']:g}, "
               f"{module.PROBE['epochs']:g} epochs, {module.PROBE['warmup_epochs']:g} warmup"):
    assert text in doc, text


# ---------------------------------------------------------------------------------------------------------
# The quick study, end to end, on small fake idx files (CI needs no dataset package).
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.study
def test_quick_study_end_to_end(tmp_path, capsys):
  """The CLI on one CPU device (a subprocess), then an in-process rerun that finds everything finished."""
  data_dir = str(tmp_path / "fmnist")
  fake_fmnist.make(data_dir, n_train=384, n_test=96)
  repo_results = os.path.join(ROOT, "RESULTS.md")
  before = open(repo_results).read() if os.path.exists(repo_results) else None
  wd, report = str(tmp_path / "wd"), str(tmp_path / "QUICK.md")
  args = ["--config", f"{CONFIG}:idx_dir={data_dir}", "--workdir", wd, "--quick", "--results", report]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": ROOT}
  proc = subprocess.run([sys.executable, "-m", "tinymim_jax.study", *args], env=env, cwd=ROOT, text=True,
                        capture_output=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  module = study.load_config_module(CONFIG)
  for name, _ in module.plan(True):
    assert os.path.exists(os.path.join(wd, name, "done.json")), name
  text = open(report).read()
  assert "Quick check" in text and "Partial" not in text
  for arm in module.QUICK_ARMS:
    row = next(l for l in text.splitlines() if l.startswith(f"| {module.ARMS[arm][0]} |"))
    cells = row.split(" | ")
    assert 0 <= float(cells[1]) <= 100 and 0 <= float(cells[3]) <= 100  # fine-tune and k-NN top-1, one seed
  assert os.path.exists(tmp_path / "results" / "quick_scores.png")
  assert os.path.exists(tmp_path / "results" / "quick_curves.png")
  times = json.load(open(os.path.join(wd, study.TIMES)))
  assert set(times) == {n for n, _ in module.plan(True)} and all(t["cpu_s"] > 0 for t in times.values())
  # A rerun trains nothing and keeps the recorded times; the repository's RESULTS.md was not touched.
  assert study.main(args) == 0
  assert capsys.readouterr().out.count("finished earlier") == len(module.plan(True))
  assert json.load(open(os.path.join(wd, study.TIMES))) == times
  assert (open(repo_results).read() if os.path.exists(repo_results) else None) == before
