"""Faults for the run-integrity tests: a copy of a finished run to damage, damaged checkpoints, failing saves."""

import errno
import glob
import os
import shutil

import orbax.checkpoint as ocp


def copy_run(src, dst):
  """A copy of a finished run's workdir, made unfinished (no done.json), for a test to resume or damage."""
  shutil.copytree(src, dst, symlinks=True)
  os.remove(os.path.join(dst, "done.json"))
  return str(dst)


def _largest_data_file(wd, step, item="model"):
  files = [p for p in glob.glob(os.path.join(wd, "checkpoints", str(step), item, "**", "d", "*"), recursive=True)
           if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


def damage(wd, step, how):
  """Bit flips (1-3 bytes), a truncation in the arrays' data, or a deleted metadata file."""
  if how.startswith("flip"):
    path = _largest_data_file(wd, step)
    data = bytearray(open(path, "rb").read())
    for k in range(int(how[-1])):
      data[len(data) * (k + 2) // 6] ^= 1 << (k + 3)
    open(path, "wb").write(bytes(data))
  elif how == "truncate":
    path = _largest_data_file(wd, step)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) * 2 // 3])
  elif how == "no_metadata":
    os.remove(os.path.join(wd, "checkpoints", str(step), "model", "_METADATA"))
  else:
    raise ValueError(how)


def fail_json_saves_at(monkeypatch, step):
  """Orbax's write of the meta item of `step` fails as on a full disk (in its background commit)."""
  original = ocp.JsonCheckpointHandler._save_fn

  async def save_fn(self, x, directory):
    if f"/{step}.orbax-checkpoint-tmp" in str(directory):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
    return await original(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save_fn)
