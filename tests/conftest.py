"""Shared fixtures: a tiny config that trains in seconds on CPU."""
import pytest

from configs import synthetic


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
