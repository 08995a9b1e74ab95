"""Distillation step cost per teacher kind: the trainer's step with an MAE, DINOv2 (with and without registers)
or CLIP teacher, and with two teachers at once, against the MAE teacher.

  python benchmarks/teachers.py            # CPU: ViT-S/16 student at 224 px, batch 8, float32 (~6 min)

Every teacher is a ViT-B at its default block (configs/tinymim_distill.py: 12 of 12, random weights) and runs
at the student's 14 x 14 grid (DINOv2: 196 px, patch 14). All steps live in one process and are timed in
interleaved rounds (order rotated each round); the table gives medians of wall seconds and of process CPU
seconds per step (the CPU figure moves little when other processes share the cores), the ratio of CPU seconds
to the MAE teacher's, and XLA's FLOP count of the compiled step.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.distill_step import build, cost_flops  # noqa: E402

# configs/tinymim_distill.py's `teacher` argument -> label.
KINDS = {
    "base": "MAE ViT-B/16",
    "dinov2_base": "DINOv2 ViT-B/14",
    "dinov2_reg_base": "DINOv2 ViT-B/14 + 4 registers",
    "clip_base": "CLIP ViT-B/16",
    "clip_quickgelu_base": "CLIP ViT-B/16, QuickGELU",
    "base+dinov2_reg_base": "two: MAE ViT-B/16 + DINOv2-reg ViT-B/14",
}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated keys of KINDS")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--img", type=int, default=224)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=2, help="steps per kind per round")
  p.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
  args = p.parse_args()
  import jax

  kinds = args.kinds.split(",")
  built, flops = {}, {}
  for kind in kinds:
    b = build("s_from_b", args.batch, img=args.img, teachers=kind)
    compiled = b["step"].lower(b["state"], b["batch"], b["rng"]).compile()
    flops[kind] = cost_flops(compiled)
    state = b["state"]
    for _ in range(2):  # warm-up
      state, m = compiled(state, b["batch"], b["rng"])
    jax.block_until_ready(m)
    built[kind] = {"compiled": compiled, "state": state, "batch": b["batch"], "rng": b["rng"], "config": b["config"]}
    print(f"{kind}: compiled, {flops[kind] / 1e9:.1f} GFLOP/step", file=sys.stderr)

  wall = {k: [] for k in kinds}
  cpu = {k: [] for k in kinds}
  for r in range(args.rounds):
    for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
      x = built[kind]

      def one():
        x["state"], m = x["compiled"](x["state"], x["batch"], x["rng"])
        jax.block_until_ready(m)
      wall[kind] += common.timed(one, args.steps, cpu[kind])
    print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

  ref = common.median(cpu[kinds[0]])
  rows = []
  for kind in kinds:
    c = built[kind]["config"]
    blocks = ", ".join(f"{c[n].name} block {c[n].block or c.distill.teacher_block}" for n in c.teachers)
    rows.append([KINDS.get(kind, kind), f"`teacher={kind}`", blocks, f"{common.median(wall[kind]):.2f}",
                 f"{common.median(cpu[kind]):.2f}", f"{common.median(cpu[kind]) / ref:.2f}x",
                 f"{flops[kind] / 1e9:.0f}"])
  body = (f"ViT-S/16 student (relation block 12), {args.img} px, batch {args.batch}, float32, one device; medians "
          f"of {args.rounds} interleaved rounds x {args.steps} steps. CPU s: process CPU seconds per step "
          f"(user + system, all threads); the ratio is against the first row.\n\n"
          + common.table(["teacher", "config", "runs", "wall s/step", "CPU s/step", "CPU vs first", "XLA GFLOP/step"],
                         rows))
  print(body)
  if not args.no_append:
    common.append_section("Distillation step per teacher kind", body, with_torch=False)


if __name__ == "__main__":
  main()
