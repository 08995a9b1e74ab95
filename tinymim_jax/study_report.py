r"""A study's report: collects the finished runs' done.json under a study's workdir, compares the arms with the
first over seeds (paired differences, 95% t-intervals, the paper's prediction), applies the regime gate (floors,
teacher), and writes the Markdown table and two plots. The runner and command line are in tinymim_jax/study.py.

What a study config gives the report: ARMS {name: (label, prediction 'lower'|'higher'|None against the first arm,
overrides, ...)}, CLAIMS {arm: the paper's claim} and SEEDS; optionally TITLE, DESIGN (the runs, arms,
hyper-parameters and gate, written before the runs), COLUMNS (see `columns`), VERDICT_COLUMNS and FLOOR_ARM (the arm
whose fine-tuning is the floor). A run named `floors` holds the pixel floors; one named `teacher_eval` the teacher's
frozen-feature scores.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
from typing import NamedTuple, Sequence

import numpy as np

from tinymim_jax import environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMES = "study_times.json"    # run name -> {wall_s, cpu_s} over its invocations ("finished": false: stopped)
FLOORS = "floors"             # the run (stage) name of a study's pixel floors (tinymim_jax/floors.py)
TEACHER_EVAL = "teacher_eval"  # the run (if planned) that scores the teacher's frozen features

STAGES = ("teacher", "middle", "pretrain", "eval", "finetune")
# The report's columns, unless the study config gives its own COLUMNS: (stage of the done.json, key, title).
# The frozen-feature keys are those main's 'eval' objective writes.
METRICS = (("finetune", "eval/top1", "fine-tune top-1"),
           ("eval", "eval/linprobe_top1", "linear probe top-1"),
           ("eval", "eval/linprobe_top5", "linear probe top-5"),
           ("eval", "eval/knn_top1", "k-NN top-1"),
           *(("eval", f"eval/fewshot_{k}shot_top1", f"{k}-shot top-1") for k in (1, 5, 10, 25)))
ALWAYS_SHOWN = ("eval/top1", "eval/linprobe_top1", "eval/knn_top1")
VERDICT_METRICS = ("eval/top1", "eval/linprobe_top1", "eval/knn_top1", "eval/fewshot_10shot_top1")


def _stage(name: str) -> str:
  return name.rsplit("/", 1)[-1]


def _read_json(path: str, default=None):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _check_reportable(module) -> None:
  """A report compares arms over seeds: the config must name them (a runner-only config, like the demo's, need
  not)."""
  for name in ("ARMS", "CLAIMS", "SEEDS"):
    if not hasattr(module, name):
      raise AttributeError(f"study config {getattr(module, '__file__', module)} lacks {name}, which the report "
                           "needs (see tinymim_jax/study_report.py)")


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
  """The planned arms in the config's ARMS order (the plan may run them in another)."""
  planned = {name.split("/")[1] for name, _ in module.plan(quick) if name.startswith("seed")}
  return [arm for arm in module.ARMS if arm in planned]


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
  times = {n: t for n, t in _read_json(os.path.join(root, TIMES), {}).items() if t.get("finished", True)}
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
    L += [f"This invocation of the runner: {_fmt_time(wall_s)} of wall time{load}. Stage times are each finished "
          "run's, over every invocation that worked on it (a run stopped by SIGTERM and resumed counts both).", ""]
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
