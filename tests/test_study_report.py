"""The study's report: statistics, the table from finished (and unfinished) runs, floors and the regime gate."""

import json
import os

import numpy as np
import pytest

from tinymim_jax import study, study_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fmnist_study.py")

# ---------------------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------------------
def test_paired_difference_is_a_t_interval_over_seed_differences():
  x, ref = {0: 0.80, 1: 0.83, 2: 0.81, 3: 0.90}, {0: 0.78, 1: 0.80, 2: 0.80}  # seed 3 has no partner
  n, mean, (lo, hi) = study_report.paired_difference(x, ref)
  d = np.array([0.02, 0.03, 0.01])
  half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # t_{0.975, 2} from a table
  assert n == 3 and mean == pytest.approx(0.02) and (lo, hi) == pytest.approx((0.02 - half, 0.02 + half))
  assert study_report.t_quantile(4) == pytest.approx(2.7764451051977987)
  assert study_report.paired_difference({0: 0.5}, {0: 0.4})[:3] == (1, pytest.approx(0.1), None)
  assert study_report.paired_difference({}, {0: 0.4}) == (0, None, None)


@pytest.mark.parametrize("prediction,ci,expected", [
    ("lower", (-0.03, -0.01), "held"), ("lower", (-0.01, 0.02), "not significant"),
    ("lower", (0.01, 0.03), "contradicted"), ("higher", (0.01, 0.03), "held"),
    ("higher", (-0.03, -0.01), "contradicted"), ("higher", (-0.01, 0.01), "not significant"),
    ("lower", None, "n/a (< 2 paired seeds)"), (None, (0.1, 0.2), ""),
])
def test_verdict(prediction, ci, expected):
  assert study_report.verdict(prediction, ci) == expected


# ---------------------------------------------------------------------------------------------------------
# The report from done.json files (no training).
# ---------------------------------------------------------------------------------------------------------
FROZEN = ("eval/knn_top1", "eval/linprobe_top1", "eval/linprobe_top5", "eval/fewshot_1shot_top1",
          "eval/fewshot_5shot_top1", "eval/fewshot_10shot_top1", "eval/fewshot_25shot_top1")


def _fake_runs(root, module, *, drop=(), pixel=0.5, teacher=0.7, frozen_keys=FROZEN):
  """done.json for every planned run but `drop`. Fine-tuning: arm 1 at 0.85 + 0.01 seed, arm 'mae' 2 points below
  it on every seed, the random-init control 5 below; frozen features 0.1 below that. Floors: `pixel` for every
  key (and the logistic regression); the teacher's frozen features at `teacher`."""
  rng = np.random.default_rng(0)
  for name, _ in module.plan(False):
    if name in drop:
      continue
    os.makedirs(os.path.join(root, name), exist_ok=True)
    done = {"step": 10}
    if name.startswith("seed"):
      seed, arm, stage = name.split("/")
      base = (0.85 + 0.01 * int(seed[4:]) - {"mae": 0.02, "control": 0.05}.get(arm, 0.0)
              + 0.001 * rng.standard_normal())
      if stage.startswith("ft"):
        done["eval/top1"] = base
      elif stage == "eval":
        done.update({k: base - 0.1 for k in frozen_keys})
    elif name == "teacher_eval":
      done.update({k: teacher for k in frozen_keys})
    elif name == "floors":
      done.update({k: pixel for k in (*frozen_keys, "eval/logreg_top1")})
    with open(os.path.join(root, name, "done.json"), "w") as f:
      json.dump(done, f)
    with open(os.path.join(root, name, "metrics.jsonl"), "w") as f:
      for step in (5, 10):
        f.write(json.dumps({"step": step, "time": 0.0, "train/loss": 1.0 / step}) + "\n")


def _rows(text, heading):
  """{first cell: line} of the Markdown table under `heading`."""
  section = text.split(heading, 1)[1].split("\n## ", 1)[0]
  return {l.split(" | ")[0][2:]: l for l in section.splitlines() if l.startswith("| ")}


