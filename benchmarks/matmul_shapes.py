"""The distillation step's matmuls one by one: XLA (jnp, jitted) vs torch (MKL) vs numpy (OpenBLAS), float32.

For every Linear of the CPU-size step (ViT-S student and ViT-B teacher, 224 px, batch 8: 1576 tokens) the
three products of training: forward x @ W, input gradient dY @ W^T, weight gradient X^T @ dY (the teacher
only runs forward in the step; its shapes show the larger products). GFLOP/s from the median of --reps runs of
8 back-to-back calls on random operands; the same process, one library after the other.

  python benchmarks/matmul_shapes.py                    # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", type=int, default=8 * 197, help="rows: batch x tokens")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
  args = p.parse_args()

  import jax
  import numpy as np
  import torch
  torch.set_num_threads(args.threads)

  def gflops(fn, flops, sync=lambda r: r, calls=8):
    """Median over reps of `calls` back-to-back calls (jax dispatches asynchronously: its per-call overhead
    overlaps the previous product, as inside a compiled step)."""
    sync(fn())
    ts = common.timed(lambda: sync([fn() for _ in range(calls)][-1]), args.reps)
    return flops * calls / common.median(ts) / 1e9

  m = args.tokens
  layers = {}  # (in, out) -> names, ViT-S (384) and ViT-B (768) Linears
  for name, d in (("S", 384), ("B", 768)):
    for layer, (i, o) in {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}.items():
      layers.setdefault((i, o), []).append(f"{name}.{layer}")
  rows, seconds, total_flops = [], {"xla": 0.0, "torch": 0.0, "numpy": 0.0}, 0.0
  rng = np.random.default_rng(0)
  for (i, o), names in layers.items():
    x, w, dy = (rng.standard_normal(s, np.float32) for s in ((m, i), (i, o), (m, o)))
    flops = 2.0 * m * i * o
    products = {  # name -> (the product, its operands), the same expression for all three libraries
        "forward x@W": (lambda a, b: a @ b, (x, w)),
        "input grad dY@W^T": (lambda a, b: a @ b.T, (dy, w)),
        "weight grad X^T@dY": (lambda a, b: a.T @ b, (x, dy)),
    }
    for prod, (f, operands) in products.items():
      jf = jax.jit(f)
      ja = [jax.device_put(a) for a in operands]
      ta = [torch.from_numpy(a) for a in operands]
      r = {"xla": gflops(lambda: jf(*ja), flops, sync=jax.block_until_ready),
           "torch": gflops(lambda: f(*ta), flops),
           "numpy": gflops(lambda: f(*operands), flops)}
      total_flops += flops
      for k, v in r.items():
        seconds[k] += flops / 1e9 / v
      libs = [f"{r[k]:.0f}" for k in ("xla", "torch", "numpy")]
      rows.append([", ".join(names), f"{m}x{i}x{o}", prod, *libs, f"{r['xla'] / r['torch']:.2f}"])
  overall = {k: total_flops / 1e9 / v for k, v in seconds.items()}
  libs = [f"{overall[k]:.0f}" for k in ("xla", "torch", "numpy")]
  rows.append(["all of the above (one of each)", "", "", *libs, f"{overall['xla'] / overall['torch']:.2f}"])
  body = (f"Float32, {args.threads} threads; {m} rows (batch 8 x 197 tokens); GFLOP/s (2 m k n / time per call, median of "
          f"{args.reps} runs of 8 back-to-back calls). `xla` = jax.jit(jnp matmul) on the CPU backend (YNNPACK / Eigen), `torch` = "
          f"torch.matmul (MKL / oneDNN), `numpy` = numpy's OpenBLAS.\n\n" +
          common.table(["Linear", "m x k x n", "product", "xla GFLOP/s", "torch GFLOP/s", "numpy GFLOP/s",
                        "xla / torch"], rows))
  print(body)
  if not args.no_append:
    common.append_section("Matmuls of the distillation step, one by one (cpu)", body, devices="cpu")


if __name__ == "__main__":
  main()
