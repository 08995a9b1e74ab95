"""Scaling on paper: the sharded distillation step compiled for meshes of 1..8 fake CPU devices.

For each mesh (data x fsdp) the step (`train_steps.jit_step`, as the trainer builds it) is lowered and
compiled from abstract inputs at the paper's sizes; we read from the compiled program
- per-device memory (`compiled.memory_analysis()`: arguments = params + optimizer state + teacher, temps),
- the collectives per step (`compiled.as_text()`: all-reduce / all-gather / reduce-scatter / all-to-all /
  collective-permute, their sizes and group sizes),
and extrapolate to the paper's run (global batch 4096 on 32..256 chips) with an explicit model.

  python benchmarks/scaling.py                           # ViT-B from ViT-L and ViT-S from ViT-B, ~10 min
  python benchmarks/scaling.py --sizes s_from_b --per-device-batch 16 --meshes 1x1,8x1,4x2

XLA_FLAGS=--xla_force_host_platform_device_count=8 is added before jax is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

N_FAKE = 8
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "s64": 8,
               "u64": 8}

# Chips of the paper-scale table (stated assumptions; see the notes printed with the table).
CHIPS = {
    # name: (peak dense bf16 FLOP/s, collective bandwidth per chip in bytes/s, note)
    "TPU v4": (275e12, 1.1e15 / 4096, "ICI: the v4 pod's all-reduce bandwidth 1.1 PB/s / 4096 chips = 269 GB/s "
                                      "per chip"),
    "H100 SXM": (989e12, 50e9, "inter-node InfiniBand 400 Gb/s per GPU = 50 GB/s (NVLink's 450 GB/s inside "
                               "a node of 8 is not the bottleneck past 8 GPUs)"),
}
MFU = 0.4  # assumed model-FLOPs utilisation for the compute time per step


# --------------------------------------------------------------------------------------------------------
# Collectives in compiled HLO.
# --------------------------------------------------------------------------------------------------------
_LINE = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (?P<type>\(.*?\)|\S+) (?P<op>" + "|".join(COLLECTIVES) +
                   r")(?P<start>-start)?\((?P<rest>.*)$")


def _array_bytes(type_str: str) -> int:
  total = 0
  for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", type_str):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * DTYPE_BYTES.get(dt, 4)
  return total


def _group_size(rest: str, n_devices: int) -> int:
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)  # iota form: [groups, size]<=[...]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
  if m:
    return len(m.group(1).split(","))
  if "source_target_pairs" in rest:
    return 2
  return n_devices


def collectives(hlo_text: str, n_devices: int) -> dict:
  """{op: {'count', 'result_bytes', 'operand_bytes', 'ring_bytes'}} per device and step.

  ring_bytes: bytes each device sends with ring algorithms: all-reduce 2(g-1)/g x size, all-gather and
  reduce-scatter (g-1)/g x the full (unsharded) size, all-to-all (g-1)/g x size, permute 1 x size.
  """
  out = {op: {"count": 0, "result_bytes": 0, "operand_bytes": 0, "ring_bytes": 0.0} for op in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _LINE.match(line)
    if not m:
      continue
    op, rest = m.group("op"), m.group("rest")
    size = _array_bytes(m.group("type"))
    if m.group("start") and op in ("all-gather", "collective-permute", "all-reduce") and m.group("type").startswith("("):
      size //= 2  # async -start results are (operand, result) pairs
    g = _group_size(rest, n_devices)
    if g <= 1:
      continue
    d = out[op]
    d["count"] += 1
    d["result_bytes"] += size
    if op == "all-gather":
      d["operand_bytes"] += size // g
      d["ring_bytes"] += (g - 1) / g * size
    elif op == "reduce-scatter":
      d["operand_bytes"] += size * g
      d["ring_bytes"] += (g - 1) * size
    elif op == "all-reduce":
      d["operand_bytes"] += size
      d["ring_bytes"] += 2 * (g - 1) / g * size
    elif op == "all-to-all":
      d["operand_bytes"] += size
      d["ring_bytes"] += (g - 1) / g * size
    else:
      d["operand_bytes"] += size
      d["ring_bytes"] += size
  return out


# --------------------------------------------------------------------------------------------------------
# One compile (runs in a fresh process per size so nothing is cached across sizes).
# --------------------------------------------------------------------------------------------------------
def measure(size: str, meshes: list[tuple[int, int]], per_device_batch: int, teacher_dtype: str) -> list[dict]:
  import jax
  jax.config.update("jax_enable_compilation_cache", False)
  from benchmarks.distill_step import build, memory_stats
  from tinymim_jax import sharding as sh

  res = []
  for data, fsdp in meshes:
    n = data * fsdp
    mesh = sh.make_mesh(fsdp=fsdp, data=data, devices=jax.devices()[:n])
    t0 = time.perf_counter()
    b = build(size, per_device_batch * n, teacher_dtype=teacher_dtype, abstract=True, mesh=mesh)
    compiled = b["step"].lower(b["state"], b["batch"], b["rng"]).compile()
    secs = time.perf_counter() - t0
    state = b["state"]
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
    res.append({"data": data, "fsdp": fsdp, "compile_s": secs, "memory": memory_stats(compiled),
                "collectives": collectives(compiled.as_text(), n),
                "state_bytes": {"params": nbytes(state["params"]), "opt": nbytes(state["opt"]),
                                "teacher": nbytes(state["teachers"])},
                "per_device_batch": per_device_batch})
    print(f"{size} {data}x{fsdp}: {secs:.1f} s", file=sys.stderr)
  return res


# --------------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------------
def _gb(x):
  return f"{x / 1e9:.2f}"


def report(size: str, rows: list[dict], act_per_sample: float, teacher_dtype: str) -> str:
  pair = common.SIZES[size]
  sb = rows[0]["state_bytes"]
  p_train = common.param_counts(pair)["student_trainable"]
  flops_per_sample = common.distill_flops(pair, 1)["total"]
  lines = [f"### {pair.label}, teacher {teacher_dtype}, {rows[0]['per_device_batch']} images per device\n",
           f"State (global): student params {_gb(sb['params'])} GB (f32; {p_train / 1e6:.1f} M trainable), "
           f"optimizer {_gb(sb['opt'])} GB (Adam mu + nu of the trainable params only), teacher "
           f"{_gb(sb['teacher'])} GB (f32 params, all of them held, run to block {pair.teacher_block}). "
           f"Analytic matmul FLOPs per image per step {flops_per_sample / 1e9:.1f} G.\n"]
  headers = ["mesh data x fsdp", "devices", "args GB/device", "temp GB/device", "XLA peak GB/device",
             "all-reduce MB (n)", "all-gather MB (n)", "reduce-scatter MB (n)", "other MB (n)",
             "ring traffic MB/device", "compile s"]
  table = []
  for r in rows:
    c, m = r["collectives"], r["memory"]
    other = {k: sum(c[op][k] for op in ("all-to-all", "collective-permute")) for k in ("result_bytes", "count")}
    table.append([f"{r['data']} x {r['fsdp']}", r["data"] * r["fsdp"], _gb(m["argument"]), _gb(m["temp"]),
                  _gb(m["peak_estimate"]),
                  *(f"{c[op]['result_bytes'] / 1e6:.0f} ({c[op]['count']})" for op in COLLECTIVES[:3]),
                  f"{other['result_bytes'] / 1e6:.0f} ({other['count']})",
                  f"{sum(c[op]['ring_bytes'] for op in COLLECTIVES) / 1e6:.0f}", f"{r['compile_s']:.0f}"])
  lines.append("Compiled for fake CPU devices (sizes are the result shapes per device; all-gather results are "
               "the gathered arrays):\n\n" + common.table(headers, table))

  # Model, checked against the compiled programs above.
  dp = next(r for r in rows if r["fsdp"] == 1 and r["data"] > 1)
  grad_bytes = 4 * p_train
  ar = dp["collectives"]["all-reduce"]["result_bytes"]
  fs = [r for r in rows if r["fsdp"] > 1]
  lines.append(
      f"\nModel. Data parallel: params, optimizer state and teacher are replicated; one gradient all-reduce per "
      f"step of the trainable params' f32 gradients = {_gb(grad_bytes)} GB (compiled {dp['data']}-way: "
      f"{_gb(ar)} GB all-reduced, the rest are scalars: loss, grad norm). FSDP over f devices (ZeRO-3 as "
      f"`sharding.py`'s rules): state / f per device; every step all-gathers the weights where they are used "
      f"(student forward and again in the backward, teacher forward) and reduce-scatters the gradients, then "
      f"all-reduces the 1/f gradient shards over the data axis. Per-device activations grow linearly with the "
      f"per-device batch: {act_per_sample / 1e6:.0f} MB per image (temp of the 1-device program at two batch "
      f"sizes). Compute per step per chip = FLOPs x images per chip / ({MFU:.0%} of the bf16 peak).")
  if fs:
    r = max(fs, key=lambda r: r["fsdp"])
    c = r["collectives"]
    lines.append(
        f"Compiled fsdp={r['fsdp']}: all-gathers {_gb(c['all-gather']['result_bytes'])} GB per step per device "
        f"(student weights twice, forward and backward; the teacher blocks it runs once, gathered in bfloat16), against "
        f"{_gb(sb['params'])} GB of student and {_gb(sb['teacher'])} GB of teacher params. The CPU backend's SPMD "
        f"pipeline reduces the sharded gradients with all-reduces ({_gb(c['all-reduce']['result_bytes'])} GB, "
        f"{c['all-reduce']['count']} ops) and {c['reduce-scatter']['count']} reduce-scatters; GPU / TPU pipelines "
        f"rewrite all-reduce + slice into reduce-scatter, which the extrapolation below assumes.")

  # Extrapolation to the paper's run.
  headers = ["chips", "images/chip", "layout", "state GB/chip", "activations GB/chip", "traffic GB/chip/step"]
  headers += [f"{name}: comm s / compute s" for name in CHIPS]
  table = []
  state_total = sb["params"] + sb["opt"] + sb["teacher"]
  fsdp_row = max(fs, key=lambda r: r["fsdp"]) if fs else None
  for chips in (32, 64, 128, 256):
    per_chip = 4096 // chips
    act = act_per_sample * per_chip
    compute = flops_per_sample * per_chip
    layouts = [("data", 1)] + ([(f"data x fsdp {fsdp_row['fsdp']}", fsdp_row["fsdp"])] if fsdp_row else [])
    for name, f in layouts:
      d = chips // f
      traffic = 2 * (d - 1) / d * grad_bytes / f  # gradient (shard) all-reduce over the data axis
      if f > 1:  # + the compiled weight all-gathers + a reduce-scatter of the gradients over fsdp
        traffic += (f - 1) / f * (fsdp_row["collectives"]["all-gather"]["result_bytes"] + grad_bytes)
      row = [chips, per_chip, name, _gb(state_total / f), _gb(act), _gb(traffic)]
      for _, (peak, bw, _) in CHIPS.items():
        row.append(f"{traffic / bw:.3f} / {compute / (MFU * peak):.3f}")
      table.append(row)
  lines.append("\nThe paper's run, global batch 4096 (per-chip state + activations, and per-step collective "
               "traffic per chip with ring algorithms; communication can overlap the backward when it is "
               "smaller than the compute):\n\n" + common.table(headers, table))
  lines.append("\nChips assumed: " + "; ".join(f"{k}: {v[0] / 1e12:.0f} TFLOP/s bf16, {v[2]}"
                                               for k, v in CHIPS.items()) + ".")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="b_from_l,s_from_b")
  p.add_argument("--meshes", default="1x1,2x1,4x1,8x1,4x2,2x4,1x8", help="data x fsdp")
  p.add_argument("--per-device-batch", type=int, default=16, help="16 = 4096 images over 256 chips")
  p.add_argument("--teacher-dtype", default="bfloat16")
  p.add_argument("--no-append", action="store_true")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  meshes = [tuple(int(v) for v in m.split("x")) for m in args.meshes.split(",")]

  if args.one:  # worker
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={N_FAKE}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    out = measure(args.one, meshes, args.per_device_batch, args.teacher_dtype)
    # activation slope: the 1-device program at twice the batch
    out2 = measure(args.one, [(1, 1)], 2 * args.per_device_batch, args.teacher_dtype)
    slope = (out2[0]["memory"]["temp"] - next(r for r in out if r["data"] * r["fsdp"] == 1)["memory"]["temp"])
    print(common.PROTO + json.dumps({"rows": out, "act_per_sample": slope / args.per_device_batch}))
    return

  import subprocess
  bodies = []
  for size in args.sizes.split(","):
    if (1, 1) not in meshes:
      meshes = [(1, 1)] + meshes
    env = {**os.environ, "PYTHONPATH": common.ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", size, "--meshes",
                          ",".join(f"{d}x{f}" for d, f in meshes), "--per-device-batch", str(args.per_device_batch),
                          "--teacher-dtype", args.teacher_dtype], capture_output=True, text=True, env=env,
                         cwd=common.ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith(common.PROTO)]
    if out.returncode or not lines:
      sys.stderr.write(out.stderr[-5000:])
      raise SystemExit(f"{size}: failed (exit {out.returncode})")
    r = json.loads(lines[-1][len(common.PROTO):])
    bodies.append(report(size, r["rows"], r["act_per_sample"], args.teacher_dtype))
    print(bodies[-1] + "\n")
  if not args.no_append:
    common.append_section("Scaling on paper (sharded step compiled for fake CPU devices)", "\n\n".join(bodies),
                          devices=f"{N_FAKE} fake CPU devices", with_torch=False)


if __name__ == "__main__":
  main()
