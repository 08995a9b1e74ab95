"""Checkpoints: Orbax CheckpointManager (async), keep-last-K plus keep-every-M, verified restore onto any mesh.

A checkpoint at step s holds three items:
  model  {'params', 'consts', ...}: the trained model (never the teacher) and every other trained tree of the
         state but the optimizer's (a segmenter's 'batch_stats', a fine-tuning run's weight EMA 'ema'; _model_item)
  opt    the optimizer state
  meta   JSON: the resolved config, the step (the data position is derived from it), the seed, the
         teacher's source and weight hash, and a checksum of every saved array ('checksums')
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a crash or a
SIGKILL mid-save never replaces a good checkpoint with a half-written one. On an object store (a gs:// workdir: no
atomic rename) Orbax writes the step directory in place and marks it complete with a commit file
(commit_success.txt) written last; a step without it is unfinished, ignored and cleaned up like a temporary
directory. Retention is Orbax's: the newest
`keep` checkpoints (keep >= 1, so the latest is never deleted) plus every step divisible by `keep_every`;
Orbax deletes old ones only after a new one is complete.

Integrity. Orbax (0.12) stores no checksum of array data (zarr3 checksums only its shard index; OCDBT data is
not checksummed), so a flipped bit restores silently. Each save therefore records `array_checksums` of what it
saves in the meta item (written atomically with the arrays), and every restore recomputes them. They are
computed on the host from each process's own shards (numpy, arrays in parallel threads; a few seconds per GB
of state per core), and do not depend on the mesh, so a checkpoint still verifies when restored onto another one. A checkpoint
whose arrays do not match, or that Orbax cannot read (truncated or missing files, missing metadata), is
damaged: `restore` warns naming it, moves it aside to `checkpoints/<step>.damaged-<time>` (never deleted) and
falls back to the newest intact one; with none left it raises NoIntactCheckpointError listing what it found.
A checkpoint that is intact but does not fit the model / optimizer being restored (another architecture)
raises CheckpointMismatchError listing the arrays. A failed save (disk full, permissions) raises
CheckpointSaveError with the path and errno as soon as it is noticed (`poll`), leaving the earlier
checkpoints intact and no temporary directory behind.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import gc
import glob
import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from tinymim_jax import optim, paths
from tinymim_jax import sharding as sh
from tinymim_jax import workdir as workdir_lib

_TMP_GLOB = "*.orbax-checkpoint-tmp*"
# Set in the meta of every checkpoint saved with checksums: one that has it and lacks 'checksums' lost them
# (damaged), unlike one saved before checksums existed.
CHECKSUM_FORMAT_KEY = "checksum_format"
CHECKSUM_FORMAT = 1
_COMMIT_FILE = "commit_success.txt"  # Orbax's mark of a complete step on an object store (a directory without it
                                     # in checkpoints/ is deleted as unfinished when the next run starts)


def _finalized(step_dir: str) -> bool:
  """Whether a step directory holds a complete checkpoint: locally, that it exists (Orbax renames a finished
  temporary directory to it); on an object store, that Orbax's commit file is in it."""
  if not paths.is_remote(step_dir):
    return os.path.isdir(step_dir)
  return ocp.step.is_path_finalized(step_dir)


class CheckpointError(RuntimeError):
  """A checkpoint problem that stops the run; the message is complete (no Orbax traceback needed)."""


class NoIntactCheckpointError(CheckpointError):
  pass


class CheckpointMismatchError(CheckpointError):
  pass


class CheckpointSaveError(CheckpointError):
  pass


# -----------------------------------------------------------------------------------------------------
# Checksums.
# -----------------------------------------------------------------------------------------------------
def _key_name(path) -> str:
  """A key path as Orbax names it ('1.0.mu.blocks.0.attn.qkv.kernel')."""
  return optim.path_name(path).replace("/", ".")


def _mix(h: np.ndarray) -> np.ndarray:
  """A bijection of uint32 (xor-shift-multiply, the 'lowbias32' finaliser), in place."""
  h ^= h >> np.uint32(16)
  h *= np.uint32(0x7FEB352D)
  h ^= h >> np.uint32(15)
  h *= np.uint32(0x846CA68B)
  h ^= h >> np.uint32(16)
  return h


