"""The demo: TinyMIM vs MAE-from-scratch for a small ViT on the embedded digits data, end to end.

  python -m tinymim_jax.demo --workdir workdirs/demo

Runs the stages of configs/digits_demo.py with the main job (a rerun skips finished stages and resumes an
interrupted one), then prints a table of both students (frozen-feature k-NN, few-shot and linear-probe top-1,
and top-1 after fine-tuning, all on the held-out 20%; mIoU of a linear segmentation probe on frozen patch tokens
and of UperNet fine-tuned, on the digits scenes) and writes workdir/summary.png.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import time

from tinymim_jax import paths

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits_demo.py")


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
           ("linear probe", "eval/linprobe_top1"), ("seg. probe mIoU", "eval/segprobe_miou"))


# (row, how, the fine-tuned stage, the frozen-feature stage, the segmentation stage): the students, then the two
# floors.
ROWS = (("TinyMIM", "relation KL, MAE teacher block 4", "student_finetune", "student_eval", "student_segment"),
        ("MAE", "from scratch, baseline", "baseline_finetune", "baseline_eval", "baseline_segment"),
        ("floor: raw pixels", "the same frozen-feature evals", None, "floors", None),
        ("floor: random init", "the same fine-tuning, no pretraining", "control_finetune", None, "control_segment"))


def summary_rows(results: dict) -> list[tuple[str, dict[str, float | None]]]:
  """(row, {column: top-1 / mIoU or None}) for both students and the two floors: frozen-feature evals, then
  fine-tuned (classification top-1, segmentation mIoU). An eval a stage does not run (the pixel floors have no
  patch tokens to probe) is None."""
  rows = []
  for name, _, finetuned, frozen, segment in ROWS:
    values = {col: results[frozen].get(key) if frozen else None for col, key in COLUMNS}
    values["fine-tuned"] = results[finetuned]["eval/top1"] if finetuned else None
    values["segment mIoU"] = results[segment]["eval/mIoU"] if segment else None
    rows.append((name, values))
  return rows


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="workdirs/demo")
  p.add_argument("--pretrain_epochs", type=float, default=None)
  p.add_argument("--finetune_epochs", type=float, default=None)
  p.add_argument("--segment_steps", type=int, default=None)
  p.add_argument("--segment_batch", type=int, default=None)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

  from tinymim_jax import study  # after arg parsing: --help stays fast
  module = study.load_config_module(CONFIG)
  base = ",".join(f"{k}={getattr(args, k)}"
                  for k in ("pretrain_epochs", "finetune_epochs", "segment_steps", "segment_batch")
                  if getattr(args, k) is not None)  # None: the config's default
  t0 = time.time()
  if not study.run_plan(module, args.workdir, base_arg=base):
    return {"preempted": True}
  results = {name: json.loads(paths.read_text(os.path.join(args.workdir, name, "done.json")))
             for name, _ in module.plan()}

  rows = summary_rows(results)
  blocks = {stage: results[f"{stage}_eval"]["feature"]["block"] for stage in ("student", "baseline")}
  print()
  print("| student (D=64, 4 blocks) | " + " | ".join(rows[0][1]) + " |")
  print("|---|" + "---|" * len(rows[0][1]))
  for (name, values), (_, how, *_) in zip(rows, ROWS):
    print(f"| {name} ({how}) | " + " | ".join("—" if v is None else f"{100 * v:.1f}" for v in values.values()) + " |")
  print(f"(held-out top-1, %. Frozen features: mean of patch tokens after a parameter-free LayerNorm, block "
        f"{blocks['student']} of the TinyMIM student (its relation block's input), block {blocks['baseline']} of the "
        f"MAE student; raw pixels: the normalised pixels through the same evals; few-shot: mean of 3 draws. mIoU on the "
        f"digits scenes' val split: the seg. probe on frozen patch tokens, segment: UperNet fine-tuned.)")
  print(f"\ntotal {time.time() - t0:.0f}s; plots: {args.workdir}/*/curves.png and {args.workdir}/summary.png")
  summary_plot(os.path.join(args.workdir, "summary.png"), rows[:2])
  paths.write_atomic(os.path.join(args.workdir, "summary.json"), json.dumps(results, indent=2))
  return results


if __name__ == "__main__":
  main()
