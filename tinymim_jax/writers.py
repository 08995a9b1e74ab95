"""Metric logging: a JSONL file, TensorBoard events (no TensorFlow), a PNG of the curves, a progress bar.

Everything lands in the workdir:
  metrics.jsonl   one {"step", "time", **metrics} object per line; the source of truth (read_metrics()).
  tensorboard/    scalar event files, readable by `tensorboard --logdir workdir/tensorboard`.
  curves.png      train losses (log-y) and eval metrics vs step, re-drawn at most every plot_every_s.
  config.json / config.txt   the resolved config (write_config()).

Only process 0 writes: the others build the writer with enabled=False and every call is a no-op.
The workdir is a local path (or a mounted shared filesystem: the JSONL is appended to and flushed at every write,
events likewise) or an object-store URI (gs://, through tinymim_jax.paths): there, with no append, metrics.jsonl and
the run's event file are kept in memory and uploaded whole (one object each, readers see a complete file) at most
every flush_every_s, at every flush() (the trainer calls it before each checkpoint save, so the file holds every
record up to the newest checkpoint) and at close().
"""

from __future__ import annotations

import collections
import datetime
import io
import json
import math
import os
import re
import socket
import sys
import time
from typing import Any, Callable, Mapping

from tinymim_jax import paths
from tinymim_jax import workdir as workdir_lib



