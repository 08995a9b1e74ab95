"""Distillation step throughput: our jitted step vs the PyTorch reference step, interleaved A/B.

Each implementation runs in its own fresh worker process (so each has its own peak RSS); the driver
alternates rounds of steps between them (A B C A B C ..., order rotated every round) and reports medians.
The same run measures each side's matmul peak (a 4096^3 matmul in float32, and in bfloat16 for a bf16
variant) and derives the utilisation: analytic matmul FLOPs per step / step time / matmul peak. XLA's own
count (`compiled.cost_analysis()['flops']`) is shown as a cross-check.

  python benchmarks/distill_step.py                       # CPU: ViT-S from ViT-B, 224 px, batch 8 (~8 min)
  python benchmarks/distill_step.py --profile             # + time of the pieces (teacher fwd, student fwd, ...)
  # GPU: the paper's sizes, the reference under fp16 autocast as the original code runs on CUDA (~2 min each;
  # benchmarks/gpu.sh runs the whole GPU set)
  python benchmarks/distill_step.py --device gpu --size b_from_l --batch 128 \
      --variants bfloat16,bfloat16/bfloat16,bfloat16/bfloat16+cudnn --trace --torch-profile

Variants are `teacher_dtype[/student_dtype][+attention]`: the compute dtypes of our step's teacher and student
(parameters, gradients and optimizer stay float32) and ViTConfig.attention ('cudnn': flash attention).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

HERE = os.path.abspath(__file__)


# --------------------------------------------------------------------------------------------------------
# Our step (imported by scaling.py and compile_time.py too).
# --------------------------------------------------------------------------------------------------------
def build(size: str, batch: int, *, img: int = 224, teacher_dtype: str = "float32", student_dtype: str = "float32",
          attention: str = "default", abstract: bool = False, mesh=None, seed: int = 0, teachers: str = ""):
  """-> dict(step=jitted step, state, batch, rng, pair, jit=...) for the named size.

  `teachers`: configs/tinymim_distill.py's `teacher` argument (e.g. 'dinov2_reg_base', 'base+clip_base'), each
  at its default block; '' = the size's MAE teacher at the size's block.

  The student / teacher / optimizer come from configs/tinymim_distill.py through the builders, exactly as the
  trainer builds them (relation-block overrides, frozen params, the recipe's AdamW and schedule at batch 4096),
  and the step is jitted with donation. abstract=True: every array is a ShapeDtypeStruct (with its sharding),
  nothing is allocated, so the paper's sizes can be lowered and compiled anywhere.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from tinymim_jax import builders, sharding as sh, train_steps as ts
  from tinymim_jax.objectives import distill
  from tinymim_jax.study import load_config_module

  pair = common.SIZES[size]
  short = lambda name: name.split("_")[1]  # vit_small_patch16 -> small
  c = load_config_module(os.path.join(common.ROOT, "configs", "tinymim_distill.py")).get_config(
      f"student={short(pair.student)},teacher={teachers or short(pair.teacher)},"
      f"teacher_block={0 if teachers else pair.teacher_block},dtype={student_dtype},attention={attention}")
  c.seed = seed
  c.model.img_size = img
  for name in c.teachers:
    c[name].img_size = img if c[name].img_size else None  # MAE teachers; the others keep their variant's
    c[name].dtype = teacher_dtype
  spec = distill.distill_spec(c)
  steps_per_epoch = 1_281_167 // c.batch_size  # ImageNet-1K train images

  def make():
    student, extras = builders.make_trainable(c)
    return student, extras, distill.make_teachers(c)

  student, extras, teachers = nnx.eval_shape(make) if abstract else make()
  # The PyTorch reference (torch_reference.py) builds its layout from the Pair: the two must agree.
  assert [student.config.block_heads(i) for i in (1, pair.student_block)] == [pair.student_heads,
                                                                              pair.relation_heads], pair
  tx, schedule, _ = distill.make_optimizer(c, ts.split_model(student, extras)[1],
                                            total_steps=int(c.total_epochs * steps_per_epoch),
                                            warmup_steps=int(c.warmup_epochs * steps_per_epoch))
  if abstract:
    graphdef, tgraphs = ts.split_model(student, extras)[0], {n: nnx.split(t)[0] for n, t in teachers.items()}
    def abstract_state():
      s, e, t = make()
      return ts.init_state(s, tx, teachers=t, extras=e)[2]
    state = jax.eval_shape(abstract_state)
  else:
    graphdef, tgraphs, state = ts.init_state(student, tx, teachers=teachers, extras=extras)
  step = distill.make_distill_step(graphdef, tgraphs, tx, schedule, spec, distill.teacher_specs(c))

  mesh = mesh if mesh is not None else sh.make_mesh(fsdp=1, devices=jax.devices()[:1])
  state_sharding = sh.tree_sharding(state, mesh)
  shape = (batch, img, img, 3)
  if abstract:
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
    bsh = sh.batch_sharding(mesh)
    batch_arrays = {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bsh) for k in ("teacher", "student")}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sh.replicated(mesh))
  else:
    state = jax.device_put(state, state_sharding)
    r = np.random.default_rng(seed)
    batch_arrays = jax.device_put({k: r.standard_normal(shape, np.float32) for k in ("teacher", "student")},
                                  sh.batch_sharding(mesh))
    rng = jax.random.PRNGKey(seed)
  return dict(step=ts.jit_step(step, state_sharding, mesh), raw_step=step, state=state, batch=batch_arrays,
              rng=rng, pair=pair, spec=spec, graphdef=graphdef, tgraph=tgraphs["teacher"], mesh=mesh, config=c)


