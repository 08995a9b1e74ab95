"""The demo: TinyMIM vs MAE-from-scratch for a small ViT on the embedded digits data, end to end.

  python -m tinymim_jax.demo --workdir workdirs/demo

Runs the stages of configs/digits_demo.py with the main job (a rerun skips finished stages and resumes an
interrupted one), then prints a table of both students (frozen-feature k-NN, few-shot and linear-probe top-1,
and top-1 after fine-tuning, all on the held-out 20%) and writes workdir/summary.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import logging
import os
import time

from tinymim_jax import paths

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits_demo.py")


def load_config_module(path: str = CONFIG):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run the demo from a checkout of tinymim-jax")
  spec = importlib.util.spec_from_file_location("digits_demo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def summary_plot(path: str, rows: list[tuple[str, dict[str, float]]]) -> None:
  """Grouped bars: per student, the held-out top-1 of each eval in rows' dicts (values in [0, 1])."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metrics = list(rows[0][1])
  fig, ax = plt.subplots(figsize=(8, 3.2))
  width = 0.8 / len(rows)
  for j, ((name, values), color) in enumerate(zip(rows, ["tab:blue", "tab:gray"])):
    xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(metrics))]
    ax.bar(xs, [100 * values[m] for m in metrics], width, label=name, color=color)
    for x, m in zip(xs, metrics):
      ax.text(x, 100 * values[m] + 0.5, f"{100 * values[m]:.1f}", ha="center", fontsize=7)
  ax.set_xticks(range(len(metrics)), metrics)
  ax.set_ylabel("held-out top-1 (%)")
  ax.set_ylim(0, 109)
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title("digits: students of the same size and budget")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  paths.write_atomic(path, buf.getvalue())  # a local path or gs://


COLUMNS = (("k-NN", "eval/knn_top1"), ("1-shot", "eval/fewshot_1shot_top1"), ("5-shot", "eval/fewshot_5shot_top1"),
           ("10-shot", "eval/fewshot_10shot_top1"), ("25-shot", "eval/fewshot_25shot_top1"),
           ("linear probe", "eval/linprobe_top1"))


STUDENTS = (("TinyMIM", "relation KL, MAE teacher block 4", "student"), ("MAE", "from scratch, baseline", "baseline"))


def summary_rows(results: dict) -> list[tuple[str, dict[str, float]]]:
  """(student, {column: top-1}) for both students: frozen-feature evals, then fine-tuned top-1."""
  rows = []
  for name, _, stage in STUDENTS:
    values = {col: results[f"{stage}_eval"][key] for col, key in COLUMNS}
    values["fine-tuned"] = results[f"{stage}_finetune"]["eval/top1"]
    rows.append((name, values))
  return rows


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

  rows = summary_rows(results)
  blocks = {stage: results[f"{stage}_eval"]["feature"]["block"] for stage in ("student", "baseline")}
  print()
  print("| student (D=64, 4 blocks) | " + " | ".join(rows[0][1]) + " |")
  print("|---|" + "---|" * len(rows[0][1]))
  for (name, values), (_, how, _) in zip(rows, STUDENTS):
    print(f"| {name} ({how}) | " + " | ".join(f"{100 * v:.1f}" for v in values.values()) + " |")
  print(f"(held-out top-1, %. Frozen features: mean of patch tokens after a parameter-free LayerNorm, block "
        f"{blocks['student']} of the TinyMIM student (its relation block's input), block {blocks['baseline']} of the "
        f"MAE student; few-shot: mean of 3 draws.)")
  print(f"\ntotal {time.time() - t0:.0f}s; plots: {args.workdir}/*/curves.png and {args.workdir}/summary.png")
  summary_plot(os.path.join(args.workdir, "summary.png"), rows)
  paths.write_atomic(os.path.join(args.workdir, "summary.json"), json.dumps(results, indent=2))
  return results


if __name__ == "__main__":
  main()
