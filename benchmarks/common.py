"""Shared pieces of the benchmarks: sizes, analytic FLOPs, worker processes, machine/version info, tables and
appending to BENCHMARKS.md.

Nothing here imports jax or torch at module import time: the scaling benchmark must set XLA_FLAGS before jax
is imported, and the PyTorch reference worker must not load jax at all (so the peak RSS of each
implementation is its own).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")
PROTO = "@@BENCH "  # prefix of the worker protocol lines on stdout (anything else printed is passed through)


# --------------------------------------------------------------------------------------------------------
# Sizes (docs/method.md sections 2-3): student layouts (heads in blocks 1..11 / heads of the relation block) and
# teacher blocks.
# --------------------------------------------------------------------------------------------------------
def _variants() -> dict:
  # Read from the model zoo's plain-Python table without importing the package (which imports jax).
  import runpy
  return runpy.run_path(os.path.join(ROOT, "tinymim_jax", "models", "variants.py"))["VARIANTS"]


VIT = {name: (v["embed_dim"], v["depth"], v["num_heads"], v["patch_size"])  # name: (embed_dim, depth, heads, patch)
       for name, v in _variants().items()}


@dataclass(frozen=True)
class Pair:
  student: str
  student_heads: int
  relation_heads: int
  teacher: str
  teacher_block: int
  student_block: int = 12

  @property
  def label(self) -> str:
    short = lambda n: n.split("_")[1][0].upper()  # vit_small_patch16 -> S
    return f"ViT-{short(self.student)} from ViT-{short(self.teacher)} (block {self.teacher_block})"


SIZES = {
    # The CPU size of the issue is s_from_b at batch 8.
    "s_from_b": Pair("vit_small_patch16", 6, 12, "vit_base_patch16", 12),
    "t_from_b": Pair("vit_tiny_patch16", 6, 12, "vit_base_patch16", 12),
    "b_from_l": Pair("vit_base_patch16", 12, 16, "vit_large_patch16", 18),
}


def add_size_args(parser, batch: int) -> None:
  """--size / --batch / --img, the arguments every distillation-step benchmark shares."""
  parser.add_argument("--size", default="s_from_b", choices=sorted(SIZES))
  parser.add_argument("--batch", type=int, default=batch)
  parser.add_argument("--img", type=int, default=224)


# --------------------------------------------------------------------------------------------------------
# Analytic FLOPs (matmuls only, 2 FLOPs per multiply-add).
# --------------------------------------------------------------------------------------------------------
def _vit_fwd_flops(name: str, img: int, batch: int, blocks: int, mlp_ratio: float = 4.0) -> dict[str, float]:
  """Forward matmul FLOPs of a ViT run to `blocks`, the last block stopping after its qkv projection,
  plus the two relation products (q k^T and v v^T) of that block."""
  d, _, _, p = VIT[name]
  g = img // p
  n = g * g + 1
  patch = 2.0 * batch * g * g * (3 * p * p) * d
  full = 2.0 * batch * n * d * (3 * d + d + 2 * mlp_ratio * d) + 2 * 2.0 * batch * n * n * d  # linears + attn
  qkv = 2.0 * batch * n * d * 3 * d
  rel = 2 * 2.0 * batch * n * n * d
  return {"patch": patch, "blocks": (blocks - 1) * full, "qkv": qkv, "relation": rel}


def distill_flops(pair: Pair, batch: int, img: int = 224) -> dict[str, float]:
  """Matmul FLOPs of one distillation step: teacher forward (truncated), student forward + backward.

  Backward of a matmul costs twice its forward (grads of both operands), except the patch embedding, whose
  input (the images) needs no gradient: once. The optimizer and the elementwise work are not counted.
  """
  t = _vit_fwd_flops(pair.teacher, img, batch, pair.teacher_block)
  s = _vit_fwd_flops(pair.student, img, batch, pair.student_block)
  t_fwd, s_fwd = sum(t.values()), sum(s.values())
  s_bwd = 2 * s_fwd - s["patch"]
  return {"teacher_fwd": t_fwd, "student_fwd": s_fwd, "student_bwd": s_bwd, "total": t_fwd + s_fwd + s_bwd}


def param_counts(pair: Pair) -> dict[str, int]:
  """Parameters: the teacher's (all of it, as held in memory), the teacher's up to its block, the student's
  trainable (what receives gradient: blocks 1..11 whole + norm1 and qkv of block 12, patch embed, cls)."""

  def block(d, r=4):
    return 2 * d + 3 * d * d + 3 * d + d * d + d + 2 * d + d * r * d + r * d + r * d * d + d

  def vit(name):
    d, depth, _, p = VIT[name]
    return 3 * p * p * d + d + d + depth * block(d) + 2 * d  # patch (w, b), cls, blocks, final norm

  ds, _, _, ps = VIT[pair.student]
  trainable = 3 * ps * ps * ds + ds + ds + (pair.student_block - 1) * block(ds) + 2 * ds + 3 * ds * ds + 3 * ds
  dt, _, _, pt = VIT[pair.teacher]
  teacher_used = 3 * pt * pt * dt + 2 * dt + (pair.teacher_block - 1) * block(dt) + 2 * dt + 3 * dt * dt + 3 * dt
  return {"teacher": vit(pair.teacher), "teacher_used": teacher_used, "student": vit(pair.student),
          "student_trainable": trainable}


# --------------------------------------------------------------------------------------------------------
# Machine, versions, timing helpers.
# --------------------------------------------------------------------------------------------------------
def machine(devices: str | None = None) -> str:
  from tinymim_jax import environment
  return environment.machine(devices)


def versions(with_torch: bool = True) -> str:
  from tinymim_jax import environment
  names = ("jax", "jaxlib", "flax", "optax", "numpy") + (("torch", "timm") if with_torch else ())
  return ", ".join(f"{k} {v}" for k, v in environment.versions(names).items())


def loadavg() -> str:
  try:
    return "%.1f / %.1f / %.1f" % os.getloadavg()
  except OSError:
    return "?"


def cpu_busy(seconds: float = 1.0) -> float:
  """Fraction of all cores busy (system-wide, /proc/stat) over the next `seconds`; nan if unavailable."""
  def snap():
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], sum(v)  # idle + iowait, total
  try:
    a = snap()
    time.sleep(seconds)
    b = snap()
  except OSError:
    return float("nan")
  return 1.0 - (b[0] - a[0]) / max(b[1] - a[1], 1)


def wait_quiet(max_busy: float, timeout: float) -> float:
  """Waits (up to `timeout` s) until other processes leave the cores idle: busy fraction <= max_busy, measured
  while our own workers are idle. Returns the last busy fraction seen."""
  deadline = time.monotonic() + timeout
  busy = cpu_busy()
  while busy > max_busy and time.monotonic() < deadline:
    busy = cpu_busy(2.0)
  return busy


def peak_rss_bytes() -> int:
  """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median(xs):
  xs = sorted(xs)
  n = len(xs)
  return float("nan") if not n else (xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2]))


