"""The study runner: its plan and design text, and the quick study end to end (the report: test_study_report.py)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import fake_fmnist
from tinymim_jax import study, study_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fmnist_study.py")


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
  times = json.load(open(os.path.join(wd, study_report.TIMES)))
  assert set(times) == {n for n, _ in module.plan(True)} and all(t["cpu_s"] > 0 for t in times.values())
  # A rerun trains nothing and keeps the recorded times; the repository's RESULTS.md was not touched.
  assert study.main(args) == 0
  assert capsys.readouterr().out.count("finished earlier") == len(module.plan(True))
  assert json.load(open(os.path.join(wd, study_report.TIMES))) == times
  assert (open(repo_results).read() if os.path.exists(repo_results) else None) == before
