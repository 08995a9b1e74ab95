"""Which errors are a user's mistake (said as one `error:` line by the applications: the main job, the converter,
the study), and config fields that moved (for did-you-mean).

A user's mistake is an error this project raises on purpose about its input: a ValueError (ConfigError,
ConvertError, a data or config check), a FileNotFoundError, or one of the listed run errors, raised from our own
code (the innermost frame is in tinymim_jax/ or configs/). The same classes raised inside a library (jax, Orbax,
TensorFlow) are faults of ours or theirs and keep their traceback.
"""

from __future__ import annotations

import difflib
import os
import traceback
from typing import Iterable

_OURS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
              for d in ("tinymim_jax", "configs"))

# Config fields under their former names -> where they are now (a prefix ending in '.' maps a whole section).
MOVED_FIELDS = {
    "knn.max_train": "eval.max_train",  # k-NN and few-shot share the train features since both read eval.*
    "knn.": "eval.knn.",
    "fewshot.": "eval.fewshot.",
}


def raised_by_us(e: BaseException) -> bool:
  """Whether the innermost frame of `e`'s traceback is this project's code (not a library's)."""
  frames = traceback.extract_tb(e.__traceback__)
  return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OURS)


def is_user_error(e: BaseException, also: tuple[type, ...] = ()) -> bool:
  """A message for the user, not a traceback: `also` (the application's own complete-message errors) anywhere,
  ValueError / FileNotFoundError when our code raised it."""
  if isinstance(e, also):
    return True
  return isinstance(e, (ValueError, FileNotFoundError)) and raised_by_us(e)


def one_line(e: BaseException) -> str:
  """'error: <message>' (the message may list several items, one per line)."""
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return f"error: {text.strip() or type(e).__name__}"


def did_you_mean(field: str, known: Iterable[str]) -> str:
  """' (moved to eval.max_train)' / ' (did you mean eval.knn.k?)' / '' for an unknown dotted config field."""
  if field in MOVED_FIELDS:
    return f" (moved to {MOVED_FIELDS[field]})"
  for old, new in MOVED_FIELDS.items():
    if old.endswith(".") and field.startswith(old):
      return f" (moved to {new}{field[len(old):]})"
  known = list(known)
  close = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
  if not close:  # the last part under another section (e.g. max_train -> eval.max_train)
    tail = field.rsplit(".", 1)[-1]
    close = [k for k in known if k.rsplit(".", 1)[-1] == tail][:1]
  return f" (did you mean {close[0]}?)" if close else ""