def gib(x) -> str:
  return "-" if x is None else f"{x / 2**30:.2f}"


def command_line() -> str:
  argv = [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]
  env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("XLA_FLAGS", "JAX_PLATFORMS") if os.environ.get(k))
  return (env + " " if env else "") + "python " + " ".join(shlex.quote(a) for a in argv)


# --------------------------------------------------------------------------------------------------------
# Tables and BENCHMARKS.md.
# --------------------------------------------------------------------------------------------------------
def table(headers, rows) -> str:
  rows = [[str(c) for c in r] for r in rows]
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def append_section(title: str, body: str, *, devices: str | None = None, with_torch: bool = True,
                   path: str = BENCHMARKS_MD) -> None:
  """Appends `## title` (a section of its own) with the command, machine, versions and date, then `body`, to BENCHMARKS.md.

  Appends only (another engineer owns other sections); an exclusive lock keeps concurrent writers apart.
  """
  stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
  text = (f"\n## {title}\n\n"
          f"- command: `{command_line()}`\n"
          f"- machine: {machine(devices)}\n"
          f"- versions: {versions(with_torch)}\n"
          f"- date: {stamp}; load average at the end (1/5/15 min): {loadavg()}\n\n"
          f"{body.rstrip()}\n")
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      if f.tell() == 0:
        f.write("# Benchmarks\n")
      f.write(text)
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
  print(f"appended '{title}' to {os.path.relpath(path)}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------
# Worker processes: one fresh process per implementation, driven over stdin/stdout (JSON lines), so the
# driver can interleave them (A/B/A/B...) while each keeps its own compiled step and its own peak RSS.
# --------------------------------------------------------------------------------------------------------
def serve(handlers: dict) -> None:
  """Worker side: reads {'cmd': name, **kwargs} lines, replies PROTO + json of handlers[name](**kwargs)."""
  out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints of libraries go to stderr
  for line in sys.stdin:
    msg = json.loads(line)
    cmd = msg.pop("cmd")
    if cmd == "quit":
      out.write(PROTO + json.dumps({"peak_rss": peak_rss_bytes()}) + "\n")
      break
    try:
      res = handlers[cmd](**msg)
    except Exception as e:  # report, keep serving
      import traceback
      traceback.print_exc()
      res = {"error": f"{type(e).__name__}: {e}"}
    out.write(PROTO + json.dumps(res) + "\n")


class Worker:
  """Driver side of a worker process."""

  def __init__(self, name: str, argv: list[str], env: dict | None = None):
    self.name = name
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    self.proc = subprocess.Popen([sys.executable] + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, bufsize=1, env=full_env, cwd=ROOT)

  def call(self, cmd: str, **kwargs) -> dict:
    self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
    self.proc.stdin.flush()
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f"worker {self.name} died (exit {self.proc.wait()})")
      if line.startswith(PROTO):
        res = json.loads(line[len(PROTO):])
        if "error" in res:
          raise RuntimeError(f"worker {self.name}: {res['error']}")
        return res
      sys.stderr.write(f"[{self.name}] {line}")

  def close(self) -> dict:
    res = self.call("quit")
    self.proc.wait(timeout=60)
    return res


def timed(fn, n: int, cpu: list | None = None) -> list[float]:
  """Wall seconds of n calls of fn() (fn must block until its work is done).

  If `cpu` is a list, the process CPU seconds (user + system, all threads) of each call are appended to it:
  unlike wall time, they barely move when other processes compete for the cores, so they show the work an
  implementation does (and, divided by the core count, the wall time it would take on an idle machine, as
  long as its threads do not spin while waiting).
  """
  out = []
  for _ in range(n):
    c0 = time.process_time()
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
    if cpu is not None:
      cpu.append(time.process_time() - c0)
  return out