def test_report_table_floors_predictions_and_missing_runs(tmp_path):
  module = study.load_config_module(CONFIG)
  seeds = module.ARMS["mae"][3]
  drop = (f"seed{seeds[-1]}/mae/ft1", "seed0/feature/eval")  # a seed of a 5-seed arm, a side arm's only eval
  _fake_runs(str(tmp_path / "wd"), module, drop=drop)
  path = str(tmp_path / "out" / "REPORT.md")
  os.makedirs(os.path.dirname(path))
  text = study_report.write_report(module, str(tmp_path / "wd"), path, config_path="configs/fmnist_study.py")
  assert open(path).read() == text
  assert text.startswith(f"# {module.TITLE}")
  rows = _rows(text, "## Scores")
  labels = [entry[0] for entry in module.ARMS.values()]
  assert list(rows)[1:] == ["floor: raw pixels, same protocol", "teacher (frozen)", *labels]
  low_label = "— | " * (len(module.REGIMES) - 1)  # the low-label fine-tunes have no pixel floor
  assert f"| 50.00 (logistic regression) | {low_label}50.00 |" in rows["floor: raw pixels, same protocol"]
  # The MAE arm is 2 points below arm 1 on every seed: held (every floor is cleared), interval around -2.00.
  mae = _rows(text, "## The paper's predictions")["5. MAE from scratch (no teacher)"]
  assert "| -2.0" in mae and "**held**" in mae.split(" | ")[3]
  n = len(seeds)
  assert f"(n={n - 1}/{n})" in rows["5. MAE from scratch (no teacher)"]  # one 1% fine-tune missing
  assert rows["3. feature target (block 4)"].split(" | ")[4] == "—"  # its one eval missing: no value
  assert "Partial: 2 of" in text and f"`seed{seeds[-1]}/mae/ft1`" in text and "`seed0/feature/eval`" in text
  assert rows["6. no pretraining (random init)"].split(" | ")[4] == ""  # no frozen features: not planned
  assert "The regime gate" in text and "Fixed up front for every arm" in text  # the config's DESIGN
  for png in ("report_scores.png", "report_curves.png"):
    p = tmp_path / "out" / "results" / png
    assert p.exists() and p.stat().st_size < 150_000


def test_the_gate_withholds_verdicts_below_a_floor(tmp_path):
  """Pixels at 0.78 on every key: the frozen features (0.75-0.79) and the teacher (0.7) are below it, so no
  frozen-feature comparison gets a verdict, and fine-tuning (teacher's probe below pixels) neither."""
  module = study.load_config_module(CONFIG)
  _fake_runs(str(tmp_path), module, pixel=0.78)
  text = study_report.write_report(module, str(tmp_path), str(tmp_path / "R.md"))
  preds = _rows(text, "## The paper's predictions")
  mae = preds["5. MAE from scratch (no teacher)"].split(" | ")
  assert all("the regime is too small for it" in cell and "teacher 70.00 <= pixels 78.00" in cell
             for cell in mae[3:]), mae
  assert "held" not in text.split("## The paper's predictions", 1)[1].split("## Wall time")[0].replace(
      "*held*", "")
  # A good teacher and pixels at 0.5: k-NN verdicts come back; the control (5 below) is held on fine-tuning.
  _fake_runs(str(tmp_path), module, pixel=0.5, teacher=0.9)
  text = study_report.write_report(module, str(tmp_path), str(tmp_path / "R.md"))
  control = _rows(text, "## The paper's predictions")["6. no pretraining (random init)"]
  assert abs(float(control.split(" | ")[3].split(" ")[0]) + 5.0) < 0.2  # 5 points below, up to the noise
  assert "**held**" in control and "too small" not in control
  # The arms must clear the no-pretraining arm on fine-tuning: the control above arm 5 gates that comparison.
  c = study_report.collect(module, str(tmp_path))
  ft = study_report.columns(module)[0]
  for seed in c["values"]["control"][ft.id]:
    c["values"]["control"][ft.id][seed] = 0.99
  assert "<= no pretraining 99.00" in study_report.gate(module, c, ft, ("tinymim", "mae"))
  assert study_report.gate(module, c, study_report.columns(module)[3], ("tinymim", "mae")) is None  # linear probe: cleared
