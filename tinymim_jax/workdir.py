"""A run's workdir: the names of what it holds (one table: every module that writes or reads one of them names
it from here), its errors, and the config a run was started with.

  config.json / config.txt   the resolved config (JSON; what the checkpoints mean, config_identity.py) / as text
  config_history.jsonl       the config changes of resumed runs
  run.lock                   the holder of the workdir while a run is in it (lock.py)
  run.json                   the run's metadata: feature spec, teachers and their weight hash, versions
  checkpoints/               Orbax checkpoints (checkpoint.py)
  metrics.jsonl, tensorboard/, curves.png   metrics, TensorBoard events and the plot of both (writers.py)
  model.safetensors (+ model.config.json)   the trained model, timm names (+ its architecture: convert.sidecar)
  done.json                  the final metrics, written last: the run is finished
"""

from __future__ import annotations

import json
import os

from tinymim_jax import paths

CONFIG = "config.json"
CONFIG_TEXT = "config.txt"
HISTORY = "config_history.jsonl"
LOCK = "run.lock"
RUN = "run.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PLOT = "curves.png"
EXPORT = "model.safetensors"
DONE = "done.json"


class WorkdirError(RuntimeError):
  """The workdir cannot be used by this run (the message says why and what to do)."""


class WorkdirLockedError(WorkdirError):
  pass


class ConfigChangeError(WorkdirError):
  pass


class ExportError(WorkdirError):
  """Writing the trained model (or done.json) failed: the checkpoints and any earlier export are intact."""


class WorkdirLockLostError(WorkdirError):
  """Another run took over this run's lock (this one was paused past the staleness limit): it must not write
  into the workdir again."""


def saved_config(workdir: str) -> dict | None:
  """The config.json of `workdir` as a dict, or None where there is none."""
  path = os.path.join(workdir, CONFIG)
  if not paths.exists(path):
    return None
  return json.loads(paths.read_text(path))


def read_done(workdir: str) -> dict | None:
  """The done.json of a finished run (its final metrics), or None while it is not finished."""
  path = os.path.join(workdir, DONE)
  if not paths.exists(path):
    return None
  return json.loads(paths.read_text(path))
