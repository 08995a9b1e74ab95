"""The converter's command line: python -m tinymim_jax.convert {import,export,inspect} --help."""

from __future__ import annotations

import argparse
import sys
from typing import Mapping

import numpy as np

from tinymim_jax import builders
from tinymim_jax.convert import (ConvertError, _describe_model, _load, _sort_key, _square_grid, detect_layout,
                                 read_pytorch_weights, save_pytorch_weights)
from tinymim_jax.models import VARIANTS, create_model


def _guess_variant(weights: Mapping[str, np.ndarray]) -> str:
  if "cls_token" not in weights or "patch_embed.proj.weight" not in weights:
    return "not a ViT checkpoint (no cls_token / patch_embed.proj.weight)"
  d = weights["cls_token"].shape[-1]
  p = weights["patch_embed.proj.weight"].shape[-1]
  depth = len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
  name = next((n for n, v in VARIANTS.items()
               if (v["embed_dim"], v["depth"], v["patch_size"]) == (d, depth, p)), "custom")
  text = f"{name} (D {d}, depth {depth}, patch {p}"
  if "pos_embed" in weights:
    g = _square_grid(weights["pos_embed"].shape[1] - 1)
    text += f", grid {g}x{g} = img {g * p}" if g else ""
  if "head.weight" in weights:
    text += f", {weights['head.weight'].shape[0]} classes"
  return text + ")"


def _cmd_inspect(args):
  weights, extras, label = read_pytorch_weights(args.file)
  print(f"{label}: {len(weights)} tensors, {sum(v.size for v in weights.values()):,} values")
  print(f"layout: {detect_layout(weights, extras)}")
  print(f"model:  {_guess_variant(weights)}")
  for k, reason in extras.items():
    print(f"entry:  {k} ({reason})")
  for k in sorted(weights, key=_sort_key):
    print(f"  {k:48s} {str(tuple(weights[k].shape)):20s} {weights[k].dtype}")
  return 0


def _cmd_import(args):
  from flax import nnx

  weights, extras, label = read_pytorch_weights(args.src)
  overrides = {}
  if args.img_size is not None:
    overrides["img_size"] = args.img_size
  if args.pos_embed is not None:
    overrides["pos_embed"] = args.pos_embed
  if not args.model.startswith("mae_"):
    # Defaults follow the file: a fine-tuned file (fc_norm + head) gives the 'avg' layout and its classes.
    num_classes = args.num_classes
    if num_classes is None:
      num_classes = int(weights["head.weight"].shape[0]) if "head.weight" in weights else 0
    pooling = args.pooling or ("avg" if "fc_norm.weight" in weights or args.num_classes else "cls")
    overrides.update(num_classes=num_classes, pooling=pooling)
  make = lambda: create_model(args.model, **overrides)
  # Everything comes from the file unless keys may be missing: skip the random init (ViT-H: 630M values).
  model = make() if args.allow_missing else nnx.eval_shape(make)
  report = _load(model, weights, extras, label, skip=args.skip, allow_missing=args.allow_missing, strict=True)
  print(report)
  written = save_pytorch_weights(model, args.out)
  print(f"wrote {len(written)} tensors ({_describe_model(model)}) to {args.out}")
  return 0


def _cmd_export(args):
  if (args.workdir is None) == (args.weights is None):
    raise ConvertError("export needs exactly one of --workdir DIR or --weights FILE")
  if args.weights is not None:
    weights, extras, label = read_pytorch_weights(args.weights)
    save_pytorch_weights(weights, args.out)
    dropped = f" (dropped entries: {', '.join(extras)})" if extras else ""
    print(f"wrote {len(weights)} tensors from {label} to {args.out}{dropped}")
    return 0
  model = builders.restore_model(args.workdir)
  written = save_pytorch_weights(model, args.out)
  print(f"wrote {len(written)} tensors ({_describe_model(model)}) from {args.workdir} to {args.out}")
  return 0


