"""CPU demo: a JumpReLU SAE recovers a known dictionary from synthetic superposition (~1 min)."""
from configs import base


def get_config():
  c = base.get_config()
  c.data.source = "synthetic"
  c.data.d_in = 64
  c.data.synthetic.n_rows = 262144
  c.data.synthetic.n_features = 128  # 2× overcomplete in D=64
  c.data.synthetic.mean_l0 = 4.0
  c.sae.width = 256
  c.sae.sparsity_coefficient = 0.02
  # At D=64 a feature's normalised pre-activation is ~0.3, far above the recipe's θ=0.001 (tuned
  # for D in the thousands): start near it (from 0.001 at lr 1e-3, θ itself needs ~300 Adam
  # steps to get there, log θ ~6,000).
  c.sae.threshold_init = 0.1
  c.optim.learning_rate = 1e-3  # a small model on clean data tolerates a larger step
  c.optim.lr_warmup_steps = 100
  c.optim.sparsity_warmup_steps = 1000
  c.train.batch_size = 1024
  c.train.num_steps = 4000
  c.train.log_every = 500
  c.train.checkpoint_every = 1000
  c.train.dead_window_tokens = 1_000_000
  return c
