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
  """Teacher, floors, then the arms with every seed seed-major, then the side arms seed-major."""
  module = study.load_config_module(CONFIG)
  names = [n for n, _ in module.plan(False)]
  assert names[:3] == ["teacher", "teacher_eval", "floors"] and len(names) == len(set(names))
  core = {a for a, spec in module.ARMS.items() if spec[3] == module.SEEDS}
  arms = [n.split("/")[1] for n in names[3:]]
  n_core = sum(a in core for a in arms)
  assert set(arms[:n_core]) == core and not core & set(arms[n_core:])
  for group in (names[3:3 + n_core], names[3 + n_core:]):
    seeds = [int(n.split("/")[0][4:]) for n in group]
    assert seeds == sorted(seeds)
  assert {int(n.split("/")[0][4:]) for n in names[3:]} == set(module.SEEDS)
  for arm, (_, _, change, arm_seeds, regimes) in module.ARMS.items():
    runs = [n for n in names if n.split("/")[1:2] == [arm]]
    stages = (() if change.get("control") else ("pretrain", "eval")) + tuple(regimes)
    assert runs == [f"seed{s}/{arm}/{st}" for s in arm_seeds for st in stages], arm
  assert all(len(module.ARMS[a][3]) >= 5 for a in ("tinymim", "mae", "control"))  # the minimum
  quick = [n for n, _ in module.plan(True)]
  assert quick[:3] == ["teacher", "teacher_eval", "floors"] and "seed0/control/ft" in quick
  assert not any(n.startswith("seed1") for n in quick)


def test_a_run_stopped_by_sigterm_keeps_its_time(tmp_path, monkeypatch):
  """A run preempted in one invocation and finished in the next is timed over both (study_times.json)."""
  import time  # pylint: disable=g-import-not-at-top
  from tinymim_jax import main as trainer  # pylint: disable=g-import-not-at-top
  module = study.load_config_module(CONFIG)
  monkeypatch.setattr(module, "plan", lambda quick=False: [("seed0/control/ft", "stage=ft,arm=control,seed=0")])
  results = iter([{"preempted": True, "step": 3}, {"eval/top1": 0.5, "step": 6}])

  def fake_run(config, workdir):
    time.sleep(0.2)
    res = next(results)
    if not res.get("preempted"):
      os.makedirs(workdir, exist_ok=True)
      open(os.path.join(workdir, "done.json"), "w").write(json.dumps(res))
    return res

  monkeypatch.setattr(trainer, "train_and_evaluate", fake_run)
  root = str(tmp_path / "study")
  assert study.run_plan(module, root) is False
  first = json.load(open(os.path.join(root, study_report.TIMES)))["seed0/control/ft"]
  assert first["finished"] is False and first["wall_s"] >= 0.2
  assert study.run_plan(module, root) is True
  second = json.load(open(os.path.join(root, study_report.TIMES)))["seed0/control/ft"]
  assert "finished" not in second and second["wall_s"] >= first["wall_s"] + 0.2


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
