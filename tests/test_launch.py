"""launch/local.py reaches jax.distributed through the SLURM path; launch/sweep.py expands runs."""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("launch_local", os.path.join(ROOT, "launch", "local.py"))
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)

PROGRAM = """
import json, sys
sys.path.insert(0, {root!r})
from tinymim_jax import sharding
sharding.initialize_distributed()  # must see the fake SLURM job and call jax.distributed.initialize()

import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

n, i = jax.process_count(), jax.process_index()
ids = np.asarray(multihost_utils.process_allgather(np.int32(i))).tolist()
mesh = jax.make_mesh((jax.device_count(),), ("d",))
local = np.full((jax.local_device_count(),), i + 1, np.float32)  # process i contributes (i+1) per device
glob = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(glob)
print("RESULT " + json.dumps(dict(count=n, index=i, ids=ids, devices=jax.device_count(),
                                  local=jax.local_device_count(), sum=float(total))), flush=True)
"""


def _launch(args, timeout=180):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "local.py"), *args], env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_local_two_processes_via_slurm_path(tmp_path):
  prog = tmp_path / "prog.py"
  prog.write_text(PROGRAM.format(root=ROOT))
  res = _launch(["--num_processes", "2", "--devices_per_process", "2", "--timeout_s", "150", "--",
                 sys.executable, str(prog)])
  assert res.returncode == 0, res.stdout + res.stderr
  results = {}
  for line in res.stdout.splitlines():
    if "RESULT " in line:
      prefix, payload = line.split(" RESULT ", 1)
      r = json.loads(payload)
      assert prefix == f"[p{r['index']}]"  # output lines carry their process prefix
      results[r["index"]] = r
  assert sorted(results) == [0, 1], res.stdout
  for r in results.values():
    assert r["count"] == 2 and r["ids"] == [0, 1]
    assert r["local"] == 2 and r["devices"] == 4
    assert r["sum"] == 2 * 1 + 2 * 2


def test_local_failure_kills_others(tmp_path):
  code = ("import os, sys, time; r = int(os.environ['SLURM_PROCID']); print('up', r, flush=True); "
          "time.sleep(0.5); sys.exit(3) if r == 1 else time.sleep(120)")
  res = _launch(["-n", "2", "--", sys.executable, "-c", code], timeout=60)
  assert res.returncode == 3
  assert "[p0] up 0" in res.stdout and "[p1] up 1" in res.stdout
  assert "process 1 exited with 3" in res.stderr


def test_fake_slurm_env_matches_jax_slurm_cluster(monkeypatch):
  from jax._src.clusters.slurm_cluster import SlurmCluster
  job = local.pick_job_id()
  base = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "9", "JAX_COORDINATOR_ADDRESS": "x:1", "PATH": "/bin"}
  env = local.child_env(1, 3, job, devices_per_process=4, base=base)
  for k in list(os.environ):
    monkeypatch.delenv(k)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert "JAX_COORDINATOR_ADDRESS" not in env  # inherited job settings are replaced, not mixed
  assert SlurmCluster.is_env_present()
  port = SlurmCluster.get_coordinator_address(None, None).rsplit(":", 1)[1]
  assert SlurmCluster.get_coordinator_address(None, None) == f"localhost:{port}"
  assert int(port) == job % 4096 + local.SLURM_PORT_BASE
  assert (SlurmCluster.get_process_count(), SlurmCluster.get_process_id()) == (3, 1)
  assert "--xla_force_host_platform_device_count=4" in env["XLA_FLAGS"]
  gpu = local.child_env(1, 2, job, devices_per_process=2, platform="gpu", base=base)
  assert gpu["JAX_LOCAL_DEVICE_IDS"] == "2,3"


def _sweep(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sweep.py"), *args],
                        capture_output=True, text=True, timeout=60)


def test_sweep_dry_run_args_and_grid(tmp_path):
  root = str(tmp_path / "runs")
  res = _sweep("--config", "configs/distill.py", "--args", "vit_t,vit_s", "--grid", "optim.lr=1e-3,3e-3",
               "--grid", "config.total_epochs=100", "--set", "seed=1", "--workdir_root", root, "--dry_run",
               "--", "--config.eval_every=5")
  assert res.returncode == 0, res.stderr
  cmds = [line for line in res.stdout.splitlines() if not line.startswith("#")]
  assert len(cmds) == 4
  workdirs = [c.split("--workdir ")[1].split()[0] for c in cmds]
  assert len(set(workdirs)) == 4 and all(w.startswith(root + "/") for w in workdirs)
  assert os.path.join(root, "vit_s-optim.lr=3e-3-total_epochs=100") in workdirs
  for c in cmds:
    assert "-m tinymim_jax.main --config configs/distill.py:vit_" in c
    assert "--config.seed=1" in c and "--config.total_epochs=100" in c and c.endswith("--config.eval_every=5")
  assert sum("--config.optim.lr=1e-3" in c for c in cmds) == 2
  assert not os.path.exists(root)  # dry run touches nothing


