#!/usr/bin/env python3
"""Expands a sweep into tinymim_jax.main runs (one workdir each) and runs, submits or prints them.

Usage:
  python launch/sweep.py --config configs/X.py --args vit_t,vit_s --workdir_root runs/sweep1 \
      [--grid optim.lr=1e-3,3e-3 --grid total_epochs=100,300] [--set seed=1 ...] \
      [--launcher local|slurm|print] [--dry_run] [--local_processes 2] [--sbatch_args="--nodes=2 --time=72:00:00"] \
      [-- extra args for tinymim_jax.main]

Runs are the cartesian product of --args (the `:arg` of `--config path.py:arg`) and every --grid key's
values; a grid point becomes `--config.key=value` overrides, --set adds the same overrides to every run.
The workdir of a run is <workdir_root>/<arg>-<key>=<value>-..., e.g. runs/sweep1/vit_t-optim.lr=1e-3.
Values are split on ',', so a value that itself holds a comma (a tuple) can only go through --set
... -- --config.field=... extras.

Launchers (the exact commands are printed first in every mode):
  local  (default) runs one after another on this host; with --local_processes N each run goes through
         launch/local.py (N fake-SLURM processes). A failed run does not stop the sweep; the exit status is 1
         if any failed.
  slurm  one `sbatch launch/slurm.sbatch ...` per run (job name and log file named after the run); if sbatch is
         not on PATH, the commands are only printed.
  print  prints the local commands only (same as --dry_run with the local launcher).
--dry_run prints and does nothing, whatever the launcher.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_kv(item: str, flag: str) -> tuple[str, str]:
  if "=" not in item:
    raise SystemExit(f"{flag} expects key=value, got {item!r}")
  k, v = item.split("=", 1)
  k = k.strip()
  if k.startswith("config."):  # accept both `optim.lr=...` and `config.optim.lr=...`
    k = k[len("config."):]
  if not k:
    raise SystemExit(f"{flag} has an empty key: {item!r}")
  return k, v


def _safe(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9._=+-]", "_", s)


def expand(config: str, args: list[str], grid: list[tuple[str, list[str]]]) -> list[dict]:
  """The runs: [{'name', 'config' (path[:arg]), 'overrides' [(key, value)]}], args outermost."""
  keys = [k for k, _ in grid]
  if len(set(keys)) != len(keys):
    raise SystemExit(f"a --grid key is given twice: {keys}")
  runs = []
  for arg in (args or [None]):
    for values in itertools.product(*(vs for _, vs in grid)):
      overrides = list(zip(keys, values))
      parts = ([arg] if arg else []) + [f"{k}={v}" for k, v in overrides]
      name = _safe("-".join(parts)) if parts else _safe(os.path.splitext(os.path.basename(config))[0])
      runs.append({"name": name, "config": f"{config}:{arg}" if arg else config, "overrides": overrides})
  names = [r["name"] for r in runs]
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise SystemExit(f"runs would share a workdir ({dup}): repeated --args / --grid values?")
  return runs


def main_args(run: dict, workdir_root: str, sets: list[tuple[str, str]], extra: list[str]) -> list[str]:
  out = ["--config", run["config"], "--workdir", os.path.join(workdir_root, run["name"])]
  out += [f"--config.{k}={v}" for k, v in sets + run["overrides"]]
  return out + extra


def local_command(margs: list[str], local_processes: int = 1) -> list[str]:
  cmd = [sys.executable, "-m", "tinymim_jax.main", *margs]
  if local_processes > 1:
    cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes", str(local_processes),
           "--", *cmd]
  return cmd


def sbatch_command(margs: list[str], name: str, workdir: str, sbatch_args: list[str]) -> list[str]:
  # The log goes next to the run (sbatch creates no directories: we make the workdir before submitting).
  return ["sbatch", f"--job-name=tinymim-{name}", f"--output={os.path.join(workdir, 'slurm-%j.out')}",
          *sbatch_args, os.path.join(ROOT, "launch", "slurm.sbatch"), *margs]


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  extra: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="configs/X.py (the :arg comes from --args)")
  p.add_argument("--args", default="", help="comma-separated config arguments")
  p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="swept config field")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed config override")
  p.add_argument("--workdir_root", required=True)
  p.add_argument("--launcher", choices=("local", "slurm", "print"), default="local")
  p.add_argument("--dry_run", action="store_true")
  p.add_argument("--local_processes", type=int, default=1, help="local: processes per run (launch/local.py)")
  p.add_argument("--sbatch_args", default="",
                 help='slurm: extra sbatch options as one string, written --sbatch_args="--nodes=2 ..."')
  a = p.parse_args(argv)

  args = [s.strip() for s in a.args.split(",") if s.strip()]
  if args and ":" in a.config:
    p.error("--config already has an :arg; drop it or --args")
  grid = []
  for item in a.grid:
    k, vs = parse_kv(item, "--grid")
    grid.append((k, [v.strip() for v in vs.split(",") if v.strip()]))
  sets = [parse_kv(item, "--set") for item in a.set]
  runs = expand(a.config, args, grid)

  commands = []
  for r in runs:
    margs = main_args(r, a.workdir_root, sets, extra)
    workdir = os.path.join(a.workdir_root, r["name"])
    if a.launcher == "slurm":
      cmd = sbatch_command(margs, r["name"], workdir, shlex.split(a.sbatch_args))
    else:
      cmd = local_command(margs, a.local_processes)
    commands.append((r["name"], workdir, cmd))

  print(f"# {len(commands)} run(s), launcher={a.launcher}{' (dry run)' if a.dry_run else ''}", flush=True)
  for _, _, cmd in commands:
    print(shlex.join(cmd), flush=True)
  if a.dry_run or a.launcher == "print":
    return 0

  if a.launcher == "slurm":
    if shutil.which("sbatch") is None:
      print("# sbatch is not on PATH: nothing submitted; run the commands above on the cluster", flush=True)
      return 0
    for name, workdir, cmd in commands:
      os.makedirs(workdir, exist_ok=True)
      res = subprocess.run(cmd, capture_output=True, text=True)
      if res.returncode:
        print(f"# {name}: sbatch failed ({res.returncode}): {res.stderr.strip()}", file=sys.stderr, flush=True)
        return res.returncode
      print(f"# {name}: {res.stdout.strip()}", flush=True)
    return 0

  # Runs stay in the caller's directory (relative --config / --workdir_root paths keep their meaning); the
  # repository goes on PYTHONPATH so `-m tinymim_jax.main` resolves without an installed package.
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  failed = []
  for i, (name, _, cmd) in enumerate(commands):
    print(f"# [{i + 1}/{len(commands)}] {name}", flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc:
      print(f"# {name} failed with exit status {rc}", file=sys.stderr, flush=True)
      failed.append(name)
  if failed:
    print(f"# {len(failed)} of {len(commands)} run(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
