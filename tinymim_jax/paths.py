"""One path layer for every file the project reads or writes: local paths and object-store URIs ('gs://...').

A local path (or a mounted shared filesystem) goes to os / open, exactly as before. A URI goes to etils `epath`, the
path library Orbax uses for its own files: epath sends gs:// to tf.io.gfile when TensorFlow is importable, or to
fsspec / gcsfs with EPATH_USE_TF=0 (the route the tests exercise, against a local GCS server: gcsfs honours
STORAGE_EMULATOR_HOST, tf.io.gfile has no endpoint override). Array data of checkpoints does not pass here: Orbax
writes it with TensorStore.

An object store has no atomic rename and no append, and has no directories (a "directory" is a name prefix). The
write patterns here are the ones that stay correct there:
  write_atomic   readers see the old or the new content whole: local, a temporary file in the same directory +
                 os.replace (a link at the path is replaced, never written through); object store, one upload (GCS makes an object visible only once its upload completed,
                 and replaces the old one at once).
  append_text    local, an append; object store, the file read and rewritten whole (one upload): only for small
                 files that one process writes (the workdir's lock holder), e.g. config_history.jsonl.
  rename         local, os.rename (atomic); object store, every object copied, then the originals deleted (not
                 atomic: used only to move a damaged checkpoint aside; see rename()).
  makedirs       a no-op on an object store.
README.md, section "Cloud storage (gs://)", lists which guarantee holds where.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import glob as glob_lib
import os
import shutil
import tempfile
from typing import IO, Iterator


def is_remote(path) -> bool:
  """Whether `path` is an object-store URI ('gs://bucket/dir', or any 'scheme://...')."""
  return "://" in os.fspath(path)


def _epath(path):
  from etils import epath  # lazy: local runs never need it
  _no_listing_cache()
  return epath.Path(os.fspath(path))


@functools.cache
def _no_listing_cache() -> None:
  """gcsfs (epath's gs:// route with EPATH_USE_TF=0) keeps directory listings for ever by default, but a workdir
  is written by other processes too (a pod's other hosts, TensorStore, a rerun): its listings expire at once
  (gcsfs cache_timeout=0, unless the fsspec config sets one). Before the first gs:// path is opened."""
  try:
    import fsspec
  except ImportError:
    return
  fsspec.config.conf.setdefault("gcs", {}).setdefault("cache_timeout", 0)


def abspath(path: str) -> str:
  """os.path.abspath for a local path; a URI is absolute already (and must not become './gs:/bucket')."""
  return path if is_remote(path) else os.path.abspath(path)


def join(*parts) -> str:
  """os.path.join; it keeps 'gs://bucket' intact (posix joining of the later parts)."""
  return os.path.join(*parts)


# -----------------------------------------------------------------------------------------------------------
# Queries.
# -----------------------------------------------------------------------------------------------------------
def exists(path) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  """On an object store: some object's name starts with `path/`."""
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  p = _epath(path)
  return p.exists() and not p.is_dir()


def listdir(path) -> list[str]:
  """Names (not paths) in the directory `path`, in no particular order."""
  return [p.name for p in _epath(path).iterdir()] if is_remote(path) else os.listdir(path)


def getsize(path) -> int:
  return _epath(path).stat().length if is_remote(path) else os.path.getsize(path)


def glob(pattern: str) -> list[str]:
  """glob.glob; on an object store only non-recursive patterns ('*', no '**')."""
  if not is_remote(pattern):
    return glob_lib.glob(pattern)
  directory, name = os.path.split(pattern)
  return [os.fspath(p) for p in _epath(directory).glob(name)]


def walk(top) -> Iterator[tuple[str, list[str], list[str]]]:
  """os.walk (one listing per directory on an object store)."""
  if not is_remote(top):
    yield from os.walk(top)
    return
  scheme = os.fspath(top).split("://", 1)[0] + "://"
  for root, dirs, files in _epath(top).walk():
    root = os.fspath(root)
    if "://" not in root:  # fsspec's walk gives 'bucket/dir'
      root = scheme + root.lstrip("/")
    yield root, list(dirs), list(files)


# -----------------------------------------------------------------------------------------------------------
# Reading and writing.
# -----------------------------------------------------------------------------------------------------------
def open(path, mode: str = "r", **kwargs) -> IO:  # pylint: disable=redefined-builtin
  """builtins.open; on an object store 'r' / 'rb' / 'w' / 'wb' only (a written object appears when closed)."""
  if not is_remote(path):
    return builtins.open(path, mode, **kwargs)
  if mode not in ("r", "rb", "w", "wb"):
    raise ValueError(f"{path}: mode {mode!r} is not supported on object storage (no append, no update)")
  return _epath(path).open(mode)


def read_text(path) -> str:
  with open(path, "r") as f:
    return f.read()


def read_bytes(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def write_atomic(path, data: str | bytes) -> None:
  """Writes `path` so that readers see the old or the new content whole (see the module docstring)."""
  data = data.encode() if isinstance(data, str) else data
  if is_remote(path):
    _epath(path).write_bytes(data)
    return
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are for everyone who can read the workdir
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def new_local_file(path) -> Iterator[str]:
  """A temporary path in `path`'s directory for a writer that needs a file name (safetensors, torch.save); on
  success it is renamed to `path` (replacing a file or a link there, never writing through one), on failure
  removed: `path` keeps its old content whole either way. Local paths only."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def append_text(path, text: str) -> None:
  """Appends `text`; on an object store the file is rewritten whole (small files with one writer only)."""
  if not is_remote(path):
    with builtins.open(path, "a") as f:
      f.write(text)
    return
  old = read_text(path) if exists(path) else ""
  write_atomic(path, old + text)


def makedirs(path) -> None:
  """os.makedirs(exist_ok=True); nothing on an object store (no directories there)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path) -> None:
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path) -> None:
  if is_remote(path):
    _epath(path).rmtree()
  else:
    shutil.rmtree(path)


def rename(src, dst, *, marker: str | None = None) -> None:
  """os.rename. On an object store (no rename) every object of `src` (a file or a directory) is copied to `dst`,
  then the originals are deleted: not atomic. `marker`, the name of a file directly in the directory `src` that
  marks it complete (Orbax's commit file), is copied last and deleted first: a move cut short leaves neither
  copy marked complete while it is partial."""
  if is_remote(src) != is_remote(dst):
    raise ValueError(f"cannot rename {src} to {dst}: not on the same storage")
  if not is_remote(src):
    os.rename(src, dst)
    return
  if exists(dst):
    raise FileExistsError(f"cannot rename {src} to {dst}: it exists")
  if not isdir(src):
    _epath(src).copy(_epath(dst))
    remove(src)
    return
  src = os.fspath(src).rstrip("/")
  files = [os.path.join(root, f)[len(src) + 1:] for root, _, names in walk(src) for f in names]
  files.sort(key=lambda f: f == marker)  # the marker last
  for f in files:
    _epath(os.path.join(src, f)).copy(_epath(os.path.join(dst, f)))
  for f in reversed(files):  # the marker first
    remove(os.path.join(src, f))
