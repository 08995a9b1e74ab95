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
  drop = ("seed2/cls/ft", "seed1/feature/eval")
  _fake_runs(str(tmp_path / "wd"), module, drop=drop)
  path = str(tmp_path / "out" / "REPORT.md")
  os.makedirs(os.path.dirname(path))
  text = study.write_report(module, str(tmp_path / "wd"), path, config_path="configs/fmnist_study.py")
  assert open(path).read() == text
  assert text.startswith(f"# {module.TITLE}")
  rows = _rows(text, "## Scores")
  labels = [entry[0] for entry in module.ARMS.values()]
  assert list(rows)[1:] == ["floor: raw pixels, same protocol", "teacher (frozen)", *labels]
  assert "| 50.00 (logistic regression) | — | — | 50.00 |" in rows["floor: raw pixels, same protocol"]
  # The MAE arm is 2 points below arm 1 on every seed: held (every floor is cleared), interval around -2.00.
  mae = _rows(text, "## The paper's predictions")["5. MAE from scratch (no teacher)"]
  assert "| -2.0" in mae and "**held**" in mae.split(" | ")[3]
  assert "(n=2/3)" in rows["4. class-token target (block 4)"]  # one fine-tune missing of three seeds
  assert "Partial: 2 of" in text and "`seed2/cls/ft`" in text and "`seed1/feature/eval`" in text
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
  text = study.write_report(module, str(tmp_path), str(tmp_path / "R.md"))
  preds = _rows(text, "## The paper's predictions")
  mae = preds["5. MAE from scratch (no teacher)"].split(" | ")
  assert all("the regime is too small for it" in cell and "teacher 70.00 <= pixels 78.00" in cell
             for cell in mae[3:]), mae
  assert "held" not in text.split("## The paper's predictions", 1)[1].split("## Wall time")[0].replace(
      "*held*", "")
  # A good teacher and pixels at 0.5: k-NN verdicts come back; the control (5 below) is held on fine-tuning.
  _fake_runs(str(tmp_path), module, pixel=0.5, teacher=0.9)
  text = study.write_report(module, str(tmp_path), str(tmp_path / "R.md"))
  control = _rows(text, "## The paper's predictions")["6. no pretraining (random init)"]
  assert "-5.0" in control and "**held**" in control and "too small" not in control
  # The arms must clear the no-pretraining arm on fine-tuning: the control above arm 5 gates that comparison.
  c = study.collect(module, str(tmp_path))
  ft = study.columns(module)[0]
  for seed in c["values"]["control"][ft.id]:
    c["values"]["control"][ft.id][seed] = 0.99
  assert "<= no pretraining 99.00" in study.gate(module, c, ft, ("tinymim", "mae"))
  assert study.gate(module, c, study.columns(module)[3], ("tinymim", "mae")) is None  # linear probe: cleared


def test_plan_is_teacher_floors_then_seed_major():
  module = study.load_config_module(CONFIG)
  names = [n for n, _ in module.plan(False)]
  assert names[:3] == ["teacher", "teacher_eval", "floors"] and len(names) == len(set(names))
  seeds = [int(n.split("/")[0][4:]) for n in names if n.startswith("seed")]
  assert seeds == sorted(seeds) and set(seeds) == set(module.SEEDS)
  for arm, (_, _, change, arm_seeds, regimes) in module.ARMS.items():
    runs = [n for n in names if n.split("/")[1:2] == [arm]]
    stages = (() if change.get("control") else ("pretrain", "eval")) + tuple(regimes)
    assert runs == [f"seed{s}/{arm}/{st}" for s in arm_seeds for st in stages], arm
  assert all(len(module.ARMS[a][3]) >= 5 for a in ("tinymim", "mae", "control"))  # the minimum
  quick = [n for n, _ in module.plan(True)]
  assert quick[:3] == ["teacher", "teacher_eval", "floors"] and "seed0/control/ft" in quick
  assert not any(n.startswith("seed1") for n in quick)


def test_design_text_matches_the_configs():
  """DESIGN states the recipe in words; the parts not formatted from constants are checked against the configs."""
  module = study.load_config_module(CONFIG)
  design = " ".join(module.DESIGN.split())
  cfg = lambda stage, arm="tinymim": module.get_config(f"stage={stage},arm={arm},seed=0,root=/r")
  pre, ft, ev = cfg("pretrain"), cfg("ft"), cfg("eval")
  assert pre.data.distill_crop_scale == (0.4, 1.0) and "RandomResizedCrop(0.4, 1)" in design
  assert pre.data.color_jitter == 0.4 and "ColorJitter 0.4" in design
  assert ft.data.ft_crop_scale == (0.7, 1.0) and "RRC(0.7, 1)" in design
  assert (ft.optim.layer_decay, ft.optim.weight_decay, ft.model.drop_path, ft.finetune.label_smoothing) == (
      0.9, 0.05, 0.1, 0.1) and "layer decay 0.9, weight decay 0.05, drop path 0.1, label smoothing 0.1" in design
  assert (ev.eval.knn.k, ev.eval.knn.temperature) == (20, 0.07) and "k-NN (k 20, T 0.07)" in design
  assert ev.linprobe.batch_size == 256 and ev.linprobe.base_lr == 25 and "batch 256, base lr 25, 10 epochs" in design
  for stage, (fraction, epochs) in module.REGIMES.items():
    c = cfg(stage)
    per_epoch = max(int(60000 * fraction) // module.BATCH, 1)
    assert c.data.train_fraction == fraction and c.total_steps == round(epochs * per_epoch)
  assert cfg("ft", "control").init is None and cfg("ft", "mae").init == "/r/seed0/mae/pretrain"
  assert cfg("pretrain", "rel_last").distill.teacher_block == module.TEACHER["depth"]


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
    assert 0 <= float(cells[1]) <= 100  # fine-tune top-1, one seed
    if arm != "control":
      assert 0 <= float(cells[3]) <= 100  # the linear probe
  assert os.path.exists(tmp_path / "results" / "quick_scores.png")
  assert os.path.exists(tmp_path / "results" / "quick_curves.png")
  times = json.load(open(os.path.join(wd, study.TIMES)))
  assert set(times) == {n for n, _ in module.plan(True)} and all(t["cpu_s"] > 0 for t in times.values())
  # A rerun trains nothing and keeps the recorded times; the repository's RESULTS.md was not touched.
  assert study.main(args) == 0
  assert capsys.readouterr().out.count("finished earlier") == len(module.plan(True))
  assert json.load(open(os.path.join(wd, study.TIMES))) == times
  assert (open(repo_results).read() if os.path.exists(repo_results) else None) == before
