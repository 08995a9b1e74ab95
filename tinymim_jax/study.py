r"""A multi-run study over the main job: runs a study config's plan in order, then aggregates it.

  python -m tinymim_jax.study --config configs/fmnist_study.py --workdir workdirs/fmnist --write-results
  python -m tinymim_jax.study --config configs/fmnist_study.py --workdir workdirs/fmnist_quick --quick
  python -m tinymim_jax.study --config configs/fmnist_study.py --workdir workdirs/fmnist --aggregate-only
  python -m tinymim_jax.study --config configs/fmnist_study.py --workdir /tmp/fmnist_timing --time 40

Every run is a normal main-job workdir under --workdir (resumable; a rerun skips finished runs, which have a
done.json). The report (a Markdown table with mean +- std over seeds, paired differences to arm 1 with 95%
t-intervals and the paper's prediction for each comparison, plus two plots) is written at the end, also
after a failed or interrupted run, from whatever has finished: to --results (default
<workdir>/RESULTS.md), or to the repository's RESULTS.md with --write-results; plots go to results/ beside it.
--time N runs each kind of stage for N steps in --workdir and projects the full study's compute time.
On SIGTERM the run in progress saves (or finishes, if past its last step), the runner stops after it and exits
75, as the main job does: rerun the same command to resume.

A study config module provides plan(quick) -> [(run name, config argument)] and get_config(arg) (arguments
stage, arm, seed, root, quick, plus any the user gives after ':'); that is enough for the runner (the digits demo,
configs/digits_demo.py, is such a config). The report also needs ARMS {name: (label, prediction
'lower'|'higher'|None against the first arm, overrides, ...)}, CLAIMS {arm: the paper's claim} and SEEDS, and reads
TITLE, DESIGN (the runs, arms, hyper-parameters and gate, written before the runs), COLUMNS (see `columns`),
VERDICT_COLUMNS and FLOOR_ARM (the arm whose fine-tuning is the floor) when given. A run named `floors` measures the
pixel floors (tinymim_jax/floors.py) instead of running the main job; one named `teacher_eval` scores the teacher.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from typing import NamedTuple, Sequence

import numpy as np

from tinymim_jax import environment, periodic, workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMES = "study_times.json"    # run name -> {wall_s, cpu_s} of the invocation that finished it
STAGES = ("teacher", "middle", "pretrain", "eval", "finetune")
FLOORS = "floors"             # the run (stage) name of a study's pixel floors (tinymim_jax/floors.py)
# (done.json of stage, key, column title). The frozen-feature keys are those main's 'eval' objective writes.
# The report's columns, unless the study config gives its own COLUMNS: (stage of the done.json, key, title).
# The frozen-feature keys are those main's 'eval' objective writes.
METRICS = (("finetune", "eval/top1", "fine-tune top-1"),
           ("eval", "eval/linprobe_top1", "linear probe top-1"),
           ("eval", "eval/linprobe_top5", "linear probe top-5"),
           ("eval", "eval/knn_top1", "k-NN top-1"),
           *(("eval", f"eval/fewshot_{k}shot_top1", f"{k}-shot top-1") for k in (1, 5, 10, 25)))
ALWAYS_SHOWN = ("eval/top1", "eval/linprobe_top1", "eval/knn_top1")
VERDICT_METRICS = ("eval/top1", "eval/linprobe_top1", "eval/knn_top1", "eval/fewshot_10shot_top1")
TEACHER_EVAL = "teacher_eval"  # the run (if planned) that scores the teacher's frozen features


def load_config_module(path: str):
  """A config file (configs/*.py) as a module: the one loader of the study runner, the demo, tests and
  benchmarks. FileNotFoundError names a missing file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config {path} not found")
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check_runnable(module) -> None:
  for name in ("plan", "get_config"):
    if not hasattr(module, name):
      raise AttributeError(f"study config {getattr(module, '__file__', module)} lacks {name}: a study config gives "
                           "plan(quick) and get_config(arg) (see tinymim_jax/study.py)")


def _check_reportable(module) -> None:
  """A report compares arms over seeds: the config must name them (a runner-only config, like the demo's, need
  not)."""
  for name in ("ARMS", "CLAIMS", "SEEDS"):
    if not hasattr(module, name):
      raise AttributeError(f"study config {getattr(module, '__file__', module)} lacks {name}, which the report "
                           "needs (see tinymim_jax/study.py)")


def _arg(base: str, run_arg: str, root: str, quick: bool) -> str:
  return ",".join(filter(None, [run_arg, f"root={root}", f"quick={quick}", base]))


def _stage(name: str) -> str:
  return name.rsplit("/", 1)[-1]


def _read_json(path: str, default=None):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------------------
class _Sigterm:
  """Notes a SIGTERM while the plan runs (the main job's own handler forwards it here): the run in progress saves
  and stops, or finishes if it is past its last step, and the plan stops after it."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread: no handler
      self._old = None

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def run_plan(module, root: str, *, base_arg: str = "", quick: bool = False) -> bool:
  """Runs every unfinished run of the plan in order; True when all have finished (False: stopped by SIGTERM after
  the run in progress saved or finished; a rerun resumes)."""
  _check_runnable(module)
  sigterm = _Sigterm()
  try:
    return _run_plan(module, root, sigterm, base_arg=base_arg, quick=quick)
  finally:
    sigterm.restore()


def _run_plan(module, root: str, sigterm: _Sigterm, *, base_arg: str, quick: bool) -> bool:
  from tinymim_jax import config_base, floors, main as trainer
  os.makedirs(root, exist_ok=True)
  times_path = os.path.join(root, TIMES)
  runs = module.plan(quick)
  for i, (name, run_arg) in enumerate(runs):
    if sigterm.requested:
      print(f"SIGTERM: stopped before {name}; rerun the same command to resume", flush=True)
      return False
    workdir = os.path.join(root, name)
    if os.path.exists(os.path.join(workdir, workdir_lib.DONE)):
      print(f"== [{i + 1}/{len(runs)}] {name}: finished earlier", flush=True)
      continue
    config = module.get_config(_arg(base_arg, run_arg, root, quick))
    t, cpu = time.time(), time.process_time()
    if _stage(name) == FLOORS:  # raw pixels through the same evals: no model, so not a run of the main job
      print(f"== [{i + 1}/{len(runs)}] {name}: pixel floors", flush=True)
      res = floors.run(config, workdir)
    else:
      config = config_base.finalize(config)
      print(f"== [{i + 1}/{len(runs)}] {name}: {config.objective} ({config.model.embed_dim}-wide, "
            f"{config.model.depth} blocks)", flush=True)
      res = trainer.train_and_evaluate(config, workdir)
    if res.get("preempted"):
      print(f"SIGTERM: stopped during {name} (saved); rerun the same command to resume", flush=True)
      return False
    seconds = time.time() - t
    times = _read_json(times_path, {})
    times[name] = {"wall_s": seconds, "cpu_s": time.process_time() - cpu}
    _write_json(times_path, times)
    shown = {k: round(v, 4) for k, v in res.items() if k.startswith("eval/") and "seconds" not in k}
    print(f"   done in {seconds:.0f}s: {shown}", flush=True)
  return True


# ---------------------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------------------
def t_quantile(df: int, q: float = 0.975) -> float:
  from scipy import stats  # scikit-learn's dependency
  return float(stats.t.ppf(q, df))


def paired_difference(x: dict, ref: dict):
  """Mean of x[s] - ref[s] over the seeds both have, and its 95% t-interval (None for fewer than 2 pairs).

  -> (n, mean or None, (low, high) or None).
  """
  seeds = sorted(set(x) & set(ref))
  d = np.array([x[s] - ref[s] for s in seeds], np.float64)
  if len(d) == 0:
    return 0, None, None
  if len(d) < 2:
    return 1, float(d[0]), None
  half = t_quantile(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
  return len(d), float(d.mean()), (float(d.mean() - half), float(d.mean() + half))


def verdict(prediction: str | None, ci) -> str:
  """'held' iff the interval excludes 0 in the predicted direction, 'contradicted' iff in the other."""
  if prediction is None:
    return ""
  if ci is None:
    return "n/a (< 2 paired seeds)"
  lo, hi = ci
  if (prediction == "lower" and hi < 0) or (prediction == "higher" and lo > 0):
    return "held"
  if (prediction == "lower" and lo > 0) or (prediction == "higher" and hi < 0):
    return "contradicted"
  return "not significant"


# ---------------------------------------------------------------------------------------------------------
# Collecting.
# ---------------------------------------------------------------------------------------------------------
class Column(NamedTuple):
  """One column of the report: the `key` of the done.json of each arm's `stage` run. `pixel` names the floors
  run's key it must clear (frozen features: the same eval on pixels; full-label fine-tuning: a pixel logistic
  regression) and `teacher` the teacher_eval key the teacher must clear that same floor with."""
  stage: str
  key: str
  title: str
  pixel: str | None
  teacher: str | None

  @property
  def id(self) -> str:
    return f"{self.stage}:{self.key}"


def columns(module) -> list[Column]:
  """The config's COLUMNS ((stage, key, title[, pixel floor key, teacher key]) each) or METRICS, as Columns.
  Frozen-feature columns (stage 'eval') default to the same key on pixels and for the teacher; others to no pixel
  floor and the teacher's linear probe."""
  out = []
  for entry in getattr(module, "COLUMNS", METRICS):
    stage, key, title, *rest = entry
    pixel, teacher = rest if rest else ((key, key) if stage == "eval" else (None, "eval/linprobe_top1"))
    out.append(Column(stage, key, title, pixel, teacher))
  return out


def collect(module, root: str, quick: bool = False) -> dict:
  """{'values': {arm: {column id: {seed: value}}}, 'planned': {arm: {column id: seeds planned}},
  'missing': [run names], 'done': {run: done.json}}."""
  values: dict = {}
  planned: dict = {}
  missing, done = [], {}
  cols = columns(module)
  for name, run_arg in module.plan(quick):
    d = _read_json(os.path.join(root, name, "done.json"))
    parts = name.split("/")
    if len(parts) == 3 and name.startswith("seed"):
      for col in cols:
        if col.stage == parts[2]:
          planned.setdefault(parts[1], {}).setdefault(col.id, 0)
          planned[parts[1]][col.id] += 1
    if d is None:
      missing.append(name)
      continue
    done[name] = d
    if len(parts) != 3 or not name.startswith("seed"):
      continue
    seed_part, arm, stage = parts
    seed = int(seed_part[len("seed"):])
    for col in cols:
      if col.stage == stage and isinstance(d.get(col.key), (int, float)):
        values.setdefault(arm, {}).setdefault(col.id, {})[seed] = float(d[col.key])
  return {"values": values, "planned": planned, "missing": missing, "done": done}


def _mean(by_seed: dict | None) -> float | None:
  return float(np.mean(list(by_seed.values()))) if by_seed else None


def floor_rows(module, c: dict) -> dict:
  """{column id: {'pixel': value or None, 'teacher': value or None, 'arm': the floor arm's mean or None}}."""
  floors, teacher = c["done"].get(FLOORS, {}), c["done"].get(TEACHER_EVAL, {})
  floor_arm = getattr(module, "FLOOR_ARM", None)
  out = {}
  for col in columns(module):
    out[col.id] = {"pixel": floors.get(col.pixel) if col.pixel else None,
                   "teacher": teacher.get(col.teacher) if col.teacher else None,
                   "teacher_floor": floors.get(col.teacher) if col.teacher else None,
                   "arm": (_mean(c["values"].get(floor_arm, {}).get(col.id)) if floor_arm and col.stage != "eval"
                           else None)}
  return out


def gate(module, c: dict, col: Column, arms: Sequence[str]) -> str | None:
  """None when a comparison of `arms` on `col` may get a verdict; else why the regime is too small for it.

  The teacher must clear its floor (its frozen eval of `col.teacher` above the same eval on pixels), and each
  arm its floors: the pixel floor of the column, and on fine-tuning columns the floor arm (no pretraining), which
  is itself held only to the pixel floor. Means over seeds; a floor not measured is not a condition."""
  f = floor_rows(module, c)[col.id]
  why = []
  if f["teacher"] is not None and f["teacher_floor"] is not None and f["teacher"] <= f["teacher_floor"]:
    why.append(f"teacher {_pct(f['teacher'])} <= pixels {_pct(f['teacher_floor'])} ({col.teacher})")
  floor_arm = getattr(module, "FLOOR_ARM", None)
  for arm in arms:
    m = _mean(c["values"].get(arm, {}).get(col.id))
    if m is None:
      return "not measured yet"
    if f["pixel"] is not None and m <= f["pixel"]:
      why.append(f"arm {module.ARMS[arm][0].split('.')[0]} {_pct(m)} <= pixels {_pct(f['pixel'])}")
    if arm != floor_arm and f["arm"] is not None and m <= f["arm"]:
      why.append(f"arm {module.ARMS[arm][0].split('.')[0]} {_pct(m)} <= no pretraining {_pct(f['arm'])}")
  return "; ".join(why) or None


def _arms(module, quick: bool) -> list[str]:
  seen = []
  for name, _ in module.plan(quick):
    if name.startswith("seed") and name.split("/")[1] not in seen:
      seen.append(name.split("/")[1])
  return seen


def _pct(v: float) -> str:
  return f"{100 * v:.2f}"


def _mean_std(by_seed: dict, n_planned: int) -> str:
  if not by_seed:
    return "—"
  v = np.array(list(by_seed.values()))
  s = f"{_pct(v.mean())} ± {_pct(v.std(ddof=1))}" if len(v) > 1 else _pct(v[0])
  return s + (f" (n={len(v)}/{n_planned})" if len(v) < n_planned else "")


def _diff(n, mean, ci) -> str:
  if mean is None:
    return "—"
  if ci is None:
    return f"{100 * mean:+.2f} (n={n})"
  return f"{100 * mean:+.2f} [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


# ---------------------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------------------
def _git(*args) -> str:
  try:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def _design(module) -> str:
  """The config's DESIGN text (runs, arms, hyper-parameters, the gate), written before the runs."""
  return getattr(module, "DESIGN", "(the config gives no DESIGN)").strip()


def _fmt_time(s: float) -> str:
  return str(datetime.timedelta(seconds=int(round(s))))


def write_report(module, root: str, path: str, *, quick: bool = False, config_path: str = "",
                 command: str = "", wall_s: float | None = None) -> str:
  """Writes the Markdown report to `path` and the plots to results/ beside it; returns the Markdown."""
  _check_reportable(module)
  # Whether the code differs from the commit, this report's own outputs (tracked: RESULTS.md, results/) aside.
  report = os.path.abspath(path)
  outputs = [os.path.relpath(p, REPO) for p in (report, os.path.join(os.path.dirname(report), "results"))]
  dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".",
                    *(f":(exclude){p}" for p in outputs if not p.startswith(".."))))
  c = collect(module, root, quick)
  vals, arms = c["values"], _arms(module, quick)
  ref = arms[0]
  cols = columns(module)
  present = [col for col in cols if col.key in ALWAYS_SHOWN and col.stage in ("eval", cols[0].stage)
             or any(col.id in vals.get(a, {}) for a in arms)]
  absent = [col.title for col in cols if col not in present]
  verdict_keys = getattr(module, "VERDICT_COLUMNS", None)
  shown = [col for col in present if (col.id in verdict_keys if verdict_keys else col.key in VERDICT_METRICS)]
  floors = floor_rows(module, c)
  main_col = cols[0]  # the Δ column of the scores table

  plot_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "results")
  stem = os.path.splitext(os.path.basename(path))[0].lower()
  os.makedirs(plot_dir, exist_ok=True)
  summary_png = os.path.join(plot_dir, f"{stem}_scores.png")
  curves_png = os.path.join(plot_dir, f"{stem}_curves.png")
  _plot_scores(summary_png, module, vals, arms, [col for col in present if any(col.id in vals.get(a, {})
                                                                              for a in arms)], floors)
  _plot_curves(curves_png, module, root, arms, seed=min(module.SEEDS))
  rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(path)))

  title = getattr(module, "TITLE", "A study")
  L = [f"# {'Quick check: ' if quick else ''}{title}", ""]
  L += [f"Produced by `{command or 'python -m tinymim_jax.study'}` (config `{config_path}`) on "
        f"{datetime.date.today().isoformat()}; commit `{_git('rev-parse', 'HEAD') or 'unknown'}`"
        f"{' (with uncommitted changes)' if dirty else ''}; "
        f"machine: {environment.machine()}.", ""]
  if quick:
    L += ["**Quick mode: a few dozen steps per run, one seed. These numbers only show that the pipeline runs; "
          "they say nothing about the method.**", ""]
  if c["missing"]:
    L += [f"**Partial: {len(c['missing'])} of {len(module.plan(quick))} runs have not finished**: "
          + ", ".join(f"`{m}`" for m in c["missing"][:30]) + (" ..." if len(c["missing"]) > 30 else "")
          + ". Cells show n=done/planned seeds.", ""]

  # The table: floors first, then the teacher, then the arms.
  L += ["## Scores (test split, %, mean ± std over seeds)", ""]
  head = ["row"] + [col.title for col in present] + [f"Δ {main_col.title} vs arm 1 [95% CI]"]
  L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  fmt = lambda v: _pct(v) if isinstance(v, (int, float)) else "—"
  if FLOORS in c["done"]:
    L.append("| floor: raw pixels, same protocol | " + " | ".join(
        fmt(floors[col.id]["pixel"]) + (" (logistic regression)" if col.stage != "eval" and
                                        floors[col.id]["pixel"] is not None else "") for col in present) + " | |")
  if TEACHER_EVAL in c["done"]:
    L.append("| teacher (frozen) | " + " | ".join(
        fmt(c["done"][TEACHER_EVAL].get(col.key)) if col.stage == "eval" else "—" for col in present) + " | |")
  for arm in arms:
    planned = c["planned"].get(arm, {})
    row = [module.ARMS[arm][0]] + [_mean_std(vals.get(arm, {}).get(col.id, {}), planned.get(col.id, 0))
                                   if planned.get(col.id) else "" for col in present]
    ft, ft_ref = vals.get(arm, {}).get(main_col.id, {}), vals.get(ref, {}).get(main_col.id, {})
    row.append("(reference)" if arm == ref else _diff(*paired_difference(ft, ft_ref)))
    L.append("| " + " | ".join(row) + " |")
  L.append("")
  if FLOORS in c["done"]:
    L += ["The floor row is each frozen-feature eval run on the normalised pixels (the same train / test images, "
          "neighbours, shots and probe recipe as the arms), and under full-label fine-tuning a logistic regression "
          f"on the pixels; fine-tuning's floor from a random init is arm `{getattr(module, 'FLOOR_ARM', '')}`.", ""]
  if absent:
    L += [f"Not measured: {', '.join(absent)}.", ""]

  # The paper's predictions, behind the regime gate.
  L += ["## The paper's predictions", "",
        "Each row compares an arm with arm 1 on the same seeds (paired: the difference arm - arm 1 per seed, in "
        "percentage points, its mean and 95% t-interval over seeds). *held*: the interval excludes 0 in the "
        "predicted direction; *contradicted*: it excludes 0 in the other; *not significant*: it contains 0. "
        "The regime gate comes first: a metric where the teacher or either arm does not clear its floor (see "
        "the design) gets no verdict, only *the regime is too small for it* and why.", ""]
  head = ["comparison", "paper", "predicted"] + [f"Δ {col.title} [95% CI]" for col in shown]
  L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  counts: dict = {}
  for arm in arms:
    label, prediction = module.ARMS[arm][0], module.ARMS[arm][1]
    if prediction is None:
      continue
    row = [label, module.CLAIMS.get(arm, ""), f"arm {prediction} than arm 1"]
    for col in shown:
      n, mean, ci = paired_difference(vals.get(arm, {}).get(col.id, {}), vals.get(ref, {}).get(col.id, {}))
      if mean is None:
        row.append("—")
        continue
      why = gate(module, c, col, (ref, arm))
      v = "the regime is too small for it" if why else verdict(prediction, ci)
      counts[v] = counts.get(v, 0) + 1
      row.append(f"{_diff(n, mean, ci)}: **{v}**" + (f" ({why})" if why else ""))
    L.append("| " + " | ".join(row) + " |")
  L += ["", "Verdicts: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none yet") + ".", "",
        f"![scores]({rel(summary_png)})", "",
        f"![curves]({rel(curves_png)})", "",
        f"Left: scores per arm (mean ± std over seeds, dots: seeds; dotted: the pixel floor). Right: training loss "
        f"of seed {min(module.SEEDS)} per arm (pretraining losses differ in kind between targets; compare shapes).",
        ""]

  # Time.
  times = _read_json(os.path.join(root, TIMES), {})
  L += ["## Wall time", ""]
  per_stage: dict = {}
  for name, t in times.items():
    per_stage.setdefault(_stage(name), []).append((t["wall_s"], t["cpu_s"]))
  L += ["| stage | runs | wall time | per run | CPU time (all threads) |", "|---|---|---|---|---|"]
  for stage in dict.fromkeys([*STAGES, *(_stage(n) for n, _ in module.plan(quick)), *per_stage]):
    if stage in per_stage:
      wall, cpu = np.sum(per_stage[stage], axis=0)
      n = len(per_stage[stage])
      L.append(f"| {stage} | {n} | {_fmt_time(wall)} | {_fmt_time(wall / n)} | {_fmt_time(cpu)} |")
  if times:
    wall, cpu = np.sum([(t["wall_s"], t["cpu_s"]) for t in times.values()], axis=0)
    L.append(f"| all | {len(times)} | {_fmt_time(wall)} | | {_fmt_time(cpu)} |")
  L += ["", "Wall time depends on what else the machine runs; CPU time (user + system, all threads) much less.", ""]
  if wall_s is not None:
    load = f" (1-minute load average at its end: {os.getloadavg()[0]:.1f})" if hasattr(os, "getloadavg") else ""
    L += [f"This invocation of the runner: {_fmt_time(wall_s)} of wall time{load}. Stage times are those of the "
          "invocation that finished each run.", ""]
  L += ["## Design and hyper-parameters (fixed before the first run, the same for every arm)", "",
        f"From `{config_path}` (DESIGN):", "", "```", _design(module), "```", ""]
  text = "\n".join(L)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return text


def _plot_scores(path, module, vals, arms, cols, floors=None) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  cols = cols or columns(module)[:1]
  fig = Figure(figsize=(3.2 * len(cols) + 1.5, 0.32 * len(arms) + 1.2), dpi=80)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(cols), sharey=True, squeeze=False)[0]
  y = np.arange(len(arms))[::-1]
  for ax, col in zip(axes, cols):
    ref = list(vals.get(arms[0], {}).get(col.id, {}).values())
    if ref:  # arm 1's mean, for reference
      ax.axvline(100 * np.mean(ref), color="tab:blue", ls="--", lw=0.8, alpha=0.5)
    pixel = (floors or {}).get(col.id, {}).get("pixel")
    if pixel is not None:
      ax.axvline(100 * pixel, color="tab:red", ls=":", lw=1.0)
    for yi, arm in zip(y, arms):
      v = np.array(list(vals.get(arm, {}).get(col.id, {}).values())) * 100
      if len(v):
        ax.errorbar(v.mean(), yi, xerr=v.std(ddof=1) if len(v) > 1 else 0, fmt="o", color="tab:blue", capsize=3)
        ax.plot(v, np.full(len(v), yi), ".", color="tab:gray", alpha=0.6)
    ax.set_title(col.title, fontsize=9)
    ax.set_xlabel("%", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(labelsize=8)
  axes[0].set_yticks(y, [module.ARMS[a][0] for a in arms], fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def _plot_curves(path, module, root, arms, seed) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from tinymim_jax import writers
  fig = Figure(figsize=(10, 3.4), dpi=80)
  FigureCanvasAgg(fig)
  ax_pre, ax_ft = fig.subplots(1, 2)
  for arm in arms:
    for ax, stage in ((ax_pre, "pretrain"), (ax_ft, columns(module)[0].stage)):
      recs = [r for r in writers.read_metrics(os.path.join(root, f"seed{seed}", arm, stage)) if "train/loss" in r]
      if recs:
        ax.plot([r["step"] for r in recs], [r["train/loss"] for r in recs], label=module.ARMS[arm][0], lw=1)
  ax_pre.set_yscale("log")
  ax_pre.set_title("pretraining loss (each arm's own loss)", fontsize=9)
  ax_ft.set_title("fine-tuning loss (cross-entropy)", fontsize=9)
  for ax in (ax_pre, ax_ft):
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  if ax_pre.lines:
    ax_pre.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path)


# ---------------------------------------------------------------------------------------------------------
# Timing: a short run of each stage kind, projected onto the full plan.
# ---------------------------------------------------------------------------------------------------------
def _kind(module, name: str, run_arg: str) -> str:
  stage = _stage(name)
  if stage != "pretrain":
    return stage
  arm = name.split("/")[1]
  return "pretrain_mae" if module.ARMS[arm][2].get("mae") else "pretrain_distill"


class CpuSampler:
  """Samples (wall time, CPU seconds of this process, all threads) every `every_s` in a daemon thread.

  On a shared machine the wall time per step depends on the others' load; the CPU time per step much less so.
  """

  def __init__(self, every_s: float = 0.25):
    import threading
    self.samples = [(time.time(), time.process_time())]
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
    self._thread.start()

  def _run(self, every_s):
    while not self._stop.wait(every_s):
      self.samples.append((time.time(), time.process_time()))

  def stop(self):
    self._stop.set()
    self._thread.join()
    self.samples.append((time.time(), time.process_time()))

  def cpu_at(self, wall: float) -> float:
    t, c = np.array(self.samples).T
    return float(np.interp(wall, t, c))


def _full_steps(c, num_train: int) -> int:
  """Train steps of a run, as the trainer counts them (0 for 'eval')."""
  if c.objective == "eval":
    return 0
  return periodic.run_length(c, periodic.steps_per_epoch(num_train, c.batch_size))[0]


def time_stages(module, root: str, steps: int, *, base_arg: str = "") -> dict:
  """Runs each stage kind for `steps` steps in `root`; projects each run of the full plan and the total.

  A run's projection = (its measured fixed cost: start-up, compilation, final evals, saves) + (its full
  step count) x (the measured time per step between the first and the last logged step). Stage kinds:
  teacher, middle, pretrain_distill (timed on the first distillation arm, used for all), pretrain_mae,
  eval, finetune.
  """
  from tinymim_jax import config_base, data, main as trainer, writers
  if os.path.isdir(root) and os.listdir(root):
    raise FileExistsError(f"--time needs an empty --workdir (its runs would be skipped as finished): {root}")
  full = module.plan(False)
  first_of_kind = {}
  for name, run_arg in full:
    first_of_kind.setdefault(_kind(module, name, run_arg), (name, run_arg))
  num_train = None
  measured = {}
  for kind, (name, run_arg) in first_of_kind.items():
    c = module.get_config(_arg(base_arg, run_arg, root, False))
    num_train = num_train or data.dataset_info(c.data).num_train
    full_steps = _full_steps(c, num_train)
    if c.objective != "eval":
      c.total_steps, c.log_every_steps, c.ckpt_every_steps = steps, max(steps // 8, 1), steps
    c = config_base.finalize(c)
    workdir = os.path.join(root, name)
    print(f"== timing {kind}: {name} ({_full_steps(c, num_train)} of its {full_steps} steps)", flush=True)
    sampler = CpuSampler()
    trainer.train_and_evaluate(c, workdir)
    sampler.stop()
    (t0, c0), (t1, c1) = sampler.samples[0], sampler.samples[-1]
    recs = [r for r in writers.read_metrics(workdir) if "train/loss" in r]
    per_step = cpu_per_step = 0.0
    if len(recs) > 1:
      n = recs[-1]["step"] - recs[0]["step"]
      per_step = (recs[-1]["time"] - recs[0]["time"]) / n
      cpu_per_step = (sampler.cpu_at(recs[-1]["time"]) - sampler.cpu_at(recs[0]["time"])) / n
    done_steps = _full_steps(c, num_train)
    measured[kind] = dict(run=name, steps=done_steps, full_steps=full_steps, wall_s=t1 - t0, cpu_s=c1 - c0,
                          per_step_s=per_step, cpu_per_step_s=cpu_per_step,
                          fixed_s=t1 - t0 - done_steps * per_step, fixed_cpu_s=c1 - c0 - done_steps * cpu_per_step)
    print(f"   {t1 - t0:.0f}s ({c1 - c0:.0f} CPU-s): {per_step * 1000:.0f} ms/step ({cpu_per_step * 1000:.0f} "
          f"CPU-ms/step), fixed {measured[kind]['fixed_s']:.0f}s ({measured[kind]['fixed_cpu_s']:.0f} CPU-s)",
          flush=True)
  wall, cpu, runs = {}, {}, {}
  for name, run_arg in full:
    kind = _kind(module, name, run_arg)
    m = measured[kind]
    n = _full_steps(module.get_config(_arg(base_arg, run_arg, root, False)), num_train)
    wall[kind] = wall.get(kind, 0.0) + m["fixed_s"] + n * m["per_step_s"]
    cpu[kind] = cpu.get(kind, 0.0) + m["fixed_cpu_s"] + n * m["cpu_per_step_s"]
    runs[kind] = runs.get(kind, 0) + 1
  out = {"measured": measured, "runs": runs, "projected_wall_s": wall, "projected_cpu_s": cpu,
         "projected_total_wall_s": sum(wall.values()), "projected_total_cpu_s": sum(cpu.values()),
         "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "machine": environment.machine()}
  _write_json(os.path.join(root, "timing.json"), out)
  for kind in runs:
    print(f"projected {kind}: {runs[kind]} runs, {_fmt_time(wall[kind])} at this load, {_fmt_time(cpu[kind])} of CPU")
  print(f"projected total: {_fmt_time(out['projected_total_wall_s'])} of wall time at this load, "
        f"{_fmt_time(out['projected_total_cpu_s'])} of CPU time (load average now {out['load_average']})", flush=True)
  return out


# ---------------------------------------------------------------------------------------------------------
# Speed: a study is many short runs of small models (BENCHMARKS.md, "Study runs").
# ---------------------------------------------------------------------------------------------------------
def _speed_settings(root: str, *, cpu_devices: int | None, cache: bool) -> None:
  """Before the first computation: one XLA CPU device per core (small steps keep the cores busier as
  data-parallel shards than as one device's intra-op threads) and a persistent compilation cache shared by the
  runs (every seed of a stage compiles the same programs)."""
  import jax
  if cpu_devices is None:
    cpu_devices = environment.cores()
  if cpu_devices > 0 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", cpu_devices)  # only the CPU backend; a GPU / TPU run is unchanged
  if cache:
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(root), ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
  """The study's command line; a user's mistake (a missing config file, a bad config argument, a run's own
  one-line error) is one `error:` line (tinymim_jax/errors.py), exit status 1."""
  from tinymim_jax import errors, main as trainer  # pylint: disable=g-import-not-at-top
  try:
    return _main(argv)
  except Exception as e:  # pylint: disable=broad-except  (anything but a user's mistake is re-raised)
    if not errors.is_user_error(e, also=trainer.USER_ERRORS):
      raise
    print(errors.one_line(e), file=sys.stderr)
    return 1


def _main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="study config file, optionally with ':key=value,...'")
  p.add_argument("--workdir", required=True, help="root of the study's run workdirs")
  p.add_argument("--quick", action="store_true", help="the config's quick subset (one seed, a few steps)")
  p.add_argument("--results", default=None, help="report path (default <workdir>/RESULTS.md)")
  p.add_argument("--write-results", action="store_true", help="write the repository's RESULTS.md")
  p.add_argument("--aggregate-only", action="store_true", help="only write the report from finished runs")
  p.add_argument("--time", type=int, default=0, metavar="STEPS",
                 help="time each stage kind for STEPS steps in --workdir and project the full study")
  p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                 help="on a CPU-only machine, run N XLA CPU devices, data-parallel over the cores (default: one "
                      "per core; 0 = XLA's default of one device for all cores)")
  p.add_argument("--no-compilation-cache", action="store_true",
                 help="do not keep compiled steps in <workdir>/.jax_cache for the runs that share their shapes")
  args = p.parse_args(argv)
  _speed_settings(args.workdir, cpu_devices=args.cpu_devices, cache=not args.no_compilation_cache)
  if args.write_results and (args.quick or args.results):
    p.error("--write-results writes the repository's RESULTS.md from the full study: not with --quick / --results")
  config_path, _, base_arg = args.config.partition(":")
  module = load_config_module(config_path)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  if args.time:
    time_stages(module, args.workdir, args.time, base_arg=base_arg)
    return 0
  results = (os.path.join(REPO, "RESULTS.md") if args.write_results
             else args.results or os.path.join(args.workdir, "RESULTS.md"))
  command = "python -m tinymim_jax.study " + " ".join(sys.argv[1:] if argv is None else argv)
  t0, finished = time.time(), False
  try:
    if not args.aggregate_only:
      finished = run_plan(module, args.workdir, base_arg=base_arg, quick=args.quick)
  finally:  # also after a failure or Ctrl-C: the report of what has finished
    try:
      write_report(module, args.workdir, results, quick=args.quick, config_path=config_path, command=command,
                   wall_s=None if args.aggregate_only else time.time() - t0)
      print(f"report: {results}", flush=True)
    except Exception:  # pylint: disable=broad-except  (must not hide the run's own error)
      logging.exception("could not write the report %s", results)
  return 0 if finished or args.aggregate_only else os.EX_TEMPFAIL  # 75, as the main job: rerun to resume


if __name__ == "__main__":
  raise SystemExit(main())
