"""The config as a run's identity: which changes of a resumed run's config are allowed.

Config identity. `workdir/config.json` (written when the run starts) is what the checkpoints mean. A resumed
run lists the differences to it: the ones that change the model or the meaning of the checkpoint (FIXED, and
the fixed fields of the run's objective, objectives.Objective.fixed_fields) are a ConfigChangeError unless `config.allow_config_change=True`; the others are
logged, appended to `workdir/config_history.jsonl` ({"step", "time", "changes": {field: [old, new]}, "forced":
[...]}) and config.json is rewritten with the new values. The weights a run reads from its sources are part of
the identity too (check_source_change): a teacher or a probe's frozen encoder whose weights hash differs from the
one the checkpoints recorded (the source changed on disk, or its newest checkpoint is damaged and an older one was
read) is a ConfigChangeError unless forced the same way.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import time
from typing import Any

from tinymim_jax import paths
from tinymim_jax import workdir as workdir_lib
from tinymim_jax.workdir import ConfigChangeError

# Fields whose change makes a checkpoint mean something else, for every objective: the architecture, the objective,
# the starting weights (each objective adds its own: objectives.Objective.fixed_fields). fnmatch patterns over
# dotted field names.
FIXED = ("objective", "model.*", "init", "init_skip")
# Not part of the identity at all.
IGNORED = ("allow_config_change",)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _as_json(config) -> dict:
  js = config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else json.dumps(config, default=str)
  return json.loads(js)  # tuples -> lists, as in config.json




def _schema_defaults() -> dict[str, Any]:
  from tinymim_jax import config_base  # pylint: disable=g-import-not-at-top
  return _flatten(_as_json(config_base.base_config()))


def _variant_values_filled_in(tree: dict) -> dict:
  """The model / teacher sections with their None fields (= the variant's value) replaced by that value, so that
  a schema that turns a field into a placeholder (or back) is not a change of the model."""
  from tinymim_jax.models import vit as vit_lib  # pylint: disable=g-import-not-at-top
  tree = dict(tree)
  for section in ("model", *tree.get("teachers", ("teacher",))):
    s = tree.get(section)
    if isinstance(s, dict) and s.get("name") in vit_lib.VARIANTS:
      resolved = dataclasses.asdict(vit_lib.vit_config(s["name"]))
      tree[section] = {k: resolved.get(k) if v is None and isinstance(resolved.get(k), (int, float, str)) else v
                       for k, v in s.items()}
  return tree


def config_changes(old: dict, new) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (old value, new value)} of the fields that differ, IGNORED left out. A field the old config
  lacks (added to the schema since) counts only if its new value is not the schema's default; a field the new
  schema lacks is gone and does not count; a model field left to the variant (None) equals the variant's value."""
  raw = _flatten(_as_json(new))  # before the variant's values fill its None fields
  a, b = _flatten(_variant_values_filled_in(old)), _flatten(_variant_values_filled_in(_as_json(new)))
  defaults = None
  changes = {}
  for k in sorted(b):
    if any(fnmatch.fnmatchcase(k, p) for p in IGNORED):
      continue
    if k not in a:
      defaults = _schema_defaults() if defaults is None else defaults
      if k in defaults and (b[k] == defaults[k] or raw.get(k) == defaults[k]):
        continue
    if a.get(k) != b[k]:
      changes[k] = (a.get(k), b[k])
  return changes


def is_fixed(field: str, objective: str, teachers=()) -> bool:
  """Whether a change of `field` changes the model or the checkpoint's meaning for a run of `objective` (with
  the teacher sections `teachers`, its config.teachers)."""
  from tinymim_jax import objectives  # the registry loads the objectives' builders: only when asked
  own = objectives.get(objective).fixed_fields(tuple(teachers)) if objective in objectives.names() else ()
  return any(fnmatch.fnmatchcase(field, p) for p in FIXED + own)


def check_config_change(old: dict, new, *, allow: bool = False) -> dict[str, tuple[Any, Any]]:
  """The changes from the workdir's config `old` to `new`; raises ConfigChangeError listing the FIXED ones
  (with old and new values) unless `allow`."""
  changes = config_changes(old, new)
  fixed = {k: v for k, v in changes.items()
           if is_fixed(k, old.get("objective"), (*old.get("teachers", ()), *_as_json(new).get("teachers", ())))}
  if fixed and not allow:
    lines = "\n".join(f"  {k}: {o!r} -> {n!r}" for k, (o, n) in fixed.items())
    raise ConfigChangeError(
        f"this workdir's checkpoints were trained with another config, and these fields change the model or what "
        f"the checkpoint means:\n{lines}\nUse a new workdir, undo the change, or pass "
        "--config.allow_config_change=True to resume anyway.")
  return changes


def source_hashes(meta: dict) -> dict[str, tuple[str | None, str | None]]:
  """{'teacher <name>' / 'encoder': (source, sha256)} of the frozen sources a run's metadata records (the teachers'
  and a probe's encoder: objectives' Setup.meta)."""
  out = {f"teacher {name!r}": (t.get("source"), t.get("sha256")) for name, t in (meta.get("teachers") or {}).items()}
  if meta.get("encoder"):
    out["encoder"] = (meta["encoder"].get("source"), meta["encoder"].get("sha256"))
  return out


def check_source_change(saved_meta: dict, meta: dict, *, allow: bool = False) -> None:
  """Raises ConfigChangeError if a source's weights differ from the ones the checkpoint `saved_meta` was trained
  with (unless `allow`: then a warning). Sources the checkpoint does not record (older runs) are not compared."""
  before, now = source_hashes(saved_meta), source_hashes(meta)
  changed = {k: (before[k], now.get(k, (None, None))) for k in before
             if before[k][1] is not None and before[k][1] != now.get(k, (None, None))[1]}
  if not changed:
    return
  lines = "\n".join(f"  {k} ({new[0]}): sha256 {old[1][:12]} -> {str(new[1])[:12]}"
                     for k, (old, new) in changed.items())
  if allow:
    logging.warning("resuming with sources whose weights changed (forced):\n%s", lines)
    return
  raise ConfigChangeError(
      f"this workdir's checkpoints were trained with other weights from these sources:\n{lines}\nThe source "
      "changed on disk, or its newest checkpoint is damaged and an older one was read. Restore it, use a new "
      "workdir, or pass --config.allow_config_change=True to resume anyway.")


def record_config_change(workdir: str, config, changes: dict[str, tuple[Any, Any]], *, step: int) -> None:
  """Logs `changes`, appends them to config_history.jsonl and rewrites config.json / config.txt (process 0)."""
  if not changes:
    return
  forced = [k for k in changes if is_fixed(k, config.objective, tuple(config.teachers))]
  logging.warning("resuming at step %d with a changed config:\n%s", step,
                  "\n".join(f"  {k}: {o!r} -> {n!r}{'  (forced)' if k in forced else ''}"
                            for k, (o, n) in changes.items()))
  paths.append_text(os.path.join(workdir, workdir_lib.HISTORY), json.dumps(  # an object store: rewritten whole
      {"step": int(step), "time": time.time(), "changes": {k: list(v) for k, v in changes.items()},
       "forced": forced}) + "\n")
  from tinymim_jax import writers
  writers.write_config(workdir, config)

