"""Loading a read checkpoint into a model, all or nothing, and its report."""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Mapping, Sequence

import numpy as np

from tinymim_jax.convert.errors import HintContext, WeightMismatchError, render_fix, short_list
from tinymim_jax.convert.files import Checkpoint, read_checkpoint
from tinymim_jax.convert.dtypes import dtype_summary
from tinymim_jax.convert.sidecar import architecture, assumed_fields, heads_text, model_configs, sidecar_configs
from tinymim_jax.convert.names import (DECODER_RE, REL_POS_INDEX_RE, detect_layout, file_alias, from_torch_layout,
                                       torch_names, torch_shape)
from tinymim_jax.convert.resample import RESAMPLE_METHODS, resample_grids, resample_pos_embed


@dataclasses.dataclass
class LoadReport:
  """What load_pytorch_weights did. All names are PyTorch names."""
  source: str
  layout: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> reason
  missing_kept_init: list[str] = dataclasses.field(default_factory=list)
  resampled: dict[str, tuple[tuple[int, int], tuple[int, int]]] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)
  unused_kept_init: list[str] = dataclasses.field(default_factory=list)  # model params the job never runs
  dtypes: str = ""          # the file's dtype(s) -> the model's, e.g. 'bfloat16 -> float32'
  info: list[str] = dataclasses.field(default_factory=list)  # which copy / prefix was read, the heads assumed
  resample: str = "mae"     # how a positional table is resampled (RESAMPLE_METHODS), and why
  resample_why: str = ""

  def __str__(self):
    dtypes = f" ({self.dtypes})" if self.dtypes else ""
    lines = [f"loaded {len(self.loaded)} tensors{dtypes} from {self.source} [{self.layout}]"]
    lines += [f"  {line}" for line in self.info]
    for name, (old, new) in self.resampled.items():
      lines.append(f"  resampled {name}: grid {old[0]}x{old[1]} -> {new[0]}x{new[1]} ({_METHOD_TEXT[self.resample]}, "
                   f"prefix kept; {self.resample_why})")
    by_reason = collections.defaultdict(list)
    for key, reason in self.skipped.items():
      by_reason[reason].append(key)
    for reason, keys in by_reason.items():
      lines.append(f"  skipped {len(keys)} ({reason}): {short_list(keys)}")
    if self.missing_kept_init:
      lines.append(f"  not in file, kept at init ({len(self.missing_kept_init)}): "
                   f"{short_list(self.missing_kept_init)}")
    if self.unused_kept_init:
      lines.append(f"  not run by this job, kept at init ({len(self.unused_kept_init)}): "
                   f"{short_list(self.unused_kept_init)}")
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)


_METHOD_TEXT = {"mae": "MAE's bicubic interpolation", "dinov2": "DINOv2's bicubic interpolation, offset 0.1",
                "timm": "timm's antialiased bicubic"}


# A family's own resampling, where it is not MAE's: what the code that defines the file's layout computes at
# another resolution. transformers' Dinov2 and Dinov2WithRegisters resize to the new size (modeling_dinov2.py,
# modeling_dinov2_with_registers.py: interpolate_pos_encoding), not with DINOv2's offset scale factor.
_FAMILY_RESAMPLE = {
    "dinov2": ("dinov2", "the DINOv2 family's own"),
    "transformers_dinov2": ("mae", "transformers Dinov2's own (interpolate_pos_encoding)"),
    "transformers_dinov2_with_registers": ("timm", "transformers Dinov2WithRegisters' own "
                                                   "(interpolate_pos_encoding, antialias=True)"),
}


