"""The demo: TinyMIM vs MAE-from-scratch for a small ViT on the embedded digits data, end to end.

  python -m tinymim_jax.demo --workdir workdirs/demo

Runs the five stages of configs/digits_demo.py with the main job (a rerun skips finished stages and resumes
an interrupted one), then prints the held-out top-1 of both students and writes workdir/summary.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import time

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits_demo.py")


def load_config_module(path: str = CONFIG):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run the demo from a checkout of tinymim-jax")
  spec = importlib.util.spec_from_file_location("digits_demo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def summary_plot(path: str, rows: list[tuple[str, float]]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3))
  ax.bar([r[0] for r in rows], [100 * r[1] for r in rows], color=["tab:blue", "tab:gray"])
  for i, (_, v) in enumerate(rows):
    ax.text(i, 100 * v + 0.5, f"{100 * v:.1f}", ha="center")
  ax.set_ylabel("held-out top-1 (%)")
  ax.set_ylim(0, 105)
  ax.set_title("digits: fine-tuned student")
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=100)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="workdirs/demo")
  p.add_argument("--pretrain_epochs", type=float, default=None)
  p.add_argument("--finetune_epochs", type=float, default=None)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

  from tinymim_jax import config_base, main as trainer  # after arg parsing: --help stays fast
  module = load_config_module()
  results, t0 = {}, time.time()
  for stage in module.STAGES:
    arg = f"stage={stage},root={args.workdir}"
    for k in ("pretrain_epochs", "finetune_epochs"):  # None: the config's default
      if getattr(args, k) is not None:
        arg += f",{k}={getattr(args, k)}"

    config = config_base.finalize(module.get_config(arg))
    t = time.time()
    print(f"== {stage}: {config.objective} ({config.model.name} D={config.model.embed_dim} "
          f"depth={config.model.depth})", flush=True)
    results[stage] = trainer.train_and_evaluate(config, os.path.join(args.workdir, stage))
    if results[stage].get("preempted"):
      print(f"stopped during {stage}; rerun the same command to resume")
      return results
    shown = {k: round(v, 4) for k, v in results[stage].items() if k.startswith("eval/") and "seconds" not in k}
    print(f"   done in {time.time() - t:.0f}s: {shown}", flush=True)

  rows = [("TinyMIM student", results["student_finetune"]["eval/top1"]),
          ("MAE student", results["baseline_finetune"]["eval/top1"])]
  print()
  print("| student (D=64, 4 blocks) | pretraining | held-out top-1 |")
  print("|---|---|---|")
  print(f"| TinyMIM (distilled from MAE teacher block 4) | relation KL | {100 * rows[0][1]:.1f} |")
  print(f"| MAE from scratch (baseline) | pixel MSE | {100 * rows[1][1]:.1f} |")
  print(f"\ntotal {time.time() - t0:.0f}s; plots: {args.workdir}/*/curves.png and {args.workdir}/summary.png")
  summary_plot(os.path.join(args.workdir, "summary.png"), rows)
  with open(os.path.join(args.workdir, "summary.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
