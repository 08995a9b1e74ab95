#!/usr/bin/env python3
"""Runs N processes of one command on this host, as if srun had started them.

Usage:
  python launch/local.py --num_processes 2 [--devices_per_process 4] [--platform cpu|gpu] \
      -- python -m tinymim_jax.main --config configs/X.py:arg --workdir /tmp/run

Each child gets the SLURM variables of a one-node, N-task job step (see fake_slurm_env), so
tinymim_jax.sharding.initialize_distributed() -> jax.distributed.initialize() goes through jax's own
SlurmCluster auto-detection, exactly as under a real `srun`. The coordinator is process 0 on
localhost:<port>; jax derives the port from SLURM_JOB_ID (job_id % 4096 + 61440), so we pick a free port
in that range and a job id that maps to it.

--platform cpu (default): JAX_PLATFORMS=cpu and --xla_force_host_platform_device_count=<devices_per_process>
  fake devices per process; cross-process collectives run over gloo.
--platform gpu: process i drives GPUs [i*d, (i+1)*d) (JAX_LOCAL_DEVICE_IDS); with d=1 that is jax's own
  SLURM default, GPU i = SLURM_LOCALID.

Output lines are prefixed [p0], [p1], ... If any child fails, the others are killed and this exits with the
failing child's status. Status 75 (tinymim_jax.main: stopped by SIGTERM after saving a checkpoint, needs a
rerun) is not a failure: the others get PREEMPT_GRACE_S to finish the same way, and this reports it and exits 75.
A SIGTERM to this launcher is passed on to the children (they save and exit 75); a second one, or SIGINT, kills
them.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

PREEMPTED = 75  # tinymim_jax.main.EXIT_PREEMPTED (os.EX_TEMPFAIL): saved, rerun to resume
PREEMPT_GRACE_S = 300.0

# jax's SlurmCluster: port = int(SLURM_JOB_ID) % 2**12 + (65535 - 2**12 + 1).
SLURM_PORT_BASE = 65535 - 2**12 + 1

# Inherited variables that would make a child join some other job (e.g. when run inside a SLURM allocation).
_STRIP_PREFIXES = ("SLURM_", "SLURMD_", "OMPI_COMM_WORLD_", "PMI_", "PMIX_")
_STRIP = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")


def _port_free(port: int) -> bool:
  # The coordinator binds [::]:port (all addresses), so check the same way, falling back to IPv4.
  for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((addr, port))
      return True
    except OSError as e:
      if family == socket.AF_INET6 and e.errno in (97, 99):  # no IPv6 on this host
        continue
      return False
  return False


def pick_job_id(port: int | None = None) -> int:
  """A fake SLURM job id whose jax-derived coordinator port is free (or is `port`)."""
  if port is None:
    rng = random.Random()
    for _ in range(200):
      p = rng.randrange(SLURM_PORT_BASE, 65536)
      if _port_free(p):
        port = p
        break
    else:
      raise RuntimeError(f"no free port in [{SLURM_PORT_BASE}, 65535] for the jax coordinator")
  if not SLURM_PORT_BASE <= port <= 65535:
    raise ValueError(f"the SLURM path derives ports in [{SLURM_PORT_BASE}, 65535]; got {port}")
  # A realistic-looking id (real ones are large) that maps to the port.
  return 4096 * random.randrange(100, 2000) + (port - SLURM_PORT_BASE)


def fake_slurm_env(rank: int, num_processes: int, job_id: int, host: str = "localhost") -> dict[str, str]:
  """The variables srun sets for task `rank` of a one-node job step with num_processes tasks.

  jax's SlurmCluster reads SLURM_JOB_ID (-> port), SLURM_STEP_NODELIST (first host -> coordinator),
  SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID (and SLURM_STEP_NUM_NODES); the rest are what srun also sets,
  for code that looks at them (sharding.initialize_distributed reads SLURM_NTASKS / SLURM_NPROCS).
  """
  n = str(num_processes)
  return {
      "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_JOB_NAME": "local",
      "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
      "SLURM_NTASKS": n, "SLURM_NPROCS": n, "SLURM_STEP_NUM_TASKS": n,
      "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
      "SLURM_GTIDS": ",".join(str(i) for i in range(num_processes)),
      "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_STEP_NUM_NODES": "1",
      "SLURM_STEP_NODELIST": host, "SLURM_JOB_NODELIST": host, "SLURM_NODELIST": host,
      "SLURMD_NODENAME": host, "SLURM_TOPOLOGY_ADDR": host,
      "SLURM_TASKS_PER_NODE": n, "SLURM_STEP_TASKS_PER_NODE": n, "SLURM_NTASKS_PER_NODE": n,
  }


def child_env(rank: int, num_processes: int, job_id: int, *, devices_per_process: int = 1,
              platform: str = "cpu", host: str = "localhost", base: dict[str, str] | None = None) -> dict[str, str]:
  env = dict(os.environ if base is None else base)
  for k in list(env):
    if k.startswith(_STRIP_PREFIXES) or k in _STRIP:
      del env[k]
  env.update(fake_slurm_env(rank, num_processes, job_id, host))
  env["PYTHONUNBUFFERED"] = "1"  # lines reach the [pN] prefixer as they are printed
  if platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  elif platform == "gpu":
    d = devices_per_process
    env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(i) for i in range(rank * d, (rank + 1) * d))
  else:
    raise ValueError(f"platform must be cpu or gpu, got {platform!r}")
  return env


def _pump(rank: int, stream, lock: threading.Lock) -> None:
  prefix = f"[p{rank}] ".encode()
  out = sys.stdout.buffer
  for line in iter(stream.readline, b""):
    with lock:
      out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
      out.flush()
  stream.close()


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
  """`sig` to each running child's process group (a child may have children)."""
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:
        pass


