"""Compile time of the distillation step at the paper's sizes, from abstract inputs (nothing is allocated).

Traces, lowers and compiles the jitted step (`train_steps.jit_step`, as the trainer does) for each size with
jax.ShapeDtypeStruct state and batch, on the local backend (here: the CPU), each size in a fresh process
so no cache is shared. Also reports XLA's memory_analysis and cost_analysis of the compiled program.

  python benchmarks/compile_time.py                                   # b_from_l and s_from_b, batch 128
  python benchmarks/compile_time.py --sizes b_from_l,s_from_b,t_from_b --batch 256 --teacher-dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def measure(size: str, batch: int, teacher_dtype: str, student_dtype: str) -> dict:
  import jax
  jax.config.update("jax_enable_compilation_cache", False)  # measure a cold compile
  from benchmarks.distill_step import build_and_compile, cost_flops, memory_stats

  b, compiled, build_s, lower_s, compile_s = build_and_compile(
      size, batch, teacher_dtype=teacher_dtype, student_dtype=student_dtype, abstract=True)
  n_params = sum(x.size for x in jax.tree.leaves(b["state"]["params"]))
  n_teacher = sum(x.size for x in jax.tree.leaves(b["state"]["teachers"]))
  return {"size": size, "batch": batch, "build_s": build_s, "lower_s": lower_s, "compile_s": compile_s,
          "memory": memory_stats(compiled), "xla_flops": cost_flops(compiled), "params": int(n_params),
          "teacher_params": int(n_teacher), "device": str(jax.devices()[0].device_kind),
          "hlo_ops": compiled.as_text().count("\n"), "peak_rss": common.peak_rss_bytes()}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="b_from_l,s_from_b")
  p.add_argument("--batch", type=int, default=128, help="per-device batch (the paper: 4096 over 32 chips = 128)")
  p.add_argument("--teacher-dtype", default="bfloat16", help="the config's teacher dtype (configs/tinymim_distill)")
  p.add_argument("--student-dtype", default="float32")
  p.add_argument("--no-append", action="store_true")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # worker: measure one size, print JSON
  args = p.parse_args()

  if args.one:
    print(common.PROTO + json.dumps(measure(args.one, args.batch, args.teacher_dtype, args.student_dtype)))
    return

  rows, results = [], []
  for size in args.sizes.split(","):
    env = {**os.environ, "PYTHONPATH": common.ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", size, "--batch", str(args.batch),
                          "--teacher-dtype", args.teacher_dtype, "--student-dtype", args.student_dtype],
                         capture_output=True, text=True, env=env, cwd=common.ROOT)
    wall = time.perf_counter() - t0
    lines = [l for l in out.stdout.splitlines() if l.startswith(common.PROTO)]
    if out.returncode or not lines:
      sys.stderr.write(out.stderr)
      raise SystemExit(f"{size}: failed (exit {out.returncode})")
    r = json.loads(lines[-1][len(common.PROTO):])
    results.append(r)
    m = r["memory"]
    pair = common.SIZES[size]
    rows.append([pair.label, r["batch"], f"{r['params'] / 1e6:.1f} / {r['teacher_params'] / 1e6:.1f}",
                 f"{r['build_s']:.1f}", f"{r['lower_s']:.1f}", f"{r['compile_s']:.1f}",
                 f"{r['lower_s'] + r['compile_s']:.1f}", f"{wall:.1f}", common.gib(m.get("argument")),
                 common.gib(m.get("temp")), common.gib(m.get("peak_estimate")),
                 f"{r['xla_flops'] / 1e12:.2f}", f"{common.distill_flops(pair, r['batch'])['total'] / 1e12:.2f}"])
    print(f"{size}: lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s", file=sys.stderr)
  headers = ["step", "batch / device", "params M (student / teacher)", "build s", "trace+lower s", "compile s",
             "lower+compile s", "process wall s", "arguments GiB", "temp GiB", "XLA peak estimate GiB",
             "XLA TFLOP/step", "analytic matmul TFLOP/step"]
  body = (f"Cold lower + compile of `jit_step(make_distill_step(...))` from abstract inputs (ShapeDtypeStruct, "
          f"nothing allocated), teacher compute dtype {args.teacher_dtype}, student {args.student_dtype}, one "
          f"fresh process per size, on the {results[0]['device']} backend. `build s` = abstract models, "
          f"optimizer and state via eval_shape. Memory columns are XLA's memory_analysis of that program (the CPU "
          f"backend's buffer assignment; a GPU / TPU compile assigns its own).\n\n" + common.table(headers, rows))
  print(body)
  if not args.no_append:
    common.append_section(f"Compile time of the distillation step at the paper's sizes ({results[0]['device']})",
                          body, devices=results[0]["device"], with_torch=False)


if __name__ == "__main__":
  main()
