"""The converter's command line: python -m tinymim_jax.convert {import,export,inspect} --help."""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Mapping

import numpy as np

from tinymim_jax import builders, checkpoint, errors
from tinymim_jax import convert
from tinymim_jax.convert import (FLOAT_DTYPES, ConvertError, describe_model, detect_layout, dtype_summary,
                                 read_checkpoint, save_pytorch_weights, square_grid, state_dict_order)
from tinymim_jax.models import MAE_PREFIX, VARIANTS, create_model


def _variant(weights: Mapping[str, np.ndarray]) -> str | None:
  """The variant of the file's width, depth and patch (None: not a ViT, or a custom size)."""
  if "cls_token" not in weights or "patch_embed.proj.weight" not in weights:
    return None
  shape = (weights["cls_token"].shape[-1], len({k.split(".")[1] for k in weights if k.startswith("blocks.")}),
           weights["patch_embed.proj.weight"].shape[-1])
  return next((n for n, v in VARIANTS.items() if (v["embed_dim"], v["depth"], v["patch_size"]) == shape), None)


def _guess_variant(weights: Mapping[str, np.ndarray]) -> str:
  if "cls_token" not in weights or "patch_embed.proj.weight" not in weights:
    return "not a ViT checkpoint (no cls_token / patch_embed.proj.weight)"
  d = weights["cls_token"].shape[-1]
  p = weights["patch_embed.proj.weight"].shape[-1]
  depth = len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
  text = f"{_variant(weights) or 'custom'} (D {d}, depth {depth}, patch {p}"
  if "pos_embed" in weights:
    g = square_grid(weights["pos_embed"].shape[1] - 1)
    text += f", grid {g}x{g} = img {g * p}" if g else ""
  if "head.weight" in weights:
    text += f", {weights['head.weight'].shape[0]} classes"
  return text + ")"


def _read(args, source):
  """The file (or hub folder) as a Checkpoint, in timm names."""
  return read_checkpoint(source, ema=args.ema, prefix=args.prefix, hint_context="cli")


def _heads_line(ckpt) -> str:
  if ckpt.sidecar is None:
    where = f"no {ckpt.sidecar_label} beside them" if ckpt.sidecar_label else "no sidecar"
    name = _variant(ckpt.weights)
    assumed = f"{name}'s {VARIANTS[name]['num_heads']}" if name else "its num_heads"
    return f"heads:  not stored in the weights ({where}): a load assumes the model's count, e.g. {assumed}"
  enc, dec = convert.sidecar_configs(ckpt.sidecar)
  text = convert.heads_text([enc.block_heads(i) for i in range(1, enc.depth + 1)])
  text += f", decoder {dec.num_heads}" if dec is not None else ""
  if "num_heads" in convert.assumed_fields(ckpt.sidecar):
    return (f"heads:  not stored in the weights; {ckpt.sidecar_label} holds {text}, a count its writer assumed "
            f"(not a record): give the true count to a load (--num-heads, config teacher.num_heads)")
  return f"heads:  not stored in the weights; {ckpt.sidecar_label} records {text} ({ckpt.sidecar.get('architecture')})"


def _cmd_inspect(args):
  ckpt = _read(args, args.file)
  weights, extras, label = ckpt.weights, ckpt.extras, ckpt.label
  print(f"{label}: {len(weights)} tensors, {sum(v.size for v in weights.values()):,} values "
        f"({dtype_summary(weights)})")
  print(f"layout: {detect_layout(weights, extras, ckpt.layout)}")
  print(f"model:  {_guess_variant(weights)}")
  for line in ckpt.describe("cli") + [_heads_line(ckpt)]:
    print(line)
  for k, reason in extras.items():
    print(f"entry:  {k} ({reason})")
  for k in sorted(weights, key=state_dict_order):
    print(f"  {k:48s} {str(tuple(weights[k].shape)):20s} {weights[k].dtype}")
  return 0