def resample_method(ckpt: Checkpoint, resample: str | None) -> tuple[str, str]:
  """-> (the positional-table resampling to use, why): the caller's, else the file's family's own (DINOv2's for
  DINOv2's own files, transformers' for its Dinov2 layouts, MAE's otherwise: the method of the code that defines
  the layout's forward). Raises ConvertError for an unknown one."""
  if resample is not None:
    if resample not in RESAMPLE_METHODS:
      from tinymim_jax.convert.errors import ConvertError
      raise ConvertError(f"unknown resample={resample!r}; use one of {', '.join(RESAMPLE_METHODS)}")
    return resample, "as asked"
  return _FAMILY_RESAMPLE.get(ckpt.family, ("mae", "the default: MAE's"))


def _heads_line(model, ckpt: Checkpoint) -> str:
  enc, dec = model_configs(model)
  mine = [enc.block_heads(i) for i in range(1, enc.depth + 1)]
  text = heads_text(mine) + (f", decoder {dec.num_heads}" if dec is not None else "")
  if ckpt.sidecar is None:
    return f"heads: not stored in the file; assumed the model's {text}"
  if "num_heads" in assumed_fields(ckpt.sidecar):
    return (f"heads: not stored in the file, and {ckpt.sidecar_label} only repeats a count its writer assumed; "
            f"assumed the model's {text}")
  s_enc, s_dec = sidecar_configs(ckpt.sidecar)
  theirs = [s_enc.block_heads(i) for i in range(1, min(enc.depth, s_enc.depth) + 1)]
  same = theirs == mine[:len(theirs)] and (dec is None or s_dec is None or s_dec.num_heads == dec.num_heads)
  if same:
    return f"heads: {text}, as {ckpt.sidecar_label} records (a state dict alone does not store them)"
  s_text = heads_text(theirs) + (f", decoder {s_dec.num_heads}" if s_dec is not None and dec is not None else "")
  return (f"heads: the model's {text}, but {ckpt.sidecar_label} records {s_text}: the same weights split into other "
          f"heads (docs/method.md 2.3), so the outputs differ from the exporting model's")


def describe_model(model) -> str:
  cfg = model.config[0] if isinstance(model.config, tuple) else model.config
  what = type(model).__name__
  return (f"{what}(img {cfg.img_size}, patch {cfg.patch_size}, D {cfg.embed_dim}, depth {cfg.depth}, "
          f"pooling {cfg.pooling!r}, num_classes {cfg.num_classes})")


def _first_match(patterns, name):
  return next((p for p in patterns if re.search(p, name)), None)


def load_pytorch_weights(model, source, *, skip: Sequence[str] = (), allow_missing: Sequence[str] = (),
                         strict: bool = True, ema: bool = True, prefix: str | None = None, depth: int | None = None,
                         hint_context: HintContext = "api", resample: str | None = None) -> LoadReport:
  """Loads a PyTorch checkpoint into a ViT or MAE model, all or nothing.

  Args:
    model: a tinymim_jax ViT or MAE (nnx.Module); updated in place only if the whole load succeeds. It
      may be abstract (nnx.eval_shape(lambda: create_model(...))): that skips the random init of a big
      teacher, and then every parameter must come from the file.
    source: a .pth / .pt / .bin / .safetensors path, an in-memory state dict (name -> tensor / array),
      optionally a training checkpoint {'model': ..., 'optimizer': ..., 'args': ...}, or a Checkpoint.
    skip: regexes (re.search on PyTorch names) of file keys to ignore; reported as skipped.
    allow_missing: regexes of model parameters the file may lack; they keep their init and are reported.
      E.g. ('^fc_norm\\.', '^head\\.') to start fine-tuning from a pretrain file; then the file's final
      `norm` has no place in the 'avg' layout and is reported as skipped.
    strict: False turns missing keys into kept-init ones and unexpected keys into skipped ones (both still
      reported). Shape mismatches always raise.
    ema: read a training checkpoint's EMA copy where it has one (timm's default); False: the raw weights.
    prefix: the wrapper prefix of the model to read (read_checkpoint); None finds it.
    depth: the caller runs only the embeddings and blocks 1..depth (a distillation teacher: ViT(..., depth=k)).
      The later blocks, the final norm / fc_norm / head and an MAE decoder are then unused: not taken from the
      file (reported as skipped), not required, and kept at init in the model (reported). The rest is strict.
    hint_context: how hints in errors and the report spell options: 'api', 'cli', or {option: config field}.
    resample: how a positional table of another grid is resampled: 'mae', 'dinov2' or 'timm' (RESAMPLE_METHODS,
      convert/resample.py); None: the file's family's own (DINOv2's for DINOv2's hub files, transformers' for
      its Dinov2 / Dinov2WithRegisters layouts, else MAE's). Reported.

  Files in another library's layout (transformers ViT / ViTMAE / Dinov2, DINOv2's hub files, OpenAI / OpenCLIP
  visual towers; convert/layouts.py) and hub folders (convert/hub.py) are read in timm names; the report names
  the layout.

  Values are cast to each parameter's dtype. Returns a LoadReport (which copy / prefix was read, the heads the
  model assumes or the sidecar records). Raises WeightMismatchError listing every problem, and the errors of
  read_checkpoint.
  """
  ckpt = read_checkpoint(source, ema=ema, prefix=prefix, hint_context=hint_context)
  return _load(model, ckpt, skip=skip, allow_missing=allow_missing, strict=strict, depth=depth,
               hint_context=hint_context, resample=resample)