def write_config(workdir: str, config: Any) -> None:
  """Saves the resolved config as workdir/config.json and config.txt (a ConfigDict or a plain dict)."""
  if hasattr(config, "to_json_best_effort"):
    js = config.to_json_best_effort(indent=2)
  else:
    js = json.dumps(config, indent=2, default=str)
  paths.write_atomic(os.path.join(workdir, workdir_lib.CONFIG), js + "\n")
  paths.write_atomic(os.path.join(workdir, workdir_lib.CONFIG_TEXT), str(config) + "\n")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of workdir/metrics.jsonl, in file order. A torn last line (crash mid-write) is skipped."""
  path = os.path.join(workdir, workdir_lib.METRICS)
  return _parse_metrics(paths.read_text(path)) if paths.exists(path) else []


def _parse_metrics(text: str) -> list[dict[str, Any]]:
  out = []
  for line in text.splitlines():
    line = line.strip()
    if not line:
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(rec, dict) and "step" in rec:
      out.append(rec)
  return out


class _EventFile:
  """A TensorBoard event file written synchronously with plain file I/O.

  Not tensorboard's EventFileWriter: that one opens files through tensorboard.compat.tf, which imports
  TensorFlow whenever it is installed (it is, for the data pipeline), and flushes from a background thread.
  The record framing and protos come from tensorboard itself, without TF. On an object store (no append) the
  records go to memory and flush() uploads the whole file (one object, this run's own).
  """

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    paths.makedirs(logdir)
    # TensorBoard reads *tfevents* files in name order, and the resume purge (SessionLog.START) only works if
    # the new file comes after the old ones: the timestamp field is made larger than any existing one, even
    # for a restart within the same second.
    names = paths.listdir(logdir) if paths.isdir(logdir) else []
    stamps = [int(m.group(1)) for f in names if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", f))]
    stamp = max([int(time.time())] + [t + 1 for t in stamps])
    name = f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.{os.getpid()}.v2"
    self.path = os.path.join(logdir, name)
    self._buffer = io.BytesIO() if paths.is_remote(logdir) else None
    self._writer = RecordWriter(self._buffer if self._buffer is not None else open(self.path, "wb"))
    self.add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def add(self, event) -> None:
    self._writer.write(event.SerializeToString())
    self._writer.flush()

  def flush(self) -> None:
    """Object store: uploads the file so far (local files are flushed at every add)."""
    if self._buffer is not None:
      paths.write_atomic(self.path, self._buffer.getvalue())

  def close(self) -> None:
    self.flush()
    self._writer.close()


def _is_loss(key: str) -> bool:
  return key.startswith("train/loss")


def _is_eval(key: str) -> bool:
  return key.startswith("eval/")


class MetricWriter:
  """Writes scalar metrics to metrics.jsonl, TensorBoard and curves.png (see module docstring).

  resume_step: when restarting from a checkpoint at this step, records with a larger step (logged after
  that checkpoint, before a crash) are dropped from metrics.jsonl, and TensorBoard is told to purge them
  too, so the curves have no duplicated stretch.
  flush_every_s: on an object store, the longest time between two uploads of metrics.jsonl and the event file
  (each rewritten whole); a local workdir's files are flushed at every write.
  guard: called before anything is written into the workdir (a record, an upload, the plot); it raises to stop
  the writes (the trainer's: lock.Lock.verify, so that a run that lost its workdir's lock writes nothing more).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, plot_every_s: float | None = 30,
               resume_step: int | None = None, flush_every_s: float = 30, guard: Callable[[], None] | None = None):
    self.workdir = workdir
    self._guard = guard or (lambda: None)
    self.enabled = enabled
    self.plot_every_s = plot_every_s
    self.flush_every_s = flush_every_s
    self._remote = paths.is_remote(workdir)
    self._lines: list[str] = []  # object store: every line of metrics.jsonl, uploaded whole by flush()
    self._last_flush = time.monotonic()
    self._file = None
    self._tb = None
    self._closed = False
    # step/value series of the plotted keys only; the JSONL keeps everything.
    self._series: dict[str, tuple[list[int], list[float]]] = collections.defaultdict(lambda: ([], []))
    self._last_plot = -math.inf
    self._dirty = False
    if not enabled:
      return
    paths.makedirs(workdir)
    path = os.path.join(workdir, workdir_lib.METRICS)
    if paths.exists(path):
      self._resume(path, resume_step)
    if not self._remote:
      self._file = open(path, "a")
    self._tb = _EventFile(os.path.join(workdir, workdir_lib.TENSORBOARD))
    if resume_step is not None:
      # A SessionLog.START at step s makes TensorBoard drop the events with step >= s that it read from the
      # older event files. s = resume_step + 1: metrics logged at the checkpoint's own step are kept.
      from tensorboard.compat.proto import event_pb2
      self._tb.add(event_pb2.Event(wall_time=time.time(), step=int(resume_step) + 1,
                                   session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def _resume(self, path: str, resume_step: int | None) -> None:
    raw = paths.read_text(path)
    kept = [r for r in _parse_metrics(raw) if resume_step is None or r["step"] <= resume_step]
    n_lines = sum(1 for line in raw.splitlines() if line.strip())
    if self._remote:  # the next upload rewrites the file with these
      self._lines = [json.dumps(r) + "\n" for r in kept]
    # Rewrite once (atomically) if anything goes: later steps, or a line torn by a crash. Otherwise leave the
    # file alone, only making sure the next append starts on a new line.
    elif len(kept) != n_lines:
      paths.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    elif raw and not raw.endswith("\n"):
      with open(path, "a") as f:
        f.write("\n")
    for r in kept:
      self._add_to_series(r["step"], r)

  def _add_to_series(self, step: int, metrics: Mapping[str, Any]) -> None:
    for k, v in metrics.items():
      if (_is_loss(k) or _is_eval(k)) and isinstance(v, (int, float)):
        steps, values = self._series[k]
        steps.append(step)
        values.append(float(v))
        self._dirty = True

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs scalars at `step`. Values may be Python, numpy or jax scalars."""
    if not self.enabled:
      return
    step = int(step)
    metrics = {k: float(v) for k, v in metrics.items()}
    # JSON has no NaN/inf, but Python's json reads and writes them; a NaN loss is worth keeping visible.
    line = json.dumps({"step": step, "time": time.time(), **metrics}) + "\n"
    self._guard()
    if self._remote:
      self._lines.append(line)
    else:
      self._file.write(line)
      self._file.flush()

    from tensorboard.compat.proto import event_pb2, summary_pb2
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v)
                                         for k, v in metrics.items()])
    self._tb.add(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    self._add_to_series(step, metrics)
    if self.plot_every_s is not None and time.monotonic() - self._last_plot >= self.plot_every_s:
      self.plot()
    if self._remote and time.monotonic() - self._last_flush >= self.flush_every_s:
      self.flush()

  def flush(self) -> None:
    """Makes every record written so far durable: a no-op for a local workdir (each write is flushed); on an
    object store, uploads metrics.jsonl and the event file whole."""
    if not self.enabled or not self._remote or self._closed:
      return
    self._guard()
    self._last_flush = time.monotonic()
    paths.write_atomic(os.path.join(self.workdir, workdir_lib.METRICS), "".join(self._lines))
    self._tb.flush()

  def write_config(self, config: Any) -> None:
    """Saves the resolved config as config.json and config.txt (a ConfigDict or a plain dict)."""
    if self.enabled:
      self._guard()
      write_config(self.workdir, config)

  def plot(self) -> None:
    """Re-draws curves.png now (write() calls this at most every plot_every_s; close() always does)."""
    if not self.enabled:
      return
    self._last_plot = time.monotonic()
    if not self._dirty:
      return
    self._guard()
    self._dirty = False
    paths.write_atomic(os.path.join(self.workdir, workdir_lib.PLOT), _plot_png(self._series))

  def close(self) -> None:
    if not self.enabled or self._closed:
      return
    self._dirty = self._dirty or bool(self._series)
    self.plot()
    self.flush()
    self._closed = True
    if self._file is not None:
      self._file.close()
    self._tb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _plot_png(series: Mapping[str, tuple[list[int], list[float]]]) -> bytes:
  # Figure + the Agg canvas directly, not pyplot: no global backend switch, no figure registry to leak into.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(12, 4.5), dpi=100)
  FigureCanvasAgg(fig)
  ax_loss, ax_eval = fig.subplots(1, 2)
  losses = sorted(k for k in series if _is_loss(k))
  evals = sorted(k for k in series if _is_eval(k))
  positive = True
  for k in losses:
    steps, values = series[k]
    ax_loss.plot(steps, values, label=k, linewidth=1)
    positive &= all(v > 0 for v in values if math.isfinite(v))
  if losses and positive:
    ax_loss.set_yscale("log")  # losses span decades; a linear axis hides the late-training trend
  ax_loss.set_title("train loss")
  for k in evals:
    steps, values = series[k]
    ax_eval.plot(steps, values, label=k, marker="o", markersize=3, linewidth=1)
  ax_eval.set_title("eval")
  if not evals:
    ax_eval.text(0.5, 0.5, "no eval yet", ha="center", va="center", transform=ax_eval.transAxes)
  for ax, keys in ((ax_loss, losses), (ax_eval, evals)):
    ax.set_xlabel("step")
    ax.grid(True, which="both", alpha=0.3)
    if keys:
      ax.legend(fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return buf.getvalue()


def _fmt_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Progress:
  """Step progress on process 0: a tqdm bar on a terminal, plain lines in logs.

  update(step, images_per_step=..., loss=..., lr=...) after each step (or each few). Throughput is measured
  over a sliding window of recent calls; the first call only starts the clock, so compilation (done
  before it) does not count.
  Not a TTY: a line every ~10% of the run or every print_every_s seconds, whichever comes first, e.g.
    step 120/1000 (12%) loss 0.4312 lr 1.2e-04 531.2 img/s ETA 0:02:31
  """

  def __init__(self, total_steps: int, *, initial_step: int = 0, enabled: bool = True, desc: str = "train",
               print_every_s: float = 60, stream=None, window: int = 20):
    self.total = int(total_steps)
    self.enabled = enabled
    self.desc = desc
    self.print_every_s = print_every_s
    self.stream = stream if stream is not None else sys.stdout
    self._times = collections.deque(maxlen=window)  # (monotonic time, step)
    self._bar = None
    self._step = int(initial_step)
    self._last_print = time.monotonic()
    self._last_pct_bucket = self._bucket(initial_step)
    if not enabled:
      return
    isatty = getattr(self.stream, "isatty", None)
    if isatty is not None and isatty():
      from tqdm.auto import tqdm
      self._bar = tqdm(total=self.total, initial=int(initial_step), desc=desc, unit="step", file=self.stream,
                       dynamic_ncols=True, smoothing=0.1)

  def _bucket(self, step: int) -> int:
    return int(10 * step / max(self.total, 1))

  def steps_per_s(self) -> float | None:
    if len(self._times) < 2:
      return None
    (t0, s0), (t1, s1) = self._times[0], self._times[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

  def update(self, step: int, *, images_per_step: int, loss: float | None = None, lr: float | None = None) -> None:
    if not self.enabled:
      return
    step = int(step)
    now = time.monotonic()
    self._times.append((now, step))
    rate = self.steps_per_s()
    parts = []
    if loss is not None:
      parts.append(f"loss {float(loss):.4f}")
    if lr is not None:
      parts.append(f"lr {float(lr):.1e}")
    if rate is not None:
      parts.append(f"{rate * images_per_step:.1f} img/s")

    if self._bar is not None:
      self._bar.update(step - self._bar.n)  # tqdm's own ETA is shown by the bar
      self._bar.set_postfix_str(" ".join(parts), refresh=True)
      self._step = step
      return

    bucket = self._bucket(step)
    due = (bucket > self._last_pct_bucket or now - self._last_print >= self.print_every_s
           or step >= self.total)
    self._step = step
    if not due:
      return
    self._last_pct_bucket, self._last_print = bucket, now
    if rate is not None:
      parts.append(f"ETA {_fmt_duration((self.total - step) / rate)}")
    pct = 100 * step / max(self.total, 1)
    print(f"{self.desc}: step {step}/{self.total} ({pct:.0f}%) " + " ".join(parts), file=self.stream,
          flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