def _parser():
  fmt = argparse.RawDescriptionHelpFormatter
  parser = argparse.ArgumentParser(
      prog="python -m tinymim_jax.convert", formatter_class=fmt,
      description="Convert between PyTorch (timm / MAE / TinyMIM) checkpoints and tinymim-jax models.",
      epilog="Example:\n  python -m tinymim_jax.convert import mae_pretrain_vit_large.pth "
             "--model vit_large_patch16 --out mae_vit_large.safetensors")
  sub = parser.add_subparsers(dest="command", required=True)

  imp = sub.add_parser(
      "import", formatter_class=fmt,
      help="validate a .pth/.safetensors against our model and write timm-named .safetensors",
      description="Loads SRC into a tinymim-jax model (every key checked; pos_embed resampled to "
                  "--img-size), then writes the validated weights with timm names.",
      epilog="Examples:\n"
             "  python -m tinymim_jax.convert import mae_pretrain_vit_large.pth --model vit_large_patch16 "
             "--out teacher_l.safetensors\n"
             "  python -m tinymim_jax.convert import mae_finetuned_vit_base.pth --model vit_base_patch16 "
             "--img-size 384 --pos-embed learn --out vit_b_384.safetensors")
  imp.add_argument("src", help="checkpoint (.pth / .pt / .bin / .safetensors)")
  imp.add_argument("--model", required=True, help="vit_tiny_patch16 ... vit_huge_patch14, or mae_<variant>")
  imp.add_argument("--img-size", type=int, default=None, help="target resolution (default: the variant's)")
  imp.add_argument("--pos-embed", choices=("sincos", "learn"), default=None)
  imp.add_argument("--num-classes", type=int, default=None, help="default: the file's head size, or 0")
  imp.add_argument("--pooling", choices=("cls", "avg"), default=None,
                   help="default: 'avg' if the file has fc_norm or --num-classes is given, else 'cls'")
  imp.add_argument("--skip", action="append", default=[], metavar="REGEX", help="file keys to ignore")
  imp.add_argument("--allow-missing", action="append", default=[], metavar="REGEX",
                   help="model keys the file may lack (kept at init)")
  imp.add_argument("--out", required=True, help="output .safetensors (or .pth)")
  imp.set_defaults(fn=_cmd_import)

  exp = sub.add_parser(
      "export", formatter_class=fmt, help="write a tinymim-jax run's student (or convert a file) with timm names",
      description="Restores the student of a tinymim-jax run (tinymim_jax.builders.restore_model) and "
                  "writes it with timm names; or converts a weight file between .pth and .safetensors.",
      epilog="Examples:\n"
             "  python -m tinymim_jax.convert export --workdir workdirs/tinymim_vit_small --out "
             "tinymim_s.pth\n"
             "  python -m tinymim_jax.convert export --weights teacher_l.safetensors --out teacher_l.pth")
  exp.add_argument("--workdir", default=None, help="tinymim-jax run directory")
  exp.add_argument("--weights", "--safetensors", dest="weights", default=None,
                   help="a weight file to convert instead (.pth or .safetensors)")
  exp.add_argument("--out", required=True, help="output .safetensors or .pth")
  exp.set_defaults(fn=_cmd_export)

  ins = sub.add_parser(
      "inspect", formatter_class=fmt, help="list keys and shapes and guess the checkpoint layout",
      description="Lists a checkpoint's keys and shapes, and which layout (MAE pretrain / fine-tuned / "
                  "TinyMIM / timm) and variant it looks like.",
      epilog="Example:\n  python -m tinymim_jax.convert inspect mae_pretrain_vit_base.pth")
  ins.add_argument("file")
  ins.set_defaults(fn=_cmd_inspect)
  return parser


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    return args.fn(args)
  except (ConvertError, FileNotFoundError) as e:  # e.g. restore_model on a directory without a checkpoint
    print(f"error: {e}", file=sys.stderr)
    return 1
