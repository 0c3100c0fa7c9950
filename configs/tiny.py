"""Test size: every config the suite uses, shrunk to train in seconds on one CPU device.

  get_config()           synthetic superposition, D=16, F=64, 12 steps of 64
  get_config("harvest")  the same SAE on a store harvested from a tiny 2-layer LM (tests/tiny_lm.py)
  get_config("live")     the same, streamed live from that LM
Tests override single keys on top, as a researcher does with --config.KEY=VALUE.
"""
from configs import synthetic


def get_config(arg=None):
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
  if arg in ("harvest", "live"):
    c.data.source = arg
    c.lm.site = "resid_post.1"  # the tiny LM has 2 blocks of width 16
    c.lm.context_len = 16
    c.lm.batch_contexts = 4
    c.harvest.num_tokens = 700
    c.harvest.shard_tokens = 128
    c.eval.num_contexts = 2
    c.eval.skip_contexts = 100
  if arg == "live":
    c.data.live_chunk_contexts = 8
    c.data.live_chunk_steps = 3
    c.train.batch_size = 32
    c.data.norm_rows = 64
  elif arg not in (None, "harvest"):
    raise ValueError(f"configs/tiny.py takes no argument, 'harvest' or 'live'; got {arg!r}")
  return c
