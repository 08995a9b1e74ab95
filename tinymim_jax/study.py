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
configs/digits_demo.py, is such a config); what the report reads of it is in tinymim_jax/study_report.py. A run
named `floors` measures the pixel floors (tinymim_jax/floors.py) instead of running the main job.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import sys
import time

import numpy as np

from tinymim_jax import environment, periodic, workdir as workdir_lib
from tinymim_jax.study_report import FLOORS, REPO, TIMES, _fmt_time, _read_json, _stage, write_report


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


def _arg(base: str, run_arg: str, root: str, quick: bool) -> str:
  return ",".join(filter(None, [run_arg, f"root={root}", f"quick={quick}", base]))


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
    seconds = time.time() - t
    times = _read_json(times_path, {})
    # A run stopped by SIGTERM keeps its time so far ("finished": false); the invocation that finishes it adds
    # its own, so a study resumed across sessions is timed whole (a SIGKILLed invocation's time is lost).
    before = times.get(name, {}) if times.get(name, {}).get("finished") is False else {}
    times[name] = {"wall_s": before.get("wall_s", 0.0) + seconds,
                   "cpu_s": before.get("cpu_s", 0.0) + time.process_time() - cpu}
    if res.get("preempted"):
      times[name]["finished"] = False
      _write_json(times_path, times)
      print(f"SIGTERM: stopped during {name} (saved); rerun the same command to resume", flush=True)
      return False
    _write_json(times_path, times)
    shown = {k: round(v, 4) for k, v in res.items() if k.startswith("eval/") and "seconds" not in k}
    print(f"   done in {seconds:.0f}s: {shown}", flush=True)
  return True


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
