"""The workdir's lock: one run at a time holds a workdir.

Lock. `workdir/run.lock` is created atomically (O_CREAT | O_EXCL) and holds JSON: host, pid, the process's
start time, the run's start time, a unique run id (and the SLURM job, if any). The holder refreshes the
file's mtime every HEARTBEAT_S seconds from a daemon thread. A lock is stale, and is taken over with a
warning, when its holder is gone:
  - same host: the pid is not alive, or is alive but is another process (its start time differs);
  - the same SLURM job, requeued (SLURM_RESTART_COUNT is larger): the earlier incarnation has ended;
  - another host: the heartbeat is older than STALE_AFTER_S, measured against the shared filesystem's own
    clock (the mtime of a file this process touches next to the lock), so clock skew between hosts does not
    matter.
Otherwise the second run stops at once with WorkdirLockedError naming the holder. A holder that was paused past
the staleness limit (a stopped VM, a long GC) may wake up after another run took its lock over: it finds out at its
next heartbeat (a warning) and at the latest from `verify()`, which the trainer calls before every checkpoint save,
export and metrics write, and which raises WorkdirLockLostError, so that nothing it writes after that lands. `Lock` is the interface;
`LocalFileLock` implements it for local and mounted shared filesystems, `GcsLock` for a gs:// workdir: the same
rules, with the lock an object created with the precondition ifGenerationMatch=0 (GCS creates it for one request
only; the others get 412 Precondition Failed), a heartbeat that rewrites it with ifGenerationMatch=<its generation>
(so a holder whose lock was taken over finds out instead of overwriting the new holder's), ages measured against
the bucket's clock (the `updated` time of an object this process writes), and a stale lock taken over by one
conditional rewrite (ifGenerationMatch=<the stale generation>: of two runs taking over, one wins).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Protocol

from tinymim_jax.workdir import LOCK as LOCK_FILE, WorkdirError, WorkdirLockedError, WorkdirLockLostError

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class Lock(Protocol):
  """One writer per workdir. acquire() raises WorkdirLockedError naming a live holder; heartbeat() proves the
  holder alive; verify() raises WorkdirLockLostError once the lock is another run's; release() is idempotent."""

  def acquire(self) -> None: ...
  def heartbeat(self) -> None: ...
  def verify(self) -> None: ...
  def release(self) -> None: ...


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (Linux: /proc/<pid>/stat field 22), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by someone else
    return True
  return True


def _slurm() -> dict[str, Any]:
  if "SLURM_JOB_ID" not in os.environ:
    return {}
  return {"slurm_job": os.environ["SLURM_JOB_ID"], "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}


def describe_holder(h: dict) -> str:
  job = f", SLURM job {h['slurm_job']}" if h.get("slurm_job") else ""
  return f"host {h.get('host')}, pid {h.get('pid')}, started {h.get('start')}{job}, run id {h.get('run_id')}"


def _holder_info() -> dict:
  """What a lock says about its holder: host, pid, the process's start time, the run's start, a unique run id."""
  pid = os.getpid()
  return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
          "start": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "run_id": uuid.uuid4().hex,
          **_slurm()}


def _stale_reason(me: dict, h: dict, age: float, stale_after_s: float) -> str | None:
  """Why the lock of holder `h` (heartbeat `age` seconds old) is stale, or None if its holder may be alive (the
  rules of the module docstring)."""
  if h.get("slurm_job") and h.get("slurm_job") == me.get("slurm_job") and \
      int(h.get("slurm_restart", 0)) < int(me.get("slurm_restart", 0)):
    return f"it is an earlier run of this SLURM job {h['slurm_job']} (requeued)"
  if h.get("host") == me["host"]:
    pid = int(h.get("pid", -1))
    if pid == os.getpid():  # another run in this very process (e.g. a thread): alive
      return None
    if not _pid_alive(pid):
      return f"its process {pid} on this host is gone"
    start = _process_start(pid)
    if h.get("pid_start") and start and start != h["pid_start"]:
      return f"pid {pid} on this host now belongs to another process"
    return None
  if age > stale_after_s:
    return f"its host {h.get('host')} has not refreshed it for {age:.0f}s (> {stale_after_s:.0f}s)"
  return None


