"""MetricWriter (JSONL, TensorBoard without TF, PNG, config, resume) and Progress."""

import io
import json
import os
import re
import struct
import sys
import time

import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

# TensorBoard's reader goes through tensorboard.compat.tf, which imports TensorFlow (seconds) when installed;
# this module's presence is tensorboard's own switch to its TF-free stub (its //tensorboard/compat:no_tensorflow).
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

from tinymim_jax import workdir as workdir_lib, writers  # noqa: E402


def _read_records(workdir):
  """Scalar (tag, step, value) from the raw event files: the TFRecord framing parsed by hand, no TensorFlow."""
  from tensorboard.compat.proto import event_pb2
  out = []
  tb = os.path.join(workdir, workdir_lib.TENSORBOARD)
  for name in sorted(os.listdir(tb)):
    data = open(os.path.join(tb, name), "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      out += [(v.tag, ev.step, v.simple_value) for v in ev.summary.value]
  return out


def _scalars(workdir):
  """The same through TensorBoard's own reader (which also applies the purge of orphaned steps)."""
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, workdir_lib.TENSORBOARD),
                                           size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_tensorboard_png(tmp_path):
  wd = str(tmp_path)
  with writers.MetricWriter(wd, plot_every_s=0) as w:
    for s in range(1, 6):
      w.write(s, {"train/loss": np.float32(1.0 / s), "train/loss_fkd": 0.5 / s, "train/lr": 1e-4 * s})
    w.write(5, {"eval/knn_top1": 0.25})
  recs = writers.read_metrics(wd)
  assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 5]
  assert recs[1]["train/loss"] == pytest.approx(0.5) and recs[-1]["eval/knn_top1"] == 0.25
  assert all(abs(r["time"] - time.time()) < 60 for r in recs)
  with open(os.path.join(wd, workdir_lib.METRICS)) as f:
    assert all(json.loads(line) for line in f)  # one object per line

  raw = _read_records(wd)
  assert len(raw) == 16 and ("train/lr", 3, pytest.approx(3e-4)) in raw
  sc = _scalars(wd)
  assert set(sc) == {"train/loss", "train/loss_fkd", "train/lr", "eval/knn_top1"}
  assert [s for s, _ in sc["train/loss"]] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([v for _, v in sc["train/loss"]], [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5], rtol=1e-6)
  assert sc["eval/knn_top1"] == [(5, 0.25)]

  png = os.path.join(wd, workdir_lib.PLOT)
  with Image.open(png) as im:
    assert im.format == "PNG" and im.size == (1200, 450)
  assert not [f for f in os.listdir(wd) if f.endswith(".tmp")]  # atomic writes leave no temp files


def test_plot_throttled(tmp_path):
  wd = str(tmp_path)
  w = writers.MetricWriter(wd, plot_every_s=3600)
  w.write(1, {"train/loss": 1.0})  # the first write draws
  png = os.path.join(wd, workdir_lib.PLOT)
  first = os.path.getmtime(png)
  os.utime(png, (first - 100, first - 100))
  w.write(2, {"train/loss": 0.5})  # within plot_every_s: not re-drawn
  assert os.path.getmtime(png) == first - 100
  w.close()  # close always re-draws
  assert os.path.getmtime(png) > first - 100


def test_write_config(tmp_path):
  cfg = ml_collections.ConfigDict({"model": {"name": "vit_tiny_patch16"}, "lr": 1e-3, "shape": (1, 2)})
  with writers.MetricWriter(str(tmp_path)) as w:
    w.write_config(cfg)
  assert json.loads((tmp_path / "config.json").read_text()) == {"model": {"name": "vit_tiny_patch16"},
                                                               "lr": 1e-3, "shape": [1, 2]}
  assert "vit_tiny_patch16" in (tmp_path / "config.txt").read_text()
  with writers.MetricWriter(str(tmp_path / "d")) as w:
    w.write_config({"a": 1})
  assert json.loads((tmp_path / "d" / "config.json").read_text()) == {"a": 1}