def _kill_all(procs: list[subprocess.Popen], grace_s: float = 10) -> None:
  """SIGTERM each child's process group, SIGKILL what is left after grace_s."""
  _signal_all(procs, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def _rc(code: int) -> int:
  return 128 - code if code < 0 else code  # killed by signal s -> 128 + s, like a shell


def run(command: list[str], num_processes: int, *, devices_per_process: int = 1, platform: str = "cpu",
        host: str = "localhost", port: int | None = None, timeout_s: float | None = None) -> int:
  job_id = pick_job_id(port)
  print(f"[local] {num_processes} processes, fake SLURM job {job_id} -> coordinator "
        f"{host}:{job_id % 4096 + SLURM_PORT_BASE}", flush=True)
  lock = threading.Lock()
  procs, pumps = [], []
  for rank in range(num_processes):
    env = child_env(rank, num_processes, job_id, devices_per_process=devices_per_process,
                    platform=platform, host=host)
    # Own session: killing a child's group also ends anything it started, and a Ctrl-C on the terminal
    # reaches the children only through us (no half-forwarded signals).
    p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    procs.append(p)
    t = threading.Thread(target=_pump, args=(rank, p.stdout, lock), daemon=True)
    t.start()
    pumps.append(t)

  forwarded = []

  def on_signal(signum, _):
    if signum == signal.SIGTERM and not forwarded:  # preemption: let the run save and exit 75
      forwarded.append(True)
      print("[local] SIGTERM: passing it on (the run saves a checkpoint and stops)", file=sys.stderr, flush=True)
      _signal_all(procs, signal.SIGTERM)
      return
    _kill_all(procs)
    sys.exit(128 + signum)
  signal.signal(signal.SIGINT, on_signal)
  signal.signal(signal.SIGTERM, on_signal)

  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  preempt_deadline = None
  rc = 0
  while True:
    codes = [p.poll() for p in procs]
    failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0, PREEMPTED)]
    if failed:
      i, c = failed[0]
      print(f"[local] process {i} exited with {c}; stopping the others", file=sys.stderr, flush=True)
      _kill_all(procs)
      rc = _rc(c)
      break
    if all(c is not None for c in codes):
      if PREEMPTED in codes:
        rc = PREEMPTED
        print(f"[local] the run stopped after saving a checkpoint (exit status {PREEMPTED}): rerun the same "
              "command to resume", file=sys.stderr, flush=True)
      break
    if PREEMPTED in codes:
      preempt_deadline = preempt_deadline or time.monotonic() + PREEMPT_GRACE_S
      if time.monotonic() > preempt_deadline:
        print(f"[local] a process exited with {PREEMPTED} (saved) but others did not follow within "
              f"{PREEMPT_GRACE_S:.0f}s; stopping them", file=sys.stderr, flush=True)
        _kill_all(procs)
        rc = PREEMPTED
        break
    if deadline is not None and time.monotonic() > deadline:
      print(f"[local] timeout after {timeout_s}s; killing all processes", file=sys.stderr, flush=True)
      _kill_all(procs)
      rc = 124
      break
    time.sleep(0.1)
  for t in pumps:
    t.join(timeout=5)
  return rc


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if "--" not in argv:
    print(__doc__, file=sys.stderr)
    raise SystemExit("launch/local.py: put the command after '--'")
  split = argv.index("--")
  parser = argparse.ArgumentParser(description="Run N fake-SLURM processes on this host.")
  parser.add_argument("--num_processes", "-n", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--host", default="localhost", help="coordinator host (SLURM_STEP_NODELIST)")
  parser.add_argument("--port", type=int, default=None,
                      help=f"coordinator port in [{SLURM_PORT_BASE}, 65535]; default: a free one")
  parser.add_argument("--timeout_s", type=float, default=None, help="kill everything after this long")
  args = parser.parse_args(argv[:split])
  command = argv[split + 1:]
  if not command:
    parser.error("no command after '--'")
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be >= 1")
  return run(command, args.num_processes, devices_per_process=args.devices_per_process,
             platform=args.platform, host=args.host, port=args.port, timeout_s=args.timeout_s)


if __name__ == "__main__":
  sys.exit(main())
