"""What the benchmarks ran on: hardware, software, and the exact code."""

import datetime
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any, Optional

import jax

_PACKAGES = ('jax', 'jaxlib', 'optax', 'flax', 'orbax-checkpoint', 'numpy')


def _cpu_model() -> str:
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _memory_gib() -> Optional[float]:
  try:
    for line in pathlib.Path('/proc/meminfo').read_text().splitlines():
      if line.startswith('MemTotal:'):
        return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return None


def _usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def _git(*args: str) -> Optional[str]:
  root = pathlib.Path(__file__).resolve().parent.parent
  try:
    return subprocess.run(
        ['git', *args], cwd=root, capture_output=True, text=True, check=True,
        timeout=10,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'


def describe() -> dict[str, Any]:
  """A JSON-ready description of this machine and this checkout."""
  devices = jax.devices()
  load = os.getloadavg() if hasattr(os, 'getloadavg') else None
  status = _git('status', '--porcelain')
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'cpu': _cpu_model(),
      'cores': os.cpu_count(),
      'usable_cores': _usable_cores(),
      'memory_gib': _memory_gib(),
      'load_average_at_start': list(load) if load else None,
      'platform': platform.platform(),
      'python': sys.version.split()[0],
      'versions': {package: _version(package) for package in _PACKAGES},
      'backend': jax.default_backend(),
      'devices': [f'{d.platform}:{d.id} {d.device_kind}' for d in devices],
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'git_commit': _git('rev-parse', '--short', 'HEAD'),
      'git_dirty': bool(status) if status is not None else None,
  }
