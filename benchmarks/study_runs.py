"""The cost of a Fashion-MNIST study run on CPU: img/s of its steps and its fixed cost, by runner setting.

  python benchmarks/study_runs.py [--steps 60] [--stage ft] [--no-append]

Each variant is one fine-tuning run of configs/fmnist_study.py (the random-init arm: no pretrained workdir
needed) in a fresh subprocess, as the study runner starts it:
  1 device      XLA's default: one CPU device whose intra-op threads share the cores (the runner before)
  N devices     one XLA CPU device per core, the batch data-parallel over them (the runner's default now)
  N + cache     the same, second run with the persistent compilation cache warm (what every seed after the
                first of a stage gets)
Reported: img/s between the first and the last logged step (the steady state), the run's fixed cost (wall and
CPU seconds outside those steps: start-up, compilation, data set-up, final eval, saves), and CPU-s per step. The
variants run interleaved for --rounds rounds; medians are printed and appended to BENCHMARKS.md under
"## Study runs".
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Study runs"

_CHILD = r"""
import json, os, sys, time
root, stage, steps, devices, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
import jax
if devices:
  jax.config.update("jax_num_cpu_devices", devices)
if cache:
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
t0, c0 = time.time(), time.process_time()
from tinymim_jax import config_base, main as trainer, study, writers
module = study.load_config_module(os.path.join(%r, "configs", "fmnist_study.py"))
c = module.get_config(f"stage={stage},arm=control,seed=0,root={root}")
c.total_steps, c.warmup_steps, c.log_every_steps, c.ckpt_every_steps = steps, 5, 10, steps
c = config_base.finalize(c)
sampler = study.CpuSampler()
trainer.train_and_evaluate(c, os.path.join(root, "run"))
sampler.stop()
recs = [r for r in writers.read_metrics(os.path.join(root, "run")) if "train/loss" in r]
n = recs[-1]["step"] - recs[0]["step"]
step_wall = (recs[-1]["time"] - recs[0]["time"]) / n
step_cpu = (sampler.cpu_at(recs[-1]["time"]) - sampler.cpu_at(recs[0]["time"])) / n
wall, cpu = time.time() - t0, time.process_time() - c0
print(json.dumps({"img_s": c.batch_size / step_wall, "cpu_ms_step": 1000 * step_cpu,
                  "fixed_s": wall - steps * step_wall, "fixed_cpu_s": cpu - steps * step_cpu,
                  "devices": jax.device_count()}))
""" % REPO


def run_variant(stage, steps, devices, cache_dir):
  with tempfile.TemporaryDirectory() as root:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", _CHILD, root, stage, str(steps), str(devices), cache_dir or ""],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--stage", default="ft", help="a fine-tuning stage of configs/fmnist_study.py")
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--no-append", action="store_true")
  args = p.parse_args()
  cores = len(os.sched_getaffinity(0))
  results = {"1 device": [], f"{cores} devices": [], f"{cores} devices + warm cache": []}
  with tempfile.TemporaryDirectory() as cache:
    for _ in range(args.rounds):
      results["1 device"].append(run_variant(args.stage, args.steps, 0, None))
      results[f"{cores} devices"].append(run_variant(args.stage, args.steps, cores, cache))  # fills the cache
      results[f"{cores} devices + warm cache"].append(run_variant(args.stage, args.steps, cores, cache))
  med = lambda rows, k: sorted(r[k] for r in rows)[len(rows) // 2]
  load = os.getloadavg()[0]
  lines = [f"{datetime.date.today()}: `python benchmarks/study_runs.py --steps {args.steps} --stage {args.stage} "
           f"--rounds {args.rounds}`; {platform.processor() or platform.machine()}, {cores} cores, 1-min load "
           f"average at the end {load:.1f}.", "",
           "| runner setting | img/s (steps) | CPU-ms / step | fixed wall s | fixed CPU s |", "|---|---|---|---|---|"]
  for name, rows in results.items():
    lines.append(f"| {name} | {med(rows, 'img_s'):.0f} | {med(rows, 'cpu_ms_step'):.0f} | "
                 f"{med(rows, 'fixed_s'):.1f} | {med(rows, 'fixed_cpu_s'):.1f} |")
  text = "\n".join(lines)
  print(text)
  if not args.no_append:
    path = os.path.join(REPO, "BENCHMARKS.md")
    body = open(path).read()
    if SECTION not in body:
      body += f"\n\n{SECTION}\n\n(benchmarks/study_runs.py; the Fashion-MNIST study's runs on CPU)\n"
    open(path, "w").write(body.rstrip("\n") + "\n\n" + text + "\n")


if __name__ == "__main__":
  main()