def _cmd_import(args):
  from flax import nnx

  ckpt = _read(args, args.src)
  weights = ckpt.weights
  # The architecture saved beside the file (heads, pos_embed, ...) is the base; flags override it.
  name, overrides, decoder = (convert.sidecar_model(ckpt.sidecar) if ckpt.sidecar is not None
                              else (None, {}, None))
  if args.model is not None:
    if name is not None and name.startswith(MAE_PREFIX) != args.model.startswith(MAE_PREFIX):
      decoder = None
    name = args.model
  if name is None:
    raise ConvertError(f"{ckpt.label} has no {ckpt.sidecar_label} beside it: name the model with --model")
  for field in ("img_size", "pos_embed", "num_classes", "pooling", "num_heads"):
    if getattr(args, field) is not None:
      overrides[field] = getattr(args, field)
  if args.head_overrides:
    overrides["head_overrides"] = _block_heads(args.head_overrides)
  # A state dict does not store head counts: unless the user or a sidecar's record gave them, they are the
  # variant's, and the written sidecar says so (readers then never let them override a user's count).
  assumed = [f for f in convert.assumed_fields(ckpt.sidecar) if f not in ("num_heads", "head_overrides")]
  if ckpt.sidecar is None or "num_heads" in convert.assumed_fields(ckpt.sidecar):
    if args.num_heads is None:
      assumed.append("num_heads")
    if not args.head_overrides:
      assumed.append("head_overrides")
  if not name.startswith(MAE_PREFIX):
    # Defaults follow the file: a fine-tuned file (fc_norm + head) gives the 'avg' layout and its classes.
    if "num_classes" not in overrides:
      overrides["num_classes"] = int(weights["head.weight"].shape[0]) if "head.weight" in weights else 0
    if "pooling" not in overrides:
      overrides["pooling"] = "avg" if "fc_norm.weight" in weights or args.num_classes else "cls"
  else:
    for field in ("num_classes", "pooling"):
      overrides.pop(field, None)
  make = lambda: create_model(name, decoder=decoder, **overrides)
  # Everything comes from the file unless keys may be missing: skip the random init (ViT-H: 630M values).
  model = make() if args.allow_missing else nnx.eval_shape(make)
  report = convert.load_pytorch_weights(model, ckpt, skip=args.skip, allow_missing=args.allow_missing,
                                       hint_context="cli", resample=args.resample)
  print(report)
  exported = convert.export_pytorch_weights(model)  # in the model's parameter dtype
  if args.dtype is not None:
    written, how = convert.cast_weights(exported, args.dtype), "--dtype"
  else:
    written, how = _keep_file_dtypes(exported, weights), "as in the file"
    rounded = [k for k in report.loaded if k in exported and weights[k].dtype.itemsize > exported[k].dtype.itemsize]
    if rounded:
      print(f"  note: the model holds {exported[rounded[0]].dtype.name}: {len(rounded)} {weights[rounded[0]].dtype} "
            f"tensors were rounded to it before being written back as {weights[rounded[0]].dtype}")
  side = convert.architecture(model)
  if assumed:
    side[convert.ASSUMED_KEY] = assumed
    print(f"  note: the file does not store head counts and none were given: {args.out}'s sidecar marks the "
          f"variant's as assumed (give them with --num-heads / --head-overrides)")
  save_pytorch_weights(written, args.out, sidecar=side)
  print(f"wrote {len(written)} tensors ({dtype_summary(written)}, {how}; {describe_model(model)}) to {args.out} "
        f"(+ {os.path.basename(convert.sidecar_path(args.out))})")
  return 0


def _block_heads(items) -> dict[int, int]:
  """['12:12', '4:6'] -> {12: 12, 4: 6}; raises ConvertError naming a malformed item."""
  out = {}
  for item in items:
    block, _, heads = item.partition(":")
    if not (block.isdigit() and heads.isdigit() and int(block) >= 1 and int(heads) >= 1):
      raise ConvertError(f"--head-overrides {item!r}: expected BLOCK:HEADS with a 1-based block, e.g. 12:12")
    out[int(block)] = int(heads)
  return out