def test_resume_truncates_and_appends(tmp_path):
  wd = str(tmp_path)
  with writers.MetricWriter(wd) as w:
    for s in range(1, 11):
      w.write(s * 10, {"train/loss": 1.0 / s})
  # A crash after the checkpoint at step 50 while a line was half written.
  with open(os.path.join(wd, workdir_lib.METRICS), "a") as f:
    f.write('{"step": 110, "train/lo')
  with writers.MetricWriter(wd, resume_step=50) as w:
    assert [r["step"] for r in writers.read_metrics(wd)] == [10, 20, 30, 40, 50]
    w.write(60, {"train/loss": 0.123})
  recs = writers.read_metrics(wd)
  assert [r["step"] for r in recs] == [10, 20, 30, 40, 50, 60]
  assert recs[-1]["train/loss"] == 0.123
  # TensorBoard drops the orphaned steps 60..100 of the first run (SessionLog.START at 51).
  steps = [s for s, _ in _scalars(wd)["train/loss"]]
  assert steps == [10, 20, 30, 40, 50, 60]
  assert [v for s, v in _scalars(wd)["train/loss"] if s == 60] == [pytest.approx(0.123)]


def test_resume_without_step_keeps_everything(tmp_path):
  wd = str(tmp_path)
  with writers.MetricWriter(wd) as w:
    w.write(1, {"train/loss": 1.0})
  with open(os.path.join(wd, workdir_lib.METRICS), "a") as f:
    f.write('{"step": 2')  # torn line, no newline: the next record must still start on its own line
  with writers.MetricWriter(wd) as w:
    w.write(3, {"train/loss": 0.5})
  assert [r["step"] for r in writers.read_metrics(wd)] == [1, 3]


def test_disabled_writes_nothing(tmp_path):
  wd = tmp_path / "wd"
  with writers.MetricWriter(str(wd), enabled=False) as w:
    w.write(1, {"train/loss": 1.0})
    w.write_config({"a": 1})
    w.plot()
  assert not wd.exists()
  assert writers.read_metrics(str(wd)) == []


class _FakeClock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    return self.t


def test_progress_plain_lines(monkeypatch):
  clock = _FakeClock()
  monkeypatch.setattr(writers.time, "monotonic", clock)
  out = io.StringIO()  # not a TTY
  p = writers.Progress(1000, stream=out, print_every_s=1e9)
  for step in range(1, 1001):
    clock.t += 0.5 if step == 1 else 0.1  # the first call includes compilation: not counted
    p.update(step, images_per_step=64, loss=1.0 / step, lr=1.2e-4)
  p.close()
  lines = out.getvalue().splitlines()
  assert len(lines) == 10, lines  # ~every 10%
  assert lines[0].startswith("train: step 100/1000 (10%) loss 0.0100 lr 1.2e-04 640.0 img/s ETA ")
  m = re.search(r"ETA (\d+):(\d\d):(\d\d)$", lines[0])
  assert m and int(m[2]) * 60 + int(m[3]) == 90  # 900 steps left at 10 steps/s
  assert lines[-1].startswith("train: step 1000/1000 (100%)") and lines[-1].endswith("ETA 0:00:00")


def test_progress_time_based_and_resume(monkeypatch):
  clock = _FakeClock()
  monkeypatch.setattr(writers.time, "monotonic", clock)
  out = io.StringIO()
  p = writers.Progress(10**6, initial_step=500, stream=out, print_every_s=30)
  for step in range(501, 561):
    clock.t += 1.0
    p.update(step, images_per_step=8)
  # 60 s of steps, far below 10% of the run: one line each 30 s.
  lines = out.getvalue().splitlines()
  assert len(lines) == 2 and "8.0 img/s" in lines[0] and lines[0].startswith("train: step 530/1000000 (0%)")


def test_progress_disabled_and_tty(monkeypatch):
  out = io.StringIO()
  p = writers.Progress(10, enabled=False, stream=out)
  p.update(1, images_per_step=1, loss=1.0)
  p.close()
  assert out.getvalue() == ""

  class Tty(io.StringIO):
    def isatty(self):
      return True
  tty = Tty()
  with writers.Progress(10, stream=tty, desc="distill") as p:
    for s in range(1, 11):
      p.update(s, images_per_step=4, loss=0.5)
  text = tty.getvalue()
  assert "distill" in text and "10/10" in text and "loss 0.5000" in text


def test_no_tensorflow_import():
  # The writer must not pull TensorFlow in (only tinymim_jax.data may).
  import subprocess
  code = ("import sys, tempfile; from tinymim_jax import writers; d = tempfile.mkdtemp(); "
          "w = writers.MetricWriter(d); w.write(1, {'train/loss': 1.0}); w.close(); "
          "print(any(m == 'tensorflow' or m.startswith('tensorflow.') for m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