def _runs(name: str, depth: int | None) -> bool:
  """Whether a job that runs a ViT to block `depth` (1-based) uses the PyTorch-named parameter `name`."""
  if depth is None:
    return True
  m = re.match(r"blocks\.(\d+)\.", name)
  if m:
    return int(m[1]) < depth
  # After the blocks: the final norm, the fine-tuned tail, an MAE decoder. Anything else (the embeddings, or a
  # part this ViT does not know, e.g. DeiT's dist_token) is taken as run: loaded, or unexpected.
  return not (name.split(".")[0] in ("conv1x1", "norm", "fc_norm", "head", "head_dist") or DECODER_RE.match(name))


def _same_rel_pos_index(arr, grid: int, num_prefix_tokens: int) -> bool:
  from tinymim_jax.models.vit import relative_position_index  # pylint: disable=g-import-not-at-top
  ours = relative_position_index(grid, num_prefix_tokens)
  return tuple(arr.shape) == ours.shape and np.array_equal(np.asarray(arr), ours)


def _load(model, ckpt: Checkpoint, *, skip=(), allow_missing=(), strict=True, depth=None,
          hint_context: HintContext = "api", dry_run: bool = False, resample: str | None = None) -> LoadReport:
  """load_pytorch_weights on a read checkpoint; `dry_run`: only whether it would load (raises as it would, without
  hints), nothing written; `resample`: the position-table resampling method (None: the file's family's own)."""
  weights, label = ckpt.weights, ckpt.label
  report = LoadReport(source=label, layout=detect_layout(weights, ckpt.extras, ckpt.layout))
  report.resample, report.resample_why = resample_method(ckpt, resample)
  renamed = {name: file_alias(name) for name in weights if file_alias(name) != name}
  if renamed:
    weights = {renamed.get(name, name): arr for name, arr in weights.items()}
    pairs = [f"{a} -> {b}" for a, b in sorted(renamed.items())]
    report.notes.append(f"{len(renamed)} key(s) read under timm's names: {short_list(pairs, 2)}")
  report.skipped.update(ckpt.extras)
  report.info += ckpt.describe(hint_context)
  target = torch_names(model)
  is_vit_only = not any(DECODER_RE.match(k) for k in target)
  # The prefix tokens' rows of pos_embed (CLS, registers; none with no_embed_class) are kept as they are when the
  # grid is resampled (timm's resample_abs_pos_embed(num_prefix_tokens=0 if no_embed_class else ...)).
  enc = model_configs(model)[0]
  prefix = 0 if enc.no_embed_class else enc.num_prefix_tokens
  unused = f"not run: this job runs blocks 1..{depth} only"

  missing, unexpected, mismatched = [], [], []
  missing_names, mismatched_names = [], []
  for name, (path, value) in target.items():
    if not _runs(name, depth):
      report.unused_kept_init.append(name)
      continue
    if name in weights:
      continue
    pattern = _first_match(allow_missing, name)
    if pattern is not None or not strict:
      report.missing_kept_init.append(name)
    else:
      missing.append(f"{name} {torch_shape(path, value.shape)}")
      missing_names.append(name)
  # The pretrained final norm has no counterpart in the 'avg' layout, whose fc_norm starts fresh (MAE's
  # fine-tuning start); only accepted when the caller allowed fc_norm to be missing.
  fresh_fc_norm = any(k.startswith("fc_norm.") for k in report.missing_kept_init)

  new_values, rounded = {}, []
  for name, arr in weights.items():
    skip_pattern = _first_match(skip, name)
    if not _runs(name, depth):
      report.skipped[name] = unused
      continue
    if name not in target:
      if skip_pattern is not None:
        report.skipped[name] = f"matches skip pattern {skip_pattern!r}"
      elif is_vit_only and DECODER_RE.match(name):
        report.skipped[name] = "MAE decoder (the target is an encoder-only ViT)"
      elif name.endswith("attn.qkv.bias") and not np.any(arr):
        report.skipped[name] = ("all zero, and the model has no qkv bias (DINOv3's releases; timm's variants "
                                "without '_qkvb')")
      elif fresh_fc_norm and name.startswith("norm."):
        report.skipped[name] = "pretrain final norm (the 'avg' layout starts a fresh fc_norm)"
      elif REL_POS_INDEX_RE.match(name) and name.replace("_index", "_bias_table") in target:
        grid = enc.img_size // enc.patch_size
        if _same_rel_pos_index(arr, grid, enc.num_prefix_tokens):
          report.skipped[name] = "fixed index of the relative position bias (the model computes the same)"
        else:
          mismatched.append(f"{name}: differs from BEiT's index for the model's {grid}^2 grid + "
                            f"{'CLS + dist token' if enc.num_prefix_tokens == 2 else 'CLS'}")
          mismatched_names.append(name)
      elif not strict:
        report.skipped[name] = "not in the model (strict=False)"
      else:
        unexpected.append(f"{name} {tuple(arr.shape)}")
      continue
    path, value = target[name]
    want = torch_shape(path, value.shape)
    if skip_pattern is not None:  # a key the model has: skipping it makes it missing
      report.skipped[name] = f"matches skip pattern {skip_pattern!r}"
      if _first_match(allow_missing, name) is not None or not strict:
        report.missing_kept_init.append(name)
      else:
        missing.append(f"{name} {want} (skipped by {skip_pattern!r} but not allowed missing)")
        missing_names.append(name)
      continue
    if (name.endswith("pos_embed") and enc.dist_token and prefix and "dist_token" not in weights
        and _first_match(allow_missing, "dist_token") is not None and not _is_abstract(value)):
      # A file without a distillation token (a pretrained encoder under a distilled student): its table lacks the
      # dist row, which starts from the model's init with the token itself (DeiT trains both from scratch).
      own = np.asarray(value)
      arr = np.asarray(arr)
      grids = resample_grids(arr.shape, (want[0], want[1] - 1, want[2]), prefix - 1)
      if grids is not None and grids[0] != grids[1]:
        arr = resample_pos_embed(arr, grids[1][0], prefix - 1, method=report.resample)
        report.resampled[name] = grids
      if arr.shape[1] == want[1] - 1:
        arr = np.concatenate([arr[:, :1], own[:, 1:2].astype(arr.dtype), arr[:, 1:]], axis=1)
        report.missing_kept_init.append(f"{name}[:, 1] (the distillation token's row)")
    if name.endswith("pos_embed") and tuple(arr.shape) != want:
      grids = resample_grids(arr.shape, want, prefix)
      if grids is not None:
        arr = resample_pos_embed(arr, grids[1][0], prefix, method=report.resample)
        report.resampled[name] = grids
    if tuple(arr.shape) != want:
      mismatched.append(f"{name}: file {tuple(arr.shape)}, model expects {want}")
      mismatched_names.append(name)
      continue
    new_values[path] = np.asarray(from_torch_layout(path, arr), dtype=value.dtype)
    report.loaded.append(name)
    if arr.dtype.kind == "f" and np.dtype(value.dtype).itemsize < arr.dtype.itemsize:
      rounded.append(f"{name} ({arr.dtype} -> {np.dtype(value.dtype)})")
  if rounded:  # as intended (a float64 file into a float32 model), but said
    report.notes.append(f"{len(rounded)} tensor(s) rounded to the model's param_dtype: {short_list(rounded, 3)}")

  if _is_abstract_model(target) and (report.missing_kept_init or report.unused_kept_init):
    # An nnx.eval_shape model has no init to keep: every parameter has to come from the file.
    missing += [f"{name} {torch_shape(target[name][0], target[name][1].shape)} (the model is abstract: "
                f"no init to keep)"
                for name in report.missing_kept_init + report.unused_kept_init]
  if missing or unexpected or mismatched:
    lines = [f"cannot load {label} [{report.layout}] into {describe_model(model)}: "
             f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped key(s); "
             f"nothing was written to the model."]
    lines += [f"  {line}" for line in report.info]
    for title, items in (("missing from the file", missing), ("unexpected in the file", unexpected),
                         ("shape mismatch", mismatched)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines += [f"    {item}" for item in items]
    if not dry_run:
      parts = {n.split(".")[0] for n in target}
      follow = dict(ckpt=ckpt, skip=skip, allow_missing=allow_missing, strict=strict, depth=depth)
      lines += [f"  hint: {h}" for h in _mismatch_hints(model, follow, missing_names, unexpected, mismatched_names,
                                                        allow_missing, hint_context, parts)]
    raise WeightMismatchError("\n".join(lines))
  if dry_run:
    return report

  if report.loaded:
    file_dtypes = dtype_summary({n: weights[n] for n in report.loaded})
    model_dtypes = " + ".join(sorted({np.dtype(target[n][1].dtype).name for n in report.loaded}))
    report.dtypes = file_dtypes if file_dtypes == model_dtypes else f"{file_dtypes} -> {model_dtypes}"
  report.info.append(_heads_line(model, ckpt))
  _check_fixed_tables(model, target, new_values, report)
  _write(model, new_values)
  return report


def _follows(model, follow: dict, options: Mapping[str, Sequence[str]]) -> bool:
  """Whether the load succeeds with `options` ({'skip' / 'allow_missing': patterns}) added to the caller's."""
  kw = dict(follow)
  for option in ("skip", "allow_missing"):
    kw[option] = tuple(kw[option]) + tuple(options.get(option, ()))
  try:
    _load(model, kw.pop("ckpt"), dry_run=True, **kw)
  except WeightMismatchError:
    return False
  return True


def _avg_pooled(model):
  """An abstract copy of ViT `model` in the 'avg' (fc_norm) layout, or None for an MAE."""
  from flax import nnx
  from tinymim_jax.models.vit import ViT

  enc, dec = model_configs(model)
  if dec is not None or enc.pooling == "avg":
    return None
  return nnx.eval_shape(lambda: ViT(dataclasses.replace(enc, pooling="avg"), rngs=nnx.Rngs(0)))


def _mismatch_hints(model, follow, missing_names, unexpected, mismatched_names, allow_missing, context, model_parts
                    ) -> list[str]:
  """The fixes of a failed load, spelt for where the user is. Each is tried first (the load repeated with it, as a
  dry run): one that does not lead to a load, or cannot be set there, is left out."""
  candidates = []  # (what the fix does, its options)
  tails = [t for t in ("fc_norm", "head") if any(n.startswith(t + ".") for n in missing_names)]
  if tails:
    candidates.append((f"to start fine-tuning from a pretrain file (a fresh {' + '.join(tails)})",
                       {"allow_missing": [rf"^{t}\." for t in tails]}))
  if any(u.startswith("head.") for u in unexpected):
    candidates.append(("to drop the file's classifier head", {"skip": [r"^head\."]}))
  # Parts the model does not have at all (e.g. DeiT's dist_token): skip them by their top-level name. (A part the
  # model has, e.g. a deeper file's extra blocks, is a different architecture: no hint. fc_norm is the layout of a
  # global-pool model, not a part to drop: the pooling hint below.)
  others = sorted({u.split()[0].split(".")[0] for u in unexpected} - set(model_parts) - {"head", "fc_norm"})
  if others and len(others) <= 4:
    candidates.append((f"to ignore the file's {', '.join(others)} (the model has no such part)",
                       {"skip": [rf"^{re.escape(o)}\." if any(u.startswith(o + ".") for u in unexpected)
                                 else rf"^{re.escape(o)}$" for o in others]}))
  if any(n.startswith("head.") for n in mismatched_names):
    options = {"skip": [r"^head\."]}
    if _first_match(allow_missing, "head.weight") is None:
      options["allow_missing"] = [r"^head\."]
    candidates.append(("the file's classifier has another number of classes; to start a fresh head", options))
  hints = []
  for text, options in candidates:
    fix = render_fix(context, **options)
    if fix and _follows(model, follow, options):
      hints.append(f"{text}: {fix}")
  # The distilled layouts are parts of the model's config, not of the file: say which fields build them.
  parts = {u.split()[0].split(".")[0] for u in unexpected}
  wanted = (("dist_token", "dist_token=True"),
            ("conv1x1", "conv1x1_dim=<the file's conv1x1.1 rows, 1280 for TinyMIM*-T>"))
  fields = [f for part, f in wanted if part in parts]
  if fields:
    hints.append(f"the file holds {' and '.join(p for p in ('dist_token', 'conv1x1') if p in parts)}: build the "
                 f"model with {', '.join(fields)} (ViTConfig fields) to load them")
  if any(u.startswith("fc_norm.") for u in unexpected) and "fc_norm" not in model_parts:
    avg = _avg_pooled(model)
    fix = render_fix(context, pooling="avg")
    if avg is not None and fix and _follows(avg, follow, {}):
      hints.append(f"the file is a global-pool model (fc_norm after the mean of the patch tokens, timm's "
                   f"global_pool='avg'); build the model in that layout: {fix}")
  return hints


def _is_abstract(value) -> bool:
  import jax
  return isinstance(value, jax.ShapeDtypeStruct)


def _is_abstract_model(target) -> bool:
  return any(_is_abstract(value) for _, value in target.values())


def _check_fixed_tables(model, target, new_values, report):
  """Notes when a fixed (Constant) table gets values other than the sin-cos table it was built with."""
  from flax import nnx
  from tinymim_jax.models.vit import Constant

  flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, Constant))}
  for name, (path, value) in target.items():
    if path in flat and path in new_values and not _is_abstract(value):
      err = float(np.max(np.abs(new_values[path] - np.asarray(value))))
      if err > 1e-6:
        report.notes.append(f"{name} differs from the model's fixed sin-cos table (max abs {err:.3g}): the "
                            f"file's table is loaded and stays frozen")


def _write(model, new_values: Mapping[tuple, np.ndarray]):
  import jax
  from flax import nnx, traverse_util

  state = nnx.state(model)
  old = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  new = {}
  for path, arr in new_values.items():
    sharding = getattr(old[path], "sharding", None)
    new[path] = jax.device_put(arr, sharding) if sharding is not None else jax.numpy.asarray(arr)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(new))
  nnx.update(model, state)
