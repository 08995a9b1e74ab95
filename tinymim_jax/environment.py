"""The machine and the library versions a run or a benchmark ran on, described once for run.json, the
benchmarks' and the study's reports."""

from __future__ import annotations

import importlib.metadata
import os
import platform


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else the platform's processor string, else 'unknown CPU'."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def cores() -> int:
  """The CPU cores this process may run on (its affinity where the OS has one, else the machine's count)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine(devices: str | None = None) -> str:
  """'<CPU model>, <cores> cores, <RAM> GiB RAM, <OS> <arch>' (plus '; devices: <devices>')."""
  try:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError, AttributeError):
    mem = float("nan")
  s = f"{cpu_model()}, {cores()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.machine()}"
  return s + (f"; devices: {devices}" if devices else "")


def versions(packages=("jax", "jaxlib", "flax", "optax", "numpy")) -> dict[str, str]:
  """{'python': its version, package: its installed version, or '-' when it is not installed}, read from the
  installed distributions' metadata (nothing is imported)."""
  out = {"python": platform.python_version()}
  for name in packages:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "-"
  return out


def jax_devices() -> str:
  """'<count> x <device kind>' of the JAX devices (imports jax)."""
  import jax  # pylint: disable=g-import-not-at-top  (the reports that do not run JAX need not load it)
  return f"{jax.device_count()} x {jax.devices()[0].device_kind}"
