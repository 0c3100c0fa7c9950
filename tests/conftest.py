"""Shared fixtures: a tiny config that trains in seconds on CPU.

Eight CPU devices are faked for the whole suite (before jax is imported anywhere) so sharded
meshes can be tested; single-device tests use the first device.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

from configs import synthetic  # noqa: E402


def tiny(**overrides):
  """The synthetic config shrunk to test size; overrides are 'section.key' -> value."""
  c = synthetic.get_config()
  c.data.d_in = 16
  c.data.synthetic.n_rows = 4096
  c.data.synthetic.n_features = 32
  c.data.synthetic.mean_l0 = 3.0
  c.data.norm_rows = 1024
  c.sae.width = 64
  c.train.batch_size = 64
  c.train.num_steps = 12
  c.train.log_every = 4
  c.train.checkpoint_every = 5
  c.train.keep_checkpoints = 5
  c.mesh.data = 1
  c.mesh.model = 1
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture
def tiny_config():
  return tiny


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
