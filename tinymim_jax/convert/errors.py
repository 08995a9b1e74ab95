"""The converter's errors, and its hints: how to set a loader option where the user is (Python, CLI, config)."""

from __future__ import annotations

from typing import Mapping




class ConvertError(ValueError):
  """A checkpoint could not be read or does not fit the model."""


class WeightMismatchError(ConvertError):
  """Missing, unexpected or mis-shaped keys; the message lists all of them."""


class UnsafeCheckpointError(ConvertError):
  """A .pth pickle references a global outside SAFE_GLOBALS (it is never executed), or the installed torch's
  weights-only unpickler has a known bypass."""


class UnreadableFileError(ConvertError):
  """A file that is empty, damaged, or not a checkpoint at all; the message names the file and the fault."""


class MissingSourceError(ConvertError, FileNotFoundError):
  """A weights source that does not exist, or a directory that is not a tinymim-jax workdir."""


class AmbiguousCheckpointError(ConvertError):
  """A file holds more than one model (e.g. a student and a teacher): the caller has to name one."""


# A hint_context says how the caller's user sets the loader's options: 'api' (Python arguments of
# load_pytorch_weights), 'cli' (flags of `python -m tinymim_jax.convert`), or a mapping {option: config field} for
# the main job's config (e.g. {'skip': 'init_skip', 'ema': 'init_ema'}), rendered as `--config.<field>=value`. An
# option without a config field cannot be set there, and a fix that needs it is not offered.
HintContext = str | Mapping[str, str]


def _option_text(context: HintContext, option: str, value) -> str | None:
  patterns = isinstance(value, (list, tuple))
  if context == "api":
    if patterns:
      return f"{option}=(" + ", ".join(f"r'{p}'" for p in value) + ",)"
    return f"{option}={value!r}"
  if context == "cli":
    if patterns:
      return " ".join(f"--{option.replace('_', '-')} '{p}'" for p in value)
    if option == "ema":
      return "--ema" if value else "--no-ema"
    return f"--{option.replace('_', '-')} {value or repr('')}"
  field = context.get(option) if isinstance(context, Mapping) else None
  if field is None:
    return None
  if patterns:
    text = f"'{value[0]}'" if len(value) == 1 else "'(" + ",".join(f'"{p}"' for p in value) + ")'"
  elif isinstance(value, bool):
    text = str(value).lower()
  else:
    text = value or repr("")
  return f"--config.{field}={text}"


def render_fix(context: HintContext, **options) -> str | None:
  """How to set `options` ({option: value}) where the user is (see HintContext); None if one cannot be set."""
  parts = [_option_text(context, k, v) for k, v in options.items()]
  return None if None in parts else (", " if context == "api" else " ").join(parts)


def short_list(keys, n=8):
  keys = list(keys)
  return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")