def test_sweep_slurm_and_local_processes(tmp_path):
  res = _sweep("--config", "configs/distill.py", "--args", "a,b", "--workdir_root", str(tmp_path), "--dry_run",
               "--launcher", "slurm", "--sbatch_args=--nodes=2 --time=1:00:00")
  assert res.returncode == 0, res.stderr
  cmds = [line for line in res.stdout.splitlines() if not line.startswith("#")]
  assert len(cmds) == 2 and all(c.startswith("sbatch --job-name=tinymim-") for c in cmds)
  assert all("--nodes=2 --time=1:00:00" in c and "launch/slurm.sbatch --config configs/distill.py:" in c
             for c in cmds)
  res = _sweep("--config", "configs/distill.py", "--workdir_root", str(tmp_path), "--launcher", "print",
               "--local_processes", "2")
  cmds = [line for line in res.stdout.splitlines() if not line.startswith("#")]
  assert len(cmds) == 1 and "launch/local.py --num_processes 2 --" in cmds[0]
  assert f"--workdir {tmp_path}/distill" in cmds[0]


def test_sweep_rejects_colliding_workdirs(tmp_path):
  res = _sweep("--config", "c.py", "--args", "a,a", "--workdir_root", str(tmp_path), "--dry_run")
  assert res.returncode != 0 and "share a workdir" in res.stderr


@pytest.mark.parametrize("script", ["slurm.sbatch", "tpu_pod.sh"])
def test_shell_scripts_parse(script):
  subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", script)], check=True)


# ---------------------------------------------------------------------------------------------------------
# Exit status 75: the run saved a checkpoint and needs a rerun (tinymim_jax.main.EXIT_PREEMPTED).
# ---------------------------------------------------------------------------------------------------------
def test_local_reports_and_returns_the_preempted_status(tmp_path):
  # Both processes save and exit 75, one later than the other: not a failure, nobody is killed.
  code = ("import os, sys, time; r = int(os.environ['SLURM_PROCID']); time.sleep(0.2 + 1.5 * r); "
          "print('saved', r, flush=True); sys.exit(75)")
  res = _launch(["-n", "2", "--", sys.executable, "-c", code], timeout=60)
  assert res.returncode == local.PREEMPTED == 75, res.stdout + res.stderr
  assert "[p0] saved 0" in res.stdout and "[p1] saved 1" in res.stdout
  assert "exited with 75 (saved)" not in res.stderr and "stopping the others" not in res.stderr
  assert "rerun the same command to resume" in res.stderr


def test_local_passes_sigterm_on_and_returns_75(tmp_path):
  code = ("import os, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); "
          "print('up', flush=True); time.sleep(60)")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "local.py"), "-n", "2", "--",
                           sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  lines = 0
  for line in proc.stdout:
    lines += "up" in line
    if lines == 2:
      break
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 75, out + err
  assert "SIGTERM: passing it on" in err and "rerun the same command to resume" in err


def _fake_bin(tmp_path, name, body):
  path = tmp_path / "bin" / name
  path.parent.mkdir(exist_ok=True)
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(0o755)
  return path


@pytest.mark.parametrize("status,requeued", [(75, True), (0, False), (3, False)])
def test_slurm_requeues_a_preempted_run(tmp_path, status, requeued):
  # srun runs the task command as task 0; scontrol records its arguments; the "python" exits with `status`.
  _fake_bin(tmp_path, "srun", 'while [[ "$1" == --* ]]; do shift; done\nSLURM_PROCID=0 exec "$@"\n')
  _fake_bin(tmp_path, "scontrol", f'echo "$@" > {tmp_path}/scontrol.args\n')
  python = _fake_bin(tmp_path, "python", f'echo "python $*"\nexit {status}\n')
  env = {**os.environ, "PATH": f"{tmp_path}/bin:{os.environ['PATH']}", "PYTHON": str(python),
         "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "1",
         "TMPDIR": str(tmp_path)}
  res = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "--config", "c.py", "--workdir", "w"],
                       env=env, capture_output=True, text=True, timeout=60)
  assert "python -m tinymim_jax.main --config c.py --workdir w" in res.stdout
  assert res.returncode == status, res.stdout + res.stderr
  assert os.path.exists(tmp_path / "scontrol.args") == requeued
  if requeued:
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert "requeueing to resume" in res.stdout
  assert not os.path.exists(tmp_path / "tinymim-preempted-4242")


@pytest.mark.parametrize("statuses,expected", [((75, 75), 75), ((0, 0), 0), ((75, 1), 1)])
def test_tpu_pod_run_reports_the_preempted_status(tmp_path, statuses, expected):
  lines = "".join(f'echo "w{i}: tinymim exit status {s}"\n' for i, s in enumerate(statuses))
  _fake_bin(tmp_path, "gcloud", lines + f"exit {int(any(statuses))}\n")  # says nothing about each worker
  env = {**os.environ, "PATH": f"{tmp_path}/bin:{os.environ['PATH']}", "TPU": "t", "ZONE": "z"}
  res = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "run", "--config", "c.py"], env=env,
                       capture_output=True, text=True, timeout=60)
  assert res.returncode == expected, res.stdout + res.stderr
  assert ("rerun the same command to resume" in res.stderr) == (expected == 75)