class _HeartbeatLock:
  """What both locks share: the holder's identity and a daemon thread calling heartbeat() every heartbeat_s."""

  def __init__(self, heartbeat_s: float, stale_after_s: float):
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.info = _holder_info()
    self._held = False
    self._lost: str | None = None  # why this run no longer holds the lock it took
    self._stop = threading.Event()
    self._thread = None
    # verify() reads the lock while the heartbeat thread may be rewriting it: one at a time, or verify can see
    # its own lock mid-rewrite (a new generation, or none for an instant) and take it for lost.
    self._io = threading.Lock()

  def heartbeat(self) -> None:
    raise NotImplementedError

  def _current_holder(self) -> dict | None:
    """The holder the lock names now (None: no lock, or not our JSON)."""
    raise NotImplementedError

  def _lose(self, holder: dict | None) -> str:
    """Records (once, with a warning) that another run holds the lock now; -> the error line."""
    if self._lost is None:
      workdir = os.path.dirname(self.path) if "://" not in self.path else self.path[:-len(LOCK_FILE) - 1]
      now = f"it is now held by {describe_holder(holder)}" if holder else "it is gone"
      self._lost = (
          f"this run lost the lock of {workdir} ({now}): it was paused or cut off for longer than the "
          f"{self.stale_after_s:.0f}s staleness limit and another run took the workdir over. Stopped without "
          f"writing anything more into it; that run's results are the workdir's now.")
      logging.warning("%s", self._lost)
    return self._lost

  def verify(self) -> None:
    """Raises WorkdirLockLostError if the lock is no longer this run's (read from the storage, not cached)."""
    if self._lost is None and self._held:
      with self._io:
        holder = self._current_holder()
      if (holder or {}).get("run_id") != self.info["run_id"]:
        self._lose(holder)
    if self._lost is not None:
      raise WorkdirLockLostError(self._lost)

  def _start_heartbeat(self) -> None:
    self._held = True
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      with self._io:
        self.heartbeat()

  def _stop_heartbeat(self) -> bool:
    """Stops the heartbeat; -> whether the lock was held."""
    if not self._held:
      return False
    self._held = False
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()
    return True


class LocalFileLock(_HeartbeatLock):
  """`Lock` on a local or mounted shared filesystem (see the module docstring)."""

  def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
    super().__init__(heartbeat_s, stale_after_s)
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)

  # -- acquire -------------------------------------------------------------------------------------------
  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(20):  # races: another run may create or move the lock between our steps
      if self._create():
        break
      holder, age = self._read()
      if holder is None:
        if age is not None and age > 10:  # unreadable for a while: a holder that crashed while writing it
          self._take_over(None, f"the lock file is unreadable and {age:.0f}s old")
        else:  # gone, or being written right now: look again
          time.sleep(0.1)
        continue
      why = self._stale_reason(holder, age)
      if why is None:
        raise WorkdirLockedError(
            f"{os.path.dirname(self.path)} is in use by another run ({describe_holder(holder)}; last heartbeat "
            f"{age:.0f}s ago). One run per workdir: wait for it to end or stop it (a crashed run's lock is taken "
            f"over automatically: same host once its pid is gone, other hosts after {self.stale_after_s:.0f}s "
            f"without a heartbeat; or remove {self.path} if you are sure it is dead).")
      self._take_over(holder, why)
    else:
      raise WorkdirLockedError(f"could not take the lock {self.path}: other runs keep creating it")
    self._start_heartbeat()

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(self.info, f, indent=2)
      f.flush()
      os.fsync(f.fileno())
    return True

  def _read(self) -> tuple[dict | None, float | None]:
    """(holder, heartbeat age in seconds by the filesystem's clock); (None, None) if the file vanished,
    (None, age) if it exists but is not valid JSON."""
    try:
      with open(self.path) as f:
        text = f.read()
      mtime = os.stat(self.path).st_mtime
    except FileNotFoundError:
      return None, None
    age = max(self._fs_now() - mtime, 0.0)
    try:
      holder = json.loads(text)
    except json.JSONDecodeError:
      return None, age
    return (holder if isinstance(holder, dict) else None), age

  def _fs_now(self) -> float:
    """Now, by the clock that stamps mtimes in this directory (a shared filesystem's server may differ from
    ours)."""
    probe = f"{self.path}.clock-{self.info['run_id']}"
    try:
      with open(probe, "w"):
        pass
      return os.stat(probe).st_mtime
    except OSError:
      return time.time()
    finally:
      try:
        os.remove(probe)
      except OSError:
        pass

  def _stale_reason(self, h: dict, age: float) -> str | None:
    return _stale_reason(self.info, h, age, self.stale_after_s)

  def _take_over(self, holder: dict | None, why: str) -> None:
    """Moves the stale lock aside (one rename wins a race) and checks that it was the stale one."""
    aside = f"{self.path}.stale-{self.info['run_id']}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # someone else moved it: retry the create
    try:
      with open(aside) as f:
        moved = json.load(f)
    except (OSError, json.JSONDecodeError):
      moved = None
    if holder is not None and (moved or {}).get("run_id") != holder.get("run_id"):
      # We moved a fresh lock that another run created after we read the stale one: put it back.
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
    else:
      logging.warning("taking over the lock of %s: %s (%s)", os.path.dirname(self.path),
                      describe_holder(holder) if holder else "unknown holder", why)
    try:
      os.remove(aside)
    except OSError:
      pass

  # -- heartbeat / release --------------------------------------------------------------------------------
  def _owns(self) -> bool:
    try:
      with open(self.path) as f:
        return json.load(f).get("run_id") == self.info["run_id"]
    except (OSError, json.JSONDecodeError, AttributeError):
      return False

  def _current_holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        holder = json.load(f)
    except (OSError, json.JSONDecodeError):
      return None
    return holder if isinstance(holder, dict) else None

  def heartbeat(self) -> None:
    if not self._held or self._lost is not None:
      return
    if not self._owns():
      self._lose(self._current_holder())
      return
    try:
      os.utime(self.path)
    except OSError as e:  # e.g. a full disk: the next beat tries again
      logging.warning("could not refresh the workdir lock %s: %s", self.path, e)

  def release(self) -> None:
    if not self._stop_heartbeat():
      return
    if self._owns():
      try:
        os.remove(self.path)
      except OSError:
        pass