def build_and_compile(size: str, batch: int, **build_kw):
  """build() then lower + compile its step, timing each: -> (b, compiled, build_s, lower_s, compile_s)."""
  t0 = time.perf_counter()
  b = build(size, batch, **build_kw)
  build_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  lowered = b["step"].lower(b["state"], b["batch"], b["rng"])
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  return b, compiled, build_s, lower_s, time.perf_counter() - t0


def cost_flops(compiled) -> float | None:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return None if not ca else float(ca.get("flops", float("nan")))


def memory_stats(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  d = {k: int(getattr(m, k + "_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
  d["peak_estimate"] = d["argument"] + d["output"] - d["alias"] + d["temp"]
  return d


def step_pieces(b: dict):
  """(teacher_fwd(state, batch), loss_fn(params, state, batch, rng)) of build()'s step, as separate functions."""
  import jax
  from flax import nnx

  from tinymim_jax import losses, train_steps as ts
  spec = b["spec"]

  def teacher_fwd(state, batch):
    teacher = nnx.merge(b["tgraph"], state["teachers"]["teacher"])
    return teacher(batch["teacher"], depth=spec.teacher_block, capture=(spec.teacher_block,),
                   qkv_only=True)["blocks"][spec.teacher_block]

  def loss_fn(params, state, batch, rng):
    t = jax.lax.stop_gradient(teacher_fwd(state, batch))
    student = ts.merge_model(b["graphdef"], params, state["consts"])
    s = student(batch["student"], rng=rng, depth=spec.student_block, capture=(spec.student_block,),
                qkv_only=True)["blocks"][spec.student_block]
    return losses.relation_loss(t, s, w_qk=spec.w_qk, w_vv=spec.w_vv)[0]

  return teacher_fwd, loss_fn


def parse_variant(variant: str) -> dict:
  """'teacher_dtype[/student_dtype][+attention]' -> build() keywords, e.g. 'bfloat16/bfloat16+cudnn'."""
  dtypes, _, attention = variant.partition("+")
  teacher_dtype, _, student_dtype = dtypes.partition("/")
  return dict(teacher_dtype=teacher_dtype, student_dtype=student_dtype or "float32",
              attention=attention or "default")


# --------------------------------------------------------------------------------------------------------
# The JAX worker.
# --------------------------------------------------------------------------------------------------------
def jax_worker(args) -> dict:
  import jax
  import jax.numpy as jnp

  from tinymim_jax import train_steps as ts

  b, compiled, build_s, lower_s, compile_s = build_and_compile(args.size, args.batch, img=args.img,
                                                               **parse_variant(args.variant))
  ts.trim_host_memory()  # as the trainer does once its step is compiled
  box = {"state": b["state"], "metrics": None}
  dev = jax.devices()[0]

  def one():
    box["state"], box["metrics"] = compiled(box["state"], b["batch"], b["rng"])
    jax.block_until_ready(box["metrics"])

  def device_peak():
    try:
      return (dev.memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # CPU devices may not report
      return None

  def info():
    return {"build_s": build_s, "lower_s": lower_s, "compile_s": compile_s, "xla_flops": cost_flops(compiled),
            "memory": memory_stats(compiled), "device": f"{dev.platform}:{dev.device_kind}",
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "peak_rss": common.peak_rss_bytes()}

  def steps(n: int):
    cpu = []
    times = common.timed(one, n, cpu)
    return {"times": times, "cpu": cpu, "peak_rss": common.peak_rss_bytes(), "peak_device_bytes": device_peak(),
            "loss": float(box["metrics"]["loss"])}

  def matmul(n: int = 4096, dtype: str = "float32", reps: int = 5):
    # Fresh random operands (never zeros: they run faster than real data on some GPUs).
    dt = jnp.dtype(dtype)
    x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dt)
    y = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dt)
    f = jax.jit(jnp.matmul)
    f(x, y).block_until_ready()
    cpu = []
    ts_ = common.timed(lambda: f(x, y).block_until_ready(), reps, cpu)
    return {"gflops": 2.0 * n**3 / common.median(ts_) / 1e9, "gflops_per_cpu_s": 2.0 * n**3 / common.median(cpu) / 1e9}

  # Pieces of the step, each its own jitted program over the same state.
  teacher_fwd, loss_fn = step_pieces(b)
  piece_fns = {
      "teacher_fwd": jax.jit(teacher_fwd),
      "student_fwd": jax.jit(lambda st, bt, r: loss_fn(st["params"], st, bt, r)),
      "student_fwd_bwd": jax.jit(lambda st, bt, r: jax.value_and_grad(loss_fn)(st["params"], st, bt, r)),
  }

  def pieces(names, n: int):
    res = {}
    for name in names:
      if name == "step":
        fn = one
      else:
        f = piece_fns[name]
        args_ = (box["state"], b["batch"]) + ((b["rng"],) if name != "teacher_fwd" else ())
        fn = lambda: jax.block_until_ready(f(*args_))  # noqa: E731
        fn()
      cpu = []
      res[name] = {"times": common.timed(fn, n, cpu), "cpu": cpu}
    return res

  def profile(n: int = 2, trace_dir: str = "/tmp/tinymim_distill_trace"):
    """A jax.profiler trace of n steps, summarised per kind of op and part of the step (XLA CPU thunks), or
    on a GPU per kind of kernel (with the busiest kernels and the share of the step the GPU was busy)."""
    import collections, glob, gzip, json, re, shutil
    shutil.rmtree(trace_dir, ignore_errors=True)
    wall = common.median(common.timed(one, max(n, 3)))  # the step's own time, without the profiler's
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(n):
        one()
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
      return {"rows": [], "trace_dir": trace_dir}
    if dev.platform == "gpu":
      return gpu_kernel_summary(json.load(gzip.open(files[-1]))["traceEvents"], n, wall) | {"trace": files[-1]}
    hlo = compiled.as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    info = {}
    for line in entry.splitlines():
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w-]+)\(", line)
      if m:
        op_name = re.search(r'op_name="([^"]*)"', line)
        info[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
    agg = collections.defaultdict(float)
    for e in json.load(gzip.open(files[-1]))["traceEvents"]:
      if e.get("ph") != "X" or e.get("name") not in info:
        continue
      op, op_name = info[e["name"]]
      kind = ("matmul / conv" if ("ynn" in e["name"] or e["name"].startswith(("dot", "convolution"))) else
              "copy / transpose" if ("copy" in e["name"] or "transpose" in e["name"]) else "elementwise / reduce")
      part = ("student backward" if "transpose(" in op_name else "student forward + loss" if "jvp(" in op_name
              else "teacher forward, optimizer, rest")
      agg[(part, kind)] += e["dur"] / 1e6 / n
    return {"rows": sorted(([p, k, v] for (p, k), v in agg.items()), key=lambda r: -r[2]), "trace_dir": trace_dir}

  for _ in range(args.warmup):
    one()
  return {"info": info, "steps": steps, "matmul": matmul, "pieces": pieces, "profile": profile}


def kernel_kind(name: str) -> str:
  low = name.lower()
  if any(t in low for t in ("flash", "fmha", "cudnn", "sdpa", "attention")):
    return "fused attention"
  if any(t in low for t in ("gemm", "xmma", "nvjet", "cutlass", "cublas", "matmul", "dot", "conv", "wgmma")):
    return "matmul / conv"
  if any(t in low for t in ("memcpy", "memset", "copy")):
    return "copy / memset"
  return "elementwise / reduce fusions"


def gpu_kernel_summary(events, n_steps: int, wall_s: float) -> dict:
  """GPU kernel time per step by kind, the top kernels, and busy time / wall time, from a jax.profiler trace."""
  import collections
  meta = lambda kind: {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in events
                       if e.get("ph") == "M" and e.get("name") == kind}
  gpu_pids = {pid for (pid, _), name in meta("process_name").items() if "GPU" in name}
  threads = {k: v for k, v in meta("thread_name").items() if k[0] in gpu_pids}
  # Kernels sit on the 'Stream #..' lines; the 'XLA Ops' / 'XLA Modules' lines repeat the same time.
  streams = {k for k, v in threads.items() if "Stream" in v} or {
      k for k, v in threads.items() if not any(t in v for t in ("XLA", "Framework", "Steps", "Ops"))}
  by_kind, by_name = collections.defaultdict(float), collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e and (
        not threads or (e["pid"], e.get("tid")) in streams):
      s = e["dur"] / 1e6 / n_steps
      by_kind[kernel_kind(e["name"])] += s
      by_name[e["name"][:90]] += s
  busy = sum(by_kind.values())
  rows = [["GPU busy (all kernels)", "", f"{busy * 1e3:.2f} ms", f"{100 * busy / wall_s:.0f}% of the step's wall time"]]
  rows += [["kind", k, f"{v * 1e3:.2f} ms", f"{100 * v / max(busy, 1e-12):.0f}%"]
           for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])]
  rows += [["kernel", k, f"{v * 1e3:.2f} ms", f"{100 * v / max(busy, 1e-12):.0f}%"]
           for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]]
  return {"rows": rows, "step_wall_s": wall_s}