def _words(a: np.ndarray) -> np.ndarray:
  """The bits of `a` as uint32 words, shape a.shape + (words per element,)."""
  a = np.asarray(a)
  if not a.flags.c_contiguous:
    a = a.copy(order="C")  # (not np.ascontiguousarray: it turns a 0-d array into 1-d)
  flat = a.reshape(-1)
  if a.dtype == np.bool_ or a.dtype.itemsize == 1:
    return flat.view(np.uint8).astype(np.uint32).reshape(a.shape + (1,))
  if a.dtype.itemsize == 2:
    return flat.view(np.uint16).astype(np.uint32).reshape(a.shape + (1,))
  return flat.view(np.uint32).reshape(a.shape + (a.dtype.itemsize // 4,))


# Per lane: weight(i) = (i * a + b) | 1, odd for every position i.
_LANES = ((np.uint32(0x9E3779B1), np.uint32(0x7F4A7C15)), (np.uint32(0x85EBCA77), np.uint32(0xC2B2AE3D)))


def _partial_checksum(a: np.ndarray, offset: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
  """(2,) uint64: the two lanes' sums (mod 2**32) over the block `a` of a global array of `shape` that starts
  at `offset`: sum over words w at global position i of mix(w ^ c) * weight(i), with mix a bijection and weight(i)
  odd, so a change to any one word changes both lanes (an odd multiple of a non-zero number is non-zero mod
  2**32), and several changes cancel with probability ~2**-64. Sums are exact in any order, so the result does
  not depend on how the array is split into blocks (shards, processes)."""
  w = _words(a)
  if w.size == 0:
    return np.zeros(2, np.uint64)
  gshape = tuple(shape) + (w.shape[-1],)
  pos = np.zeros((), np.uint32)
  for d, (n, start) in enumerate(zip(w.shape, tuple(offset) + (0,))):
    stride = int(np.prod(gshape[d + 1:], dtype=np.uint64)) % 2**32
    axis = ((np.arange(n, dtype=np.uint64) + np.uint64(start)) * np.uint64(stride)).astype(np.uint32)  # mod 2**32
    pos = pos[..., None] + axis if d else axis
  mixed = _mix(w ^ np.uint32(0x5BD1E995))  # (the constant: all-zero arrays get non-zero sums too)
  out = np.zeros(2, np.uint64)
  weight = np.empty_like(pos)
  for lane, (mul, add) in enumerate(_LANES):
    np.multiply(pos, mul, out=weight)
    weight += add
    weight |= np.uint32(1)
    weight *= mixed
    out[lane] = np.sum(weight, dtype=np.uint64) % 2**32
  return out


def _leaf_partial(x) -> np.ndarray:
  """This process's share of a leaf's checksum: the sum over its addressable shards with replica_id 0 (each
  block of a global array is counted once over all processes)."""
  if not isinstance(x, jax.Array):
    a = np.asarray(x)
    return _partial_checksum(a, (0,) * a.ndim, a.shape)
  out = np.zeros(2, np.uint64)
  for shard in x.addressable_shards:
    if shard.replica_id == 0:
      offset = tuple(sl.start or 0 for sl in shard.index)
      out = (out + _partial_checksum(np.asarray(shard.data), offset, x.shape)) % 2**32
  return out


def array_checksums(tree: Any) -> dict[str, str]:
  """{Orbax name of each array: 16 hex digits} of a pytree of jax (or numpy) arrays, computed on the host from
  each process's own shards, the same for any mesh (a collective in a multi-process run: every process must
  call it)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not flat:
    return {}
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # numpy releases the GIL
    partial = np.stack(list(pool.map(_leaf_partial, [x for _, x in flat]))).astype(np.uint64)
  if jax.process_count() > 1:
    partial = sh.allgather(partial.astype(np.uint32)).astype(np.uint64).sum(0)
  sums = partial % 2**32
  return {_key_name(path): f"{int(a):08x}{int(b):08x}" for (path, _), (a, b) in zip(flat, sums)}


# -----------------------------------------------------------------------------------------------------
# Errors, summarised.
# -----------------------------------------------------------------------------------------------------
def _summary(e: BaseException, limit: int = 240) -> str:
  """One line for an Orbax / TensorStore error (their messages carry multi-line specs), with its cause's."""
  def line(x):
    text = str(x).strip().splitlines()[0] if str(x).strip() else ""
    text = re.sub(r"\s*See full TensorStore details.*", "", text)
    text = re.sub(r"\s*\[tensorstore_spec=.*", "", text)
    text = text[:limit] + "..." if len(text) > limit else text
    return f"{type(x).__name__}: {text}" if text else type(x).__name__
  cause = e.__cause__ or e.__context__
  return line(e) + (f" (caused by {line(cause)})" if cause is not None else "")


def _save_error_line(e: BaseException | None, directory: str) -> str:
  """'[Errno 28] No space left on device: <path>' from an OSError or a TensorStore message."""
  if e is None:
    return f"the save did not complete (no finalised checkpoint in {directory})"
  if isinstance(e, OSError) and e.errno:
    return f"[Errno {e.errno}] {e.strerror or os.strerror(e.errno)}: {e.filename or directory}"
  text = str(e)
  code = re.search(r"os_error_code='?(\d+)", text) or re.search(r"\[Errno (\d+)\]", text)
  path = re.findall(r'local file "([^"]+)"', text)
  if code:
    n = int(code.group(1))
    return f"[Errno {n}] {os.strerror(n)}: {path[-1] if path else directory}"
  return _summary(e)


@contextlib.contextmanager
def _quiet_unraisable():
  """Orbax's read coroutines that fail after the first error are reported by Python as 'Exception ignored'
  with a TensorStore spec of ~60 lines each: one debug line each instead (the first error is summarised)."""
  old = sys.unraisablehook
  sys.unraisablehook = lambda u: logging.debug("ignored while reading a damaged checkpoint: %s", u.exc_value)
  try:
    yield
  finally:
    gc.collect()  # the failed coroutines are reported when collected
    sys.unraisablehook = old


# Loggers that report a damaged checkpoint's failed reads once more, each with a library traceback (Orbax through
# absl's logger, asyncio's "Task exception was never retrieved"); the restore says it in one warning instead.
_LIBRARY_LOGGERS = ("absl", "asyncio", "orbax", "tensorstore", "jax")


class _DropLibraryErrors(logging.Filter):
  """Lets a record through unless it carries a traceback (or matches `drop`); those go to the debug log as one
  line."""

  def __init__(self, drop: Callable[[logging.LogRecord], bool] = lambda r: False):
    super().__init__()
    self.drop = drop

  def filter(self, record):
    if record.exc_info or self.drop(record):
      logging.getLogger(__name__).debug("library log while reading checkpoints: %s",
                                        record.getMessage().splitlines()[0][:300] if record.msg else "")
      return False
    return True


@contextlib.contextmanager
def _quiet_library_errors(drop: Callable[[logging.LogRecord], bool] = lambda r: False):
  """While reading (possibly damaged) checkpoints: the libraries' records with tracebacks, and those `drop`
  picks, are dropped (the reader reports what failed itself)."""
  filt = _DropLibraryErrors(drop)
  loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
  for lg in loggers:
    lg.addFilter(filt)
  try:
    yield
  finally:
    for lg in loggers:
      lg.removeFilter(filt)


def _read_only_notice(record: logging.LogRecord) -> bool:
  """Orbax's 'Given directory is read only=...' at every read-only open: opening to restore is what was asked."""
  return str(record.msg).startswith("Given directory is read only")


# -----------------------------------------------------------------------------------------------------
# The checkpointer.
# -----------------------------------------------------------------------------------------------------
class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, keep_every: int | None = None, async_save: bool = True,
               read_only: bool = False):
    """read_only: restore only; nothing is created, cleaned up or saved under `workdir`."""
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None, save_interval_steps=0,
                                             enable_async_checkpointing=False, cleanup_tmp_directories=False)
    else:
      if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep_ckpts={keep!r}: must be >= 1 (the latest checkpoint is always kept)")
      if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
        raise ValueError(f"keep_every_steps={keep_every!r}: must be None or >= 1")
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every, create=True,
                                             enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True)
    self.directory = os.path.join(paths.abspath(workdir), workdir_lib.CHECKPOINTS)
    handlers = {"model": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    with _quiet_library_errors(drop=_read_only_notice):
      self.mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._pending: int | None = None  # the step of a save that may still be in flight

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.mngr.all_steps())

  # -- saving ----------------------------------------------------------------------------------------
  def save(self, step: int, state: dict, meta: dict) -> None:
    """Starts an async save of `state` (a train state without the teacher) at `step`, with checksums of its
    arrays in `meta`. Raises CheckpointSaveError if this or the previous save failed."""
    if self._pending is not None:  # Orbax would wait for it too; this way a failure names its own step
      self.wait()
    model = _model_item(state)
    meta = {**meta, "checksums": {"model": array_checksums(model), "opt": array_checksums(state["opt"])},
            CHECKSUM_FORMAT_KEY: CHECKSUM_FORMAT}
    try:
      self.mngr.save(int(step), force=True, args=ocp.args.Composite(
          model=ocp.args.StandardSave(model), opt=ocp.args.StandardSave(state["opt"]),
          meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # pylint: disable=broad-except
      self._failed(int(step), e)
    self._pending = int(step)

  def poll(self) -> None:
    """Raises CheckpointSaveError if the last save has finished and failed; never waits for one in flight."""
    if self._pending is not None and not self.mngr.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointSaveError if it failed."""
    step, self._pending = self._pending, None
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if step is None:  # a failure that was raised already
        return
      self._failed(step, e)
    if step is not None and not _finalized(os.path.join(self.directory, str(step))):
      self._failed(step, None)

  def _failed(self, step: int | None, e: BaseException | None):
    self._pending = None
    if jax.process_index() == 0:  # a half-written save is of no use: don't leave it for the next run to find
      self._remove_tmp_dirs()
    intact = [s for s in self._steps_on_disk() if s != step]
    raise CheckpointSaveError(
        f"saving checkpoint step {step} to {self.directory} failed: {_save_error_line(e, self.directory)}. "
        f"Stopped; the earlier checkpoints are intact (steps {intact or 'none'}): free the space / fix the "
        f"problem and rerun the same command to resume.") from None

  def _tmp_dirs(self) -> list[str]:
    """Orbax's unfinished step directories: '<step>.orbax-checkpoint-tmp-*' locally; on an object store the
    step directories without a commit file."""
    if not paths.is_remote(self.directory):
      return glob.glob(os.path.join(self.directory, _TMP_GLOB))
    if not paths.isdir(self.directory):
      return []
    steps = [os.path.join(self.directory, n) for n in paths.listdir(self.directory) if n.isdigit()]
    return [d for d in steps if not _finalized(d)]

  def _remove_tmp_dirs(self, settle_s: float = 1.0, timeout_s: float = 30.0) -> None:
    """Removes Orbax's temporary step directories once the failed save's other writes, still in flight when the
    first error surfaced, have stopped (no file changed for settle_s), so that none of them fails on the
    removal and reports it."""
    def snapshot():
      out = []
      for tmp in self._tmp_dirs():
        for root, _, files in paths.walk(tmp):
          for f in files:
            try:
              if paths.is_remote(root):  # an object appears whole: its name is enough
                out.append((root, f))
                continue
              st = os.stat(os.path.join(root, f))
            except OSError:
              continue
            out.append((root, f, st.st_size, st.st_mtime_ns))
      return sorted(out)

    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
      now = snapshot()
      if now != last:
        last, since = now, time.monotonic()
      elif time.monotonic() - since >= settle_s:
        break
      time.sleep(0.1)
    for _ in range(3):
      for tmp in self._tmp_dirs():
        if paths.is_remote(tmp):
          try:
            paths.rmtree(tmp)
          except OSError:
            pass
        else:
          shutil.rmtree(tmp, ignore_errors=True)
      if not self._tmp_dirs():
        return
      time.sleep(0.5)

  def _steps_on_disk(self) -> list[int]:
    if not paths.isdir(self.directory):
      return []
    return sorted(int(d) for d in paths.listdir(self.directory)
                  if d.isdigit() and _finalized(os.path.join(self.directory, d)))

  # -- restoring -------------------------------------------------------------------------------------
  def restore(self, abstract_state: dict, *, move_aside: bool = True) -> tuple[dict, dict]:
    """The newest intact checkpoint onto the shardings of `abstract_state` (ShapeDtypeStructs), whatever mesh
    saved it: -> (state, meta). Damaged ones are moved aside (move_aside) or skipped, with a warning."""
    abstract = {"model": _model_item(abstract_state), "opt": abstract_state["opt"]}
    step, restored, meta = self.restore_intact(lambda _: abstract, move_aside=move_aside)
    state = {**restored["model"], "opt": restored["opt"], "step": jnp.asarray(step, jnp.int32)}
    return state, meta

  def restore_intact(self, abstract_fn: Callable[[dict], dict[str, Any]], *, move_aside: bool = False
                     ) -> tuple[int, dict[str, Any], dict]:
    """Newest intact checkpoint -> (step, {item: tree}, meta). abstract_fn(meta) gives the items to restore
    ({'model': ..., 'opt': ...} of ShapeDtypeStructs); each restored array is checked against its checksum."""
    found = []
    for step in reversed(self.all_steps()):
      restored = meta = None
      try:
        meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        abstract = abstract_fn(meta)
        self._check_fits(step, abstract, (meta or {}).get("checksums"))
        with _quiet_unraisable(), _quiet_library_errors():
          r = self.mngr.restore(step, args=ocp.args.Composite(
              **{k: ocp.args.StandardRestore(v) for k, v in abstract.items()}))
        restored = {k: r[k] for k in abstract}
        problem = self._verify(meta, restored)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any unreadable checkpoint is damaged)
        problem = _summary(e)
      if sh.all_processes(problem is None):
        for s, p in found:  # only once an intact one exists: a systematic failure leaves everything in place
          where = self._move_aside(s) if move_aside else None
          logging.warning("checkpoint step %d in %s is damaged (%s)%s", s, self.directory, p,
                          f"; moved aside to {where}" if where else "; skipped")
        if found:
          logging.warning("resuming from step %d, the newest intact checkpoint", step)
        return step, restored, meta
      found.append((step, problem or "damaged as seen by another process"))
    listing = "\n".join(f"  step {s}: {p}" for s, p in found) or "  (none)"
    aside = sorted(d for d in paths.listdir(self.directory) if ".damaged-" in d) if paths.isdir(self.directory) else []
    raise NoIntactCheckpointError(
        f"no intact checkpoint in {self.directory}. Found:\n{listing}"
        + (f"\nMoved aside earlier: {', '.join(aside)}" if aside else "")
        + "\nNothing was moved or deleted. Start a new workdir, or move the checkpoints directory away to restart "
        "this run from step 0.")

  def _check_fits(self, step: int, abstract: dict[str, Any], checksums: dict | None = None) -> None:
    """Raises CheckpointMismatchError if the saved arrays' names / shapes differ from `abstract`'s; raises
    ValueError (damaged) if an item's metadata does not list the arrays the checkpoint's own checksums (`checksums`,
    written with it) say it saved: the metadata no longer reads as written, which is no change of config."""
    meta = self.mngr.item_metadata(step)
    diffs = []
    for item, tree in abstract.items():
      if meta[item] is None:
        raise FileNotFoundError(f"the metadata of item {item!r} is missing or unreadable "
                                f"({os.path.join(self.directory, str(step), item)})")
      saved = {_key_name(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in
               jax.tree_util.tree_flatten_with_path(meta[item].tree)[0] if hasattr(m, "shape")}
      written = set((checksums or {}).get(item, ()))
      if written and set(saved) != written:
        lost, extra = sorted(written - set(saved)), sorted(set(saved) - written)
        raise ValueError(f"the metadata of item {item!r} does not list what was saved with it (missing: "
                         f"{', '.join(lost[:3]) or 'none'}; not saved: {', '.join(extra[:3]) or 'none'})")
      want = {_key_name(p): (tuple(x.shape), np.dtype(x.dtype)) for p, x in
              jax.tree_util.tree_flatten_with_path(tree)[0]}
      for name in sorted(set(saved) | set(want)):
        a, b = saved.get(name), want.get(name)
        if a is None or b is None or a[0] != b[0]:  # dtypes may differ: Orbax casts on restore
          fmt = lambda v: "absent" if v is None else f"{v[0]} {v[1]}"
          diffs.append(f"  {item}/{name}: saved {fmt(a)}, now {fmt(b)}")
    if diffs:
      more = f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else ""
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not fit the model / optimizer this config builds:\n"
          + "\n".join(diffs[:12]) + more + "\nThe config differs from the one that saved it (see config.json / "
          "config_history.jsonl in the workdir): undo the change or use a new workdir.")

  def verify(self, step: int, abstract_state: dict) -> str | None:
    """Restores checkpoint `step` (on the shardings of `abstract_state`, as restore does) and checks it against
    its checksums: -> None when it is intact, else what is wrong. Waits for a save in flight first."""
    self.wait()
    abstract = {"model": _model_item(abstract_state), "opt": abstract_state["opt"]}
    try:
      meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      with _quiet_unraisable(), _quiet_library_errors():
        r = self.mngr.restore(step, args=ocp.args.Composite(
            **{k: ocp.args.StandardRestore(v) for k, v in abstract.items()}))
      return self._verify(meta, {k: r[k] for k in abstract})
    except Exception as e:  # pylint: disable=broad-except  (unreadable: damaged)
      return _summary(e)

  @staticmethod
  def _verify(meta: dict, restored: dict[str, Any]) -> str | None:
    expected = (meta or {}).get("checksums")
    if not expected:
      if (meta or {}).get(CHECKSUM_FORMAT_KEY):  # saved with checksums, which are gone: nothing vouches for it
        return "its checksum record is missing (it was saved with one), so its arrays cannot be verified"
      return None  # saved before checksums existed
    bad = []
    for item, tree in restored.items():
      got = array_checksums(tree)
      want = expected.get(item, {})
      bad += [f"{item}/{k}" for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    if bad:
      return f"checksum mismatch in {len(bad)} array(s): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}"
    return None

  def _move_aside(self, step: int) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.damaged-{stamp}"
    if jax.process_index() == 0:
      try:
        paths.rename(src, dst, marker=_COMMIT_FILE)  # an object store: copied, then deleted (not atomic)
      except OSError as e:
        logging.warning("could not move the damaged checkpoint %s aside: %s", src, e)
        dst = src
    sh.barrier(f"tinymim_move_aside_{step}")
    self.mngr.reload()
    return dst

  def restore_meta(self) -> dict:
    return self.mngr.restore(self.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.mngr.close()


def saved_config(workdir: str) -> dict | None:
  """The config the newest readable checkpoint of `workdir` records in its meta item (the run's identity when
  config.json is gone), or None. Reads JSON only (no arrays, nothing moved)."""
  d = os.path.join(workdir, workdir_lib.CHECKPOINTS)
  if not paths.isdir(d):
    return None
  for step in sorted((int(n) for n in paths.listdir(d) if n.isdigit()), reverse=True):
    path = os.path.join(d, str(step), "meta", "metadata")  # Orbax's JsonCheckpointHandler file of the meta item
    try:
      config = json.loads(paths.read_text(path)).get("config")
    except (OSError, ValueError, AttributeError):
      continue
    if isinstance(config, dict) and _finalized(os.path.join(d, str(step))):
      return config
  return None


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a finalised checkpoint (without opening Orbax)."""
  d = os.path.join(workdir, workdir_lib.CHECKPOINTS)
  return paths.isdir(d) and any(name.isdigit() and _finalized(os.path.join(d, name)) for name in paths.listdir(d))


def _model_item(state: dict) -> dict:
  """The checkpoint's 'model' item: params, consts and any other tree of the state but the optimizer's and the
  step (e.g. a segmenter's BatchNorm statistics, 'batch_stats'; a fine-tuning run's weight EMA, 'ema')."""
  return {k: v for k, v in state.items() if k not in ("opt", "step")}


def abstract(tree: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs of `tree` (optionally carrying shardings), for restoring without allocating."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
