r"""The segment train step's throughput (objective 'segment': UperNet on a ViT, configs/segment.py rows), and the
GPU-hours of the paper's 160k-iteration, batch-16 schedule it implies.

  python benchmarks/segment_step.py [--rows demo:64,tiny:256] [--flops-rows tiny:512,small:512,base:512] \
      [--batch 2] [--steps 3] [--no-append]

Each row's step is built as the trainer builds it (configs/segment.py, objectives/segment), jitted on one device
and timed after a warm-up step. Columns: step seconds (median), crops/s, CPU seconds per step, XLA's
GFLOP/step (cost_analysis) and, from it, the hours of the paper's schedule (160,000 steps x 16 crops of 512 px:
GFLOP per 512 px crop x 2.56e6 crops) at two rates: this run's (measured GFLOP/s) and H200_GFLOPS (the
distillation step's measured bfloat16 rate on one H200, BENCHMARKS.md "Distillation step: ViT-B from ViT-L"),
the latter an estimate until the segment step itself is timed on a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

H200_GFLOPS = 295008.0  # BENCHMARKS.md, ViT-B from ViT-L, batch 128, jax bfloat16/bfloat16 on one H200
PAPER_CROPS = 160_000 * 16


def build(row: str, batch: int, crop: int):
  """-> (jitted step, state, batch, rng) of configs/segment.py:model=<row> at `crop` px, `batch` crops."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tinymim_jax import config_base, objectives  # pylint: disable=g-import-not-at-top
  from tinymim_jax.study import load_config_module  # pylint: disable=g-import-not-at-top
  from tinymim_jax.objectives.segment.objective import SegmentDataInfo  # pylint: disable=g-import-not-at-top
  c = load_config_module(os.path.join(common.ROOT, "configs", "segment.py")).get_config(f"model={row}")
  c.segment.crop, c.batch_size = crop, batch
  c = objectives.resolve_run(config_base.finalize(c))
  info = SegmentDataInfo("synthetic", c.segment.num_classes, 1000, 10, crop)
  run = objectives.get("segment").setup(c, info, total_steps=1000, warmup_steps=10, is_main=False)
  rng = np.random.RandomState(0)
  data = {"image": rng.normal(size=(batch, crop, crop, 3)).astype(np.float32),
          "label": rng.randint(0, c.segment.num_classes, (batch, crop, crop)).astype(np.int32)}
  step = jax.jit(run.step, donate_argnums=(0,))
  return step, run.state, data, jax.random.PRNGKey(0)


def measure(row: str, batch: int, crop: int, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  step, state, data, rng = build(row, batch, crop)
  lowered = step.lower(state, data, rng)
  if not steps:  # FLOPs only: the lowered program's count (no CPU compile of a 512 px step)
    ca = lowered.cost_analysis()
    compiled, compile_s = None, float("nan")
  else:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  gflop = float(ca.get("flops", float("nan"))) / 1e9
  box = [state]

  def one():
    box[0], m = compiled(box[0], data, rng)
    jax.block_until_ready(m["loss"])

  per_crop = gflop / batch
  out = {"row": row, "crop": crop, "batch": batch, "gflop": gflop, "compile_s": compile_s,
         "hours_h200": PAPER_CROPS * per_crop / H200_GFLOPS / 3600 if crop == 512 else float("nan")}
  if not steps:  # FLOPs only
    return {**out, "step_s": float("nan"), "crops_s": float("nan"), "cpu_s": float("nan"),
            "gflops": float("nan"), "hours_here": float("nan")}
  one()  # warm-up
  cpu: list[float] = []
  med = common.median(common.timed(one, steps, cpu))
  return {**out, "step_s": med, "crops_s": batch / med, "cpu_s": common.median(cpu), "gflops": gflop / med,
          "hours_here": PAPER_CROPS * per_crop / (gflop / med) / 3600 if crop == 512 else float("nan")}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", default="demo:64,tiny:256", help="configs/segment.py models, each with its crop "
                 "(model:crop), comma-separated")
  p.add_argument("--flops-rows", default="tiny:512,small:512,base:512",
                 help="rows compiled for XLA's FLOP count only (the paper's crop: GPU-hour estimates)")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--no-append", action="store_true")
  a = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"
  spec = [(r, a.steps) for r in a.rows.split(",") if r] + [(r, 0) for r in a.flops_rows.split(",") if r]
  res = [measure(r.split(":")[0], a.batch, int(r.split(":")[1]), n) for r, n in spec]
  rows = [[r["row"], r["crop"], f"{r['step_s']:.3f}", f"{r['crops_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['gflop']:.0f}",
           f"{r['gflops']:.0f}", f"{r['compile_s']:.1f}", f"{r['hours_here']:.0f}", f"{r['hours_h200']:.1f}"]
          for r in res]
  body = (f"configs/segment.py rows at the crop given, batch {a.batch}, device {device}, float32 params (compute "
          f"dtype as the config: float32), random weights and Gaussian images; {a.steps} timed steps after one "
          f"warm-up. Paper schedule: 160,000 steps x 16 crops = {PAPER_CROPS:,} crops; hours = crops x GFLOP per "
          f"crop / GFLOP/s. `h200 est.` uses {H200_GFLOPS:.0f} GFLOP/s, the distillation step's measured bf16 "
          "rate on one H200 (this section's own GPU run replaces it); evals (slide inference) not included.\n\n"
          + common.table(["row", "crop", "step s", "crops/s", "CPU s/step", "XLA GFLOP/step", "GFLOP/s", "compile s",
                          "paper schedule, hours here", "h200 est. GPU-hours"], rows))
  print(body)
  if not a.no_append:
    common.append_section(f"Segment step: UperNet on a ViT, batch {a.batch}, {device}", body,
                          devices=device, with_torch=False)


if __name__ == "__main__":
  main()