def torch_worker_argv(args) -> list[str]:
  dev = {"cpu": "cpu", "gpu": "cuda"}.get(args.device, args.device)
  return [os.path.join(os.path.dirname(HERE), "torch_reference.py"), "--worker", "--size", args.size, "--batch",
          str(args.batch), "--img", str(args.img), "--device", dev, "--amp", args.amp, "--threads",
          str(args.torch_threads)]


def start_worker(name: str, workers: dict, infos: dict, failed: dict, warmup: int) -> None:
  """Waits for a worker's build + compile; one that fails is reported and left out, not fatal to the run."""
  try:
    infos[name] = workers[name].call("info")
    if name == "torch reference":
      workers[name].call("steps", n=warmup)
    print(f"{name}: ready {infos[name]}", file=sys.stderr)
  except (RuntimeError, OSError) as e:  # OSError: the worker died before reading its first command
    failed[name] = str(e).splitlines()[-1][:300]
    print(f"{name}: FAILED, left out: {failed[name]}", file=sys.stderr)
    workers.pop(name).proc.kill()


# --------------------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------------------
def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_size_args(p, batch=8)
  p.add_argument("--device", default="cpu", help="cpu | gpu | tpu (JAX_PLATFORMS for ours; cuda for torch)")
  p.add_argument("--variants", default=None,
                 help="comma-separated teacher_dtype[/student_dtype][+attention] of our step (default: CPU "
                      "'float32,bfloat16', accelerators 'bfloat16')")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference (e.g. on TPU)")
  p.add_argument("--amp", default="auto", choices=["auto", "on", "off"], help="reference's fp16 autocast")
  p.add_argument("--torch-threads", type=int, default=2)
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
  p.add_argument("--steps", type=int, default=3, help="steps per worker per round")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--matmul-rounds", type=int, default=2)
  p.add_argument("--matmul-n", type=int, default=None, help="n of the n^3 peak matmul (cpu 4096, else 8192)")
  p.add_argument("--max-busy", type=float, default=0.25,
                 help="before each round, wait until other processes use at most this fraction of the cores")
  p.add_argument("--quiet-timeout", type=float, default=60.0, help="seconds to wait for that per round")
  p.add_argument("--profile", action="store_true", help="also time the pieces of each step")
  p.add_argument("--torch-profile", action="store_true", help="also print torch.profiler's table of one step")
  p.add_argument("--trace", action="store_true", help="also summarise a jax.profiler trace of our steps")
  p.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
  p.add_argument("--title", default="Distillation step")
  # Worker mode (internal).
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--variant", default="float32", help=argparse.SUPPRESS)
  args = p.parse_args()

  if args.worker:
    common.serve(jax_worker(args))
    return

  accel = args.device != "cpu"
  variants = (args.variants or ("bfloat16" if accel else "float32,bfloat16")).split(",")
  env = {"JAX_PLATFORMS": {"gpu": "cuda"}.get(args.device, args.device)}
  if args.device == "gpu":  # the workers share the card: each takes what it uses, not 75% up front
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  mm_n = args.matmul_n or (8192 if accel else 4096)
  mm_reps = 20 if accel else 5
  if args.trace and args.device == "cpu":  # per-thunk trace events of the XLA CPU runtime
    env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
  names = [f"jax {v}" for v in variants] + ([] if args.no_torch else ["torch reference"])
  workers: dict[str, common.Worker] = {}
  infos: dict[str, dict] = {}
  failed: dict[str, str] = {}
  # Workers build and compile as soon as they start. On a CPU one at a time (compiles would compete for the
  # cores being measured); on an accelerator all at once (the compiles run on the host's many cores).
  for name in names:
    if name.startswith("jax"):
      argv = [HERE, "--worker", "--variant", name[4:], "--size", args.size, "--batch", str(args.batch), "--img",
              str(args.img), "--warmup", str(args.warmup), "--device", args.device]
      workers[name] = common.Worker(name, argv, env)
    else:
      workers[name] = common.Worker(name, torch_worker_argv(args))
    if not accel:
      start_worker(name, workers, infos, failed, args.warmup)
  for name in names:
    if name not in infos and name not in failed:
      start_worker(name, workers, infos, failed, args.warmup)
  names = [n for n in names if n not in failed]
  if not names:
    raise SystemExit(f"every implementation failed: {failed}")

  times = {n: [] for n in names}
  cpus = {n: [] for n in names}
  last = {}
  busy_seen = []
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      if args.device == "cpu" and args.max_busy < 1:
        busy_seen.append(common.wait_quiet(args.max_busy, args.quiet_timeout))
      res = workers[name].call("steps", n=args.steps)
      times[name] += res["times"]
      cpus[name] += res["cpu"]
      last[name] = res
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {common.median(times[n]):.3f}s" for n in names) +
          f" (load {common.loadavg()})", file=sys.stderr)

  # Matmul peaks, interleaved too; the best of the rounds (a peak).
  peaks = {n: {} for n in names}
  for r in range(args.matmul_rounds):
    for name in names:
      dts = ["float32"] + (["bfloat16"] if "bfloat16" in name else [])
      if name == "torch reference" and accel and args.amp != "off":
        dts.append("float16")
      for dt in dts:
        res = workers[name].call("matmul", n=mm_n, dtype=dt, reps=mm_reps)
        peaks[name].setdefault(dt, []).append((res["gflops"], res["gflops_per_cpu_s"]))
  peak = {n: {dt: max(g for g, _ in v) for dt, v in d.items()} for n, d in peaks.items()}
  peak_cpu = {n: {dt: max(c for _, c in v) for dt, v in d.items()} for n, d in peaks.items()}

  pieces = ["teacher_fwd", "student_fwd", "student_fwd_bwd", "step"]
  piece_rows = []
  if args.profile:
    pt = {n: {k: [] for k in pieces} for n in names}
    pc = {n: {k: [] for k in pieces} for n in names}
    for r in range(2):
      for name in names:
        for k, v in workers[name].call("pieces", names=pieces, n=2).items():
          pt[name][k] += v["times"]
          pc[name][k] += v["cpu"]
    for name in names:
      for label, src in (("wall s", pt), ("CPU s", pc)):
        m = {k: common.median(v) for k, v in src[name].items()}
        piece_rows.append([name, label, *(f"{m[k]:.3f}" for k in pieces), f"{m['student_fwd'] - m['teacher_fwd']:.3f}",
                           f"{m['student_fwd_bwd'] - m['student_fwd']:.3f}", f"{m['step'] - m['student_fwd_bwd']:.3f}"])
  torch_table = ""
  trace_rows, gpu_rows = [], []
  try:  # the profiles are extras: a failure there must not lose the measurements above
    if args.torch_profile and "torch reference" in workers:
      torch_table = workers["torch reference"].call("profile")["table"]
    if args.trace:
      for name in names:
        if name.startswith("jax"):
          rows = workers[name].call("profile")["rows"]
          if accel:
            gpu_rows += [[name, *r] for r in rows]
          else:
            trace_rows += [[name, *r[:2], f"{r[2]:.3f}"] for r in rows]
  except Exception as e:  # noqa: BLE001
    print(f"profile failed: {e}", file=sys.stderr)
  for w in workers.values():
    w.close()

  # ---- report
  flops = common.distill_flops(common.SIZES[args.size], args.batch, args.img)
  ref_name = "torch reference" if "torch reference" in names else None
  ncores = os.cpu_count() if args.device == "cpu" else None
  rows = []
  for name in names:
    med, cmed = common.median(times[name]), common.median(cpus[name])
    ips = args.batch / med
    achieved = flops["total"] / med / 1e9
    mm = peak[name]["float32"]
    pct = f"{100 * achieved / mm:.0f}%"
    if "bfloat16" in name and "bfloat16" in peak[name]:
      pct += f" ({100 * achieved / peak[name]['bfloat16']:.0f}% of bf16 {peak[name]['bfloat16']:.0f})"
    if name == ref_name and "float16" in peak[name]:
      pct += f" ({100 * achieved / peak[name]['float16']:.0f}% of fp16 {peak[name]['float16']:.0f})"
    row = [name, f"{med:.3f}", f"{min(times[name]):.3f}", f"{ips:.2f}",
           f"{ips * common.median(times[ref_name]) / args.batch:.2f}" if ref_name else "-",
           f"{achieved:.0f}", f"{mm:.0f}", pct]
    if ncores:  # the load-independent view: CPU seconds
      cach = flops["total"] / cmed / 1e9  # GFLOP per CPU-second
      row += [f"{cmed:.2f}", f"{common.median(cpus[ref_name]) / cmed:.2f}" if ref_name else "-",
              f"{100 * cach / peak_cpu[name]['float32']:.0f}%"]
    mem = infos[name].get("memory", {})
    dev_peak = last[name].get("peak_device_bytes")
    row += [common.gib(last[name]["peak_rss"]), common.gib(dev_peak) if dev_peak else "-",
            common.gib(mem.get("peak_estimate")) if mem else "-",
            f"{infos[name]['xla_flops'] / 1e9:.0f}" if infos[name].get("xla_flops") else "-",
            f"{infos[name]['compile_s']:.1f}" if "compile_s" in infos[name] else "-"]
    rows.append(row)
  headers = ["implementation", "step s (median)", "min s", "img/s", "vs ref (img/s)", "GFLOP/s",
             "f32 matmul GFLOP/s", "% of matmul peak"]
  if ncores:
    headers += ["CPU s/step", "vs ref (CPU s)", "% of peak (CPU time)"]
  headers += ["peak RSS GiB", "device peak GiB", "XLA memory_analysis GiB", "XLA GFLOP/step", "compile s"]
  pair = common.SIZES[args.size]
  n_steps = args.rounds * args.steps
  body = (f"{pair.label}, {args.img} px, batch {args.batch}, device {args.device}: {n_steps} timed steps per "
          f"implementation in {args.rounds} interleaved rounds of {args.steps}, after {args.warmup} warm-up steps, "
          f"each implementation in its own process. Analytic matmul FLOPs per step {flops['total'] / 1e9:.1f} G "
          f"(teacher fwd {flops['teacher_fwd'] / 1e9:.1f}, student fwd {flops['student_fwd'] / 1e9:.1f}, student "
          f"bwd {flops['student_bwd'] / 1e9:.1f}); `XLA GFLOP/step` is cost_analysis()['flops'] of the compiled "
          f"step (matmuls + elementwise). `jax T[/S]` = our step with teacher [/student] compute dtype T [S]. "
          f"Matmul peak: best of {args.matmul_rounds} interleaved {mm_n}^3 matmuls (median of {mm_reps}) in each "
          f"process (jnp.matmul / torch.matmul, random operands).")
  if failed:
    body += " Left out (failed to build or compile): " + "; ".join(f"{n}: {e}" for n, e in failed.items()) + "."
  if accel:
    body += " The workers built and compiled concurrently (the `compile s` column includes that contention)."
  if busy_seen:
    body += (f" Before each round the driver waited (up to {args.quiet_timeout:.0f} s) for the other processes "
             f"to leave the cores idle (busy <= {args.max_busy:.0%}); busy fraction seen before the rounds: "
             f"median {common.median(busy_seen):.0%}, max {max(busy_seen):.0%}.")
  if ncores:
    body += (" CPU columns: process CPU seconds (user + system, all threads) per step, which other processes "
             "competing for the cores barely move; `% of peak (CPU time)` compares FLOPs per CPU-second with "
             "the matmul's FLOPs per CPU-second.")
  body += "\n\n" + common.table(headers, rows)
  if piece_rows:
    body += ("\n\nPieces (medians; each piece is its own program run on the same state, differences are "
             "estimates):\n\n" +
             common.table(["implementation", "unit", "teacher fwd", "+ student fwd + loss", "+ student bwd",
                           "full step", "= student fwd + loss", "= student bwd", "= optimizer etc."], piece_rows))
  if trace_rows:
    body += ("\n\njax.profiler trace of our step, seconds per step summed over the XLA CPU thunks of each kind "
             "(the two threads run independent thunks concurrently, and Eigen matmuls (`dot` thunks) run "
             "asynchronously, so these are shares, not a wall-clock split):\n\n" +
             common.table(["implementation", "part of the step", "kind of op", "thunk s / step"], trace_rows))
  if gpu_rows:
    body += ("\n\njax.profiler trace of our step on the GPU, kernel time per step (busy share of the step's wall "
             "time; kernels by kind; the busiest kernels):\n\n" +
             common.table(["implementation", "what", "name", "time / step", "share"], gpu_rows))
  if torch_table:
    body += "\n\ntorch.profiler, one reference step:\n\n```\n" + torch_table + "\n```"
  body += "\n\nAll step times, wall s: " + "; ".join(f"{n}: {[round(t, 2) for t in times[n]]}" for n in names)
  print(body)
  if not args.no_append:
    dev = infos[names[0]].get("device", args.device)
    common.append_section(f"{args.title}: {pair.label}, batch {args.batch}, {args.device}", body, devices=dev,
                          with_torch=ref_name is not None)


if __name__ == "__main__":
  main()