def _keep_file_dtypes(exported, weights):
  """Each tensor back in the file's dtype; one the file lacks (kept at init) in the file's most common float."""
  floats = collections.Counter(v.dtype.name for v in weights.values() if v.dtype.name in FLOAT_DTYPES)
  default = floats.most_common(1)[0][0] if floats else None
  out = {}
  for k, v in exported.items():
    dtype = weights[k].dtype if k in weights and weights[k].dtype.name in FLOAT_DTYPES else default
    out[k] = convert.cast_weights({k: v}, dtype)[k] if dtype is not None and v.dtype.name in FLOAT_DTYPES else v
  return out


def _model_card(hub_dir: str, cfg: dict, source: str, run_config: dict | None, done: dict | None) -> str:
  """README.md of a hub folder: the architecture, how the model was trained (from the run's config.json) and the
  evals its done.json holds."""
  a = cfg["model_args"]
  lines = ["---", "library_name: timm", "tags: [image-feature-extraction, timm, tinymim-jax]", "---", "",
           f"# {os.path.basename(os.path.normpath(hub_dir))}", "",
           f"A ViT exported by tinymim-jax from `{source}`.", "", "## Architecture", "",
           f"- timm `{cfg['architecture']}`: patch {a['patch_size']}, width {a['embed_dim']}, depth {a['depth']}, "
           f"{a['num_heads']} heads, {a['img_size']} px, global_pool `{a['global_pool']}`, "
           f"{a['num_classes']} classes", ""]
  if run_config:
    c = run_config
    lines += ["## Training", "", f"- objective: `{c.get('objective')}`"]
    if c.get("objective") == "distill":
      d = c.get("distill", {})
      for name in c.get("teachers", ["teacher"]):
        t = c.get(name, {})
        lines.append(f"- teacher `{name}`: `{t.get('name')}` from `{t.get('source')}`, block "
                     f"{t.get('block') or d.get('teacher_block')}, target `{d.get('target')}` (student block "
                     f"{d.get('student_block')})")
    if c.get("init"):
      lines.append(f"- init: `{c['init']}`")
    data = c.get("data", {})
    steps = (done or {}).get("step", c.get("total_steps"))
    lines += [f"- data: `{data.get('name')}` at {data.get('image_size')} px; batch {c.get('batch_size')}, "
              f"{steps} steps", ""]
  evals = {k: v for k, v in (done or {}).items() if k.startswith("eval/")}
  if evals:
    lines += ["## Evaluation (done.json)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in evals.items()] + [""]
  lines += ["## Use", "", "```python", "import timm",
            f"model = timm.create_model('local-dir:{hub_dir}', pretrained=True)", "```", ""]
  return "\n".join(lines)


def _cmd_export_hub(args):
  from tinymim_jax import workdir as workdir_lib
  if args.weights is not None:
    ckpt = _read(args, args.weights)
    if ckpt.sidecar is None:
      raise ConvertError(f"{ckpt.label} has no {ckpt.sidecar_label} beside it: a hub folder needs the architecture; "
                         f"write one with `import {args.weights} --model NAME --out FILE.safetensors`, then export that")
    weights, side, source, run_config, done = ckpt.weights, ckpt.sidecar, ckpt.label, None, None
  else:
    model = builders.restore_model(args.workdir)
    weights, side, source = convert.export_pytorch_weights(model), convert.architecture(model), args.workdir
    run_config, done = workdir_lib.saved_config(args.workdir), workdir_lib.read_done(args.workdir)
  if args.dtype is not None:
    weights = convert.cast_weights(weights, args.dtype)
  cfg, _ = convert.timm_hub_config(side)
  notes = convert.write_hub_folder(args.hub, weights, side, _model_card(args.hub, cfg, source, run_config, done))
  print(f"wrote a timm hub folder {args.hub}: model.safetensors ({len(weights)} tensors, {dtype_summary(weights)}), "
        f"config.json ({cfg['architecture']}), README.md; load it with "
        f"timm.create_model('local-dir:{args.hub}', pretrained=True)")
  for note in notes:
    print(f"  note: {note}")
  return 0


def _cmd_export(args):
  if (args.workdir is None) == (args.weights is None):
    raise ConvertError("export needs exactly one of --workdir DIR or --weights FILE")
  if (args.out is None) == (args.hub is None):
    raise ConvertError("export needs exactly one of --out FILE or --hub DIR")
  if args.hub is not None:
    return _cmd_export_hub(args)
  how = "--dtype" if args.dtype is not None else "as in the source"
  if args.weights is not None:
    ckpt = _read(args, args.weights)
    written = save_pytorch_weights(ckpt.weights, args.out, dtype=args.dtype, sidecar=ckpt.sidecar or False)
    dropped = f" (dropped entries: {', '.join(ckpt.extras)})" if ckpt.extras else ""
    side = f" (+ {os.path.basename(convert.sidecar_path(args.out))})" if ckpt.sidecar else ""
    print(f"wrote {len(written)} tensors ({dtype_summary(written)}, {how}) from {ckpt.label} to {args.out}{side}"
          f"{dropped}")
    for line in ckpt.describe("cli"):
      print(f"  {line}")
    return 0
  model = builders.restore_model(args.workdir)
  written = save_pytorch_weights(convert.export_pytorch_weights(model, args.dtype, layout=args.layout), args.out,
                                 sidecar=convert.architecture(model))
  print(f"wrote {len(written)} tensors ({dtype_summary(written)}, {how}; {describe_model(model)}) from "
        f"{args.workdir} to {args.out} (+ {os.path.basename(convert.sidecar_path(args.out))})")
  return 0


def _add_reading(p, *, dtype: str | None):
  """The flags that choose what is read from a file (and, for writers, the output dtype)."""
  p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                 help="read a training checkpoint's EMA copy (timm train.py 'state_dict_ema', DeiT 'model_ema') "
                      "where it has one, as timm does; --no-ema reads the raw weights (default: --ema)")
  p.add_argument("--prefix", default=None, metavar="NAME",
                 help="the wrapper prefix of the model to read, e.g. 'student' in a file holding a student and a "
                      "teacher (default: found from the keys; '' for the unprefixed one)")
  if dtype is not None:
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default=None, help=dtype)


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
                  "--img-size), then writes the validated weights with timm names and the architecture beside "
                  "them (OUT's name + .config.json). A SRC with such a file beside it is read with its heads and "
                  "layout (flags override them; --model may then be left out).",
      epilog="Examples:\n"
             "  python -m tinymim_jax.convert import mae_pretrain_vit_large.pth --model vit_large_patch16 "
             "--out teacher_l.safetensors\n"
             "  python -m tinymim_jax.convert import mae_finetuned_vit_base.pth --model vit_base_patch16 "
             "--img-size 384 --pos-embed learn --out vit_b_384.safetensors\n"
             "  python -m tinymim_jax.convert import deit_ema.pth --model vit_small_patch16 --no-ema --dtype "
             "bfloat16 --out vit_s_raw_bf16.safetensors")
  imp.add_argument("src", help="checkpoint (.pth / .pt / .bin / .safetensors), or a hub folder (config.json + "
                               "model.safetensors: transformers' or timm's)")
  imp.add_argument("--model", default=None,
                   help="vit_tiny_patch16 ... vit_huge_patch14, or mae_<variant> (default: SRC's .config.json)")
  imp.add_argument("--img-size", type=int, default=None, help="target resolution (default: the variant's)")
  imp.add_argument("--num-heads", type=int, default=None,
                   help="heads per block (a state dict does not store them; default: SRC's .config.json, else "
                        "the variant's, marked as assumed in OUT's .config.json)")
  imp.add_argument("--head-overrides", action="append", default=[], metavar="BLOCK:HEADS",
                   help="another head count for one 1-based block, e.g. a TinyMIM student's relation block 12:12")
  imp.add_argument("--pos-embed", choices=("sincos", "learn"), default=None)
  imp.add_argument("--num-classes", type=int, default=None, help="default: the file's head size, or 0")
  imp.add_argument("--pooling", choices=("cls", "avg"), default=None,
                   help="default: 'avg' if the file has fc_norm or --num-classes is given, else 'cls'")
  imp.add_argument("--resample", choices=convert.RESAMPLE_METHODS, default=None,
                   help="how a positional table of another grid is resampled: MAE's bicubic, DINOv2's (offset 0.1) "
                        "or timm's antialiased bicubic (default: the file's family's own; DINOv2's for DINOv2's hub "
                        "files, transformers' for its Dinov2 snapshots)")
  imp.add_argument("--skip", action="append", default=[], metavar="REGEX", help="file keys to ignore")
  imp.add_argument("--allow-missing", action="append", default=[], metavar="REGEX",
                   help="model keys the file may lack (kept at init)")
  _add_reading(imp, dtype="output dtype of the floating tensors (default: each tensor's dtype in SRC)")
  imp.add_argument("--out", required=True, help="output .safetensors (or .pth)")
  imp.set_defaults(fn=_cmd_import)

  exp = sub.add_parser(
      "export", formatter_class=fmt, help="write a tinymim-jax run's student (or convert a file) with timm names",
      description="Restores the student of a tinymim-jax run (tinymim_jax.builders.restore_model) and "
                  "writes it with timm names and its architecture beside it (OUT's name + .config.json); or "
                  "converts a weight file between .pth and .safetensors (its .config.json comes along).",
      epilog="Examples:\n"
             "  python -m tinymim_jax.convert export --workdir workdirs/tinymim_vit_small --out "
             "tinymim_s.pth\n"
             "  python -m tinymim_jax.convert export --weights teacher_l.safetensors --out teacher_l.pth\n"
             "  python -m tinymim_jax.convert export --weights train_ckpt.pth.tar --no-ema --dtype float16 "
             "--out raw_fp16.safetensors")
  exp.add_argument("--workdir", default=None, help="tinymim-jax run directory")
  exp.add_argument("--weights", "--safetensors", dest="weights", default=None,
                   help="a weight file to convert instead (.pth or .safetensors)")
  _add_reading(exp, dtype="output dtype of the floating tensors (default: as they are: the file's, or the run's "
                          "float32)")
  exp.add_argument("--out", default=None, help="output .safetensors or .pth")
  exp.add_argument("--layout", choices=("timm", "dinov3"), default="timm",
                   help="names of a DINOv3 run's export: timm's Eva (default) or the original DINOv3 hub file's")
  exp.add_argument("--hub", default=None, metavar="DIR",
                   help="write a timm hub folder instead (config.json, model.safetensors, README.md model card), "
                        "which timm.create_model('local-dir:DIR', pretrained=True) loads")
  exp.set_defaults(fn=_cmd_export)

  ins = sub.add_parser(
      "inspect", formatter_class=fmt, help="list keys and shapes and guess the checkpoint layout",
      description="Lists a checkpoint's keys, shapes and dtypes, and which layout (MAE pretrain / fine-tuned / "
                  "TinyMIM / timm) and variant it looks like, which copy (EMA or raw) and prefix is read, and the "
                  "heads its .config.json records (a state dict does not store them).",
      epilog="Example:\n  python -m tinymim_jax.convert inspect mae_pretrain_vit_base.pth")
  ins.add_argument("file")
  _add_reading(ins, dtype=None)
  ins.set_defaults(fn=_cmd_inspect)
  return parser


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    return args.fn(args)
  except Exception as e:  # pylint: disable=broad-except  (a user's mistake is one line; anything else re-raised)
    # ConvertError's subclasses name the file and the fault; so do the checks of our own code (errors.py).
    if not errors.is_user_error(e, also=(ConvertError, FileNotFoundError, checkpoint.CheckpointError)):
      raise
    print(errors.one_line(e), file=sys.stderr)
    return 1