class GcsLock(_HeartbeatLock):
  """`Lock` of a gs:// workdir: an object with generation preconditions (see the module docstring).

  Uses the google-cloud-storage client (credentials: Application Default Credentials, e.g. a TPU VM's service
  account; STORAGE_EMULATOR_HOST points it at a local server without credentials).
  """

  def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S,
               client=None):
    try:
      from google.cloud import storage  # lazy: only gs:// workdirs need it
    except ImportError:
      raise WorkdirError(f"workdir {workdir!r}: a gs:// workdir needs the GCS client: pip install "
                         "'tinymim-jax[gcs]'") from None
    if not workdir.startswith("gs://") or not workdir[5:].strip("/"):
      raise WorkdirError(f"workdir {workdir!r}: expected gs://BUCKET/PATH")
    bucket, _, prefix = workdir[5:].partition("/")
    self.path = f"gs://{bucket}/{prefix.strip('/') + '/' if prefix.strip('/') else ''}{LOCK_FILE}"
    self.client = client or storage.Client(project=None)  # objects need no project
    self.bucket = self.client.bucket(bucket)
    self.name = self.path[len(f"gs://{bucket}/"):]
    super().__init__(heartbeat_s, stale_after_s)
    self.generation: int | None = None  # of our lock object while we hold it

  def _exceptions(self):
    from google.api_core import exceptions
    return exceptions

  def _upload(self, **precondition) -> int:
    """Writes our holder JSON under the precondition; -> the new generation. Raises PreconditionFailed."""
    blob = self.bucket.blob(self.name)
    blob.upload_from_string(json.dumps(self.info, indent=2), content_type="application/json", **precondition)
    return int(blob.generation)

  # -- acquire -------------------------------------------------------------------------------------------
  def acquire(self) -> None:
    ex = self._exceptions()
    workdir = self.path[:-len(LOCK_FILE) - 1]
    for _ in range(20):  # races: another run may create or take over the lock between our steps
      try:
        self.generation = self._upload(if_generation_match=0)
        break
      except ex.PreconditionFailed:
        pass
      holder, age, generation = self._read()
      if generation is None:  # gone since: create it again
        continue
      if holder is not None and holder.get("run_id") == self.info["run_id"]:  # our own create, retried
        self.generation = generation
        break
      if holder is None:
        if age > 10:  # not our JSON (an object upload is never seen half-written): take it over
          if self._take_over(None, f"the lock object is unreadable and {age:.0f}s old", generation):
            break
        else:
          time.sleep(0.1)
        continue
      why = _stale_reason(self.info, holder, age, self.stale_after_s)
      if why is None:
        raise WorkdirLockedError(
            f"{workdir} is in use by another run ({describe_holder(holder)}; last heartbeat {age:.0f}s ago). One "
            f"run per workdir: wait for it to end or stop it (a crashed run's lock is taken over automatically: "
            f"same host once its pid is gone, other hosts after {self.stale_after_s:.0f}s without a heartbeat; or "
            f"delete {self.path} if you are sure it is dead).")
      if self._take_over(holder, why, generation):
        break
    else:
      raise WorkdirLockedError(f"could not take the lock {self.path}: other runs keep creating it")
    self._start_heartbeat()

  def _read(self) -> tuple[dict | None, float, int | None]:
    """(holder or None if not our JSON, heartbeat age in seconds by the bucket's clock, generation); generation
    None if there is no lock object."""
    ex = self._exceptions()
    blob = self.bucket.get_blob(self.name)
    if blob is None:
      return None, 0.0, None
    generation, updated = int(blob.generation), blob.updated.timestamp()
    try:
      text = blob.download_as_bytes(if_generation_match=generation)
    except (ex.NotFound, ex.PreconditionFailed):  # replaced or deleted since
      return None, 0.0, None
    age = max(self._bucket_now() - updated, 0.0)
    try:
      holder = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
      return None, age, generation
    return (holder if isinstance(holder, dict) else None), age, generation

  def _bucket_now(self) -> float:
    """Now by the bucket's clock: the `updated` time of an object written for the purpose (then deleted)."""
    probe = self.bucket.blob(f"{self.name}.clock-{self.info['run_id']}")
    try:
      probe.upload_from_string(b"")
      return probe.updated.timestamp()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("could not read the clock of bucket %s (%s); using this host's", self.bucket.name, e)
      return time.time()
    finally:
      try:
        probe.delete()
      except Exception:  # pylint: disable=broad-except
        pass

  def _take_over(self, holder: dict | None, why: str, generation: int) -> bool:
    """Replaces the stale lock (exactly that generation) with ours; False if it changed meanwhile."""
    try:
      self.generation = self._upload(if_generation_match=generation)
    except self._exceptions().PreconditionFailed:  # its holder beat, or another run took it over: look again
      return False
    logging.warning("taking over the lock of %s: %s (%s)", self.path[:-len(LOCK_FILE) - 1],
                    describe_holder(holder) if holder else "unknown holder", why)
    return True

  # -- heartbeat / release --------------------------------------------------------------------------------
  def _current_holder(self) -> dict | None:
    holder, _, generation = self._read()
    if generation is not None and generation == self.generation:
      return dict(self.info)
    if (holder or {}).get("run_id") == self.info["run_id"]:  # our JSON in another generation: not our upload
      return None
    return holder

  def heartbeat(self) -> None:
    """Rewrites the lock (a new generation, a new `updated` time) if it is still ours."""
    if not self._held or self.generation is None or self._lost is not None:
      return
    ex = self._exceptions()
    try:
      self.generation = self._upload(if_generation_match=self.generation)
    except ex.PreconditionFailed:
      logging.warning("the workdir lock %s was taken over by another run: this run no longer holds it", self.path)
      self.generation = None
      self._lose(self._read()[0])
    except Exception as e:  # pylint: disable=broad-except  (a network error: the next beat tries again)
      logging.warning("could not refresh the workdir lock %s: %s", self.path, e)

  def release(self) -> None:
    if not self._stop_heartbeat():
      return
    if self.generation is not None and self._lost is None:  # only our own generation: never another run's lock
      try:
        self.bucket.blob(self.name).delete(if_generation_match=self.generation)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("could not delete the workdir lock %s: %s", self.path, e)
      self.generation = None


def make_lock(workdir: str, **kwargs) -> Lock:
  """The lock implementation for `workdir`'s storage."""
  if workdir.startswith("gs://"):
    return GcsLock(workdir, **kwargs)
  if "://" in workdir:
    raise WorkdirError(f"workdir {workdir!r}: locking is implemented for local and mounted filesystems and gs:// "
                       "only")
  return LocalFileLock(workdir, **kwargs)


def acquire_for_job(workdir: str, *, process_index: int = 0, agree: Callable[[bool], bool] | None = None,
                    **kwargs) -> Lock | None:
  """Process 0 takes the lock; `agree(ok)` -> whether every process's ok is True (a collective; None in a
  single-process run). Raises WorkdirLockedError on every process if process 0 could not take it."""
  lock, error = None, None
  if process_index == 0:
    lock = make_lock(workdir, **kwargs)
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      lock, error = None, e
  if agree is not None and not agree(error is None):
    if lock is not None:
      lock.release()
    raise error or WorkdirLockedError(f"{workdir} is in use by another run (process 0 says who)")
  if error is not None:
    raise error
  return lock

