"""Test set-up: 8 fake CPU devices and no network, fixed before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")


def _compilation_cache():
  """JAX's persistent compilation cache in a directory of this test run (as the study runner keeps one per study:
  tinymim_jax/study.py): the tiny runs compile the same steps and evals again and again (a resume, a second run of
  the same config, a subprocess of the CLI), and a cached executable is the one XLA compiled, so no result
  changes. Each pytest process (each xdist worker) makes its own, which the subprocesses its tests start read
  from its environment; removed when that process exits. A cache set outside is used as is."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  import atexit
  import shutil
  import tempfile
  path = tempfile.mkdtemp(prefix="tinymim_test_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")  # the many small evals too
  owner = os.getpid()  # a forked child inherits the handler: only the process that made the cache removes it
  atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))


_compilation_cache()

# torchvision / timm / triton segfault when imported after TensorFlow on this stack; the reverse order is fine.
# Tests import both, so the torch side goes first in every test process (when the dev extras are installed).
try:
  import timm  # noqa: F401,E402  (imports torch and torchvision)
except ImportError:
  pass


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def teacher_root(tmp_path_factory):
  """A tiny finished MAE teacher run (the first digits demo stage: 12 steps, checkpoints 4, 8, 12), trained once
  per test run (shared by the xdist workers), in-process, under <root>/teacher_mae. Tests that resume or damage
  it work on a copy (tests/helpers/faults.copy_run)."""
  import fcntl
  from test_main import tiny_config
  from tinymim_jax import main as trainer
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # <run's basetemp>/popen-gwN: the parent is this run's, shared
    base = base.parent
  root = base / "teacher_demo"
  with open(base / "teacher_demo.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker trains it, the others wait and reuse it
    if not (root / "teacher_mae" / "done.json").exists():
      res = trainer.train_and_evaluate(tiny_config("teacher_mae", str(root), total_steps=12, ckpt_every_steps=4),
                                       str(root / "teacher_mae"))
      assert res["step"] == 12 and 0 < res["eval/knn_top1"] <= 1
  return str(root)


@pytest.fixture(scope="session")
def distilled_root(teacher_root, tmp_path_factory):
  """The digits demo's second stage on teacher_root's teacher: a tiny TinyMIM student (6 steps, one checkpoint,
  final evals), trained once per test run as teacher_root is, under <root>/student_distill, with
  <root>/teacher_mae linking to the teacher. Tests that build on it link both into a root of their own;
  train_and_evaluate on the finished workdir returns its final metrics (done.json)."""
  import fcntl
  from test_main import tiny_config
  from tinymim_jax import main as trainer
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  root = base / "distilled_demo"
  with open(base / "distilled_demo.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / "student_distill" / "done.json").exists():
      root.mkdir(exist_ok=True)
      if not (root / "teacher_mae").exists():
        os.symlink(os.path.join(teacher_root, "teacher_mae"), root / "teacher_mae")
      res = trainer.train_and_evaluate(tiny_config("student_distill", str(root), total_steps=6, ckpt_every_steps=6),
                                       str(root / "student_distill"))
      assert res["step"] == 6
  return str(root)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A GCS JSON-API server on a free loopback port (tests/helpers/gcs_emulator.py: gcp-storage-emulator in memory,
  with GCS's request preconditions) holding the bucket 'tinymim', started once and stopped at the end of the
  session. This process's clients, and the subprocesses it starts (through os.environ), point at it without
  credentials; nothing leaves the machine. -> 'gs://tinymim'."""
  import fsspec
  from tests.helpers import gcs_emulator
  proc, env = gcs_emulator.start("tinymim", str(tmp_path_factory.mktemp("gcs") / "emulator.log"))
  mp = pytest.MonkeyPatch()
  try:
    for k, v in env.items():
      mp.setenv(k, v)
    # fsspec read its FSSPEC_* variables when imported (before this fixture): gcsfs's anonymous token set here.
    mp.setitem(fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}), "token": "anon"})
    _epath_backend_changed()  # epath caches its choice (tf.io.gfile) at its first path, maybe earlier in the session
    yield "gs://tinymim"
  finally:
    mp.undo()
    _epath_backend_changed()
    gcs_emulator.stop(proc)


def _epath_backend_changed():
  """Makes etils epath read EPATH_USE_TF again: it caches whether to route gs:// to tf.io.gfile (which ignores the
  emulator) on first use. A private cache of etils; a test of the route (tests/test_gcs.py) fails if it moves."""
  from etils.epath import gpath
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
