"""Shared fixtures: configs/tiny.py with overrides, and a simulated kill.

Eight CPU devices are faked for the whole suite (before jax is imported anywhere) so sharded
meshes can be tested; single-device tests use the first device.
"""
import atexit
import os
import shutil
import socket
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
# One persistent compilation cache for the run, shared by the xdist workers and every process a
# test starts (they inherit the environment): the suite compiles the same tiny programs many
# times over (reruns after a kill, fresh jits of one config), and a hit skips XLA's compile.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jumprelu-test-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from configs import tiny as tiny_config_module  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "multiprocess: starts several JAX processes that talk over loopback "
      "(jax.distributed); part of the suite and of CI, selectable with -m multiprocess")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def process_env(devices: int, **extra) -> dict:
  """The environment of a JAX process a multi-process test starts: `devices` faked CPU devices,
  this checkout importable, and any extra variables."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def free_port() -> int:
  """A loopback port nobody listens on, for jax.distributed's coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tiny(arg=None, /, **overrides):
  """configs/tiny.py's config (arg: None, "harvest" or "live"); overrides are 'section.key' ->
  value."""
  c = tiny_config_module.get_config(arg)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def killed_then_resumed(monkeypatch, run, step: int = 8):
  """Runs `run()` with the data source dying at `step` (a simulated kill: after the checkpoint
  at 5, before the one at 10 in tiny configs), then again undisturbed; returns the second run's
  result. `run` must resume from what the first left on disk."""
  from jumprelu import data  # after XLA_FLAGS is set above

  real_batch = data.ActivationSource.batch

  def dies(self, at, *args, **kw):
    if at == step:
      raise KeyboardInterrupt("simulated kill")
    return real_batch(self, at, *args, **kw)

  monkeypatch.setattr(data.ActivationSource, "batch", dies)
  with pytest.raises(KeyboardInterrupt):
    run()
  monkeypatch.setattr(data.ActivationSource, "batch", real_batch)
  return run()
