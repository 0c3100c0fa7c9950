"""Gemma 2 9B, layer 20 residual stream, 131k-wide JumpReLU SAE: the full Gemma Scope recipe.

Reads activations harvested to a local directory of .npy shards [N, 3584]:
  python experiments/train.py --config=configs/gemma9b_l20.py --workdir=DIR \
      --config.data.path=/path/to/gemma2_9b_l20_resid_post
"""
from configs import base


def get_config():
  c = base.get_config()
  c.data.source = "npy"
  c.data.path = ""  # required: a directory of harvested [N, 3584] activation shards
  c.data.d_in = 3584  # Gemma 2 9B d_model
  c.data.norm_rows = 1_000_000
  c.sae.width = 131072  # 2^17
  c.sae.sparsity_coefficient = 1e-3  # sweep with --config.sae.sparsity_coefficient=...
  c.sae.bandwidth = 0.001
  c.sae.threshold_init = 0.001
  c.optim.learning_rate = 7e-5
  c.optim.lr_warmup_steps = 1000
  c.optim.sparsity_warmup_steps = 10000
  c.train.batch_size = 4096
  # 8B tokens: between the report's 4B (16k wide) and 16B (1M wide) budgets.
  c.train.num_steps = 8_000_000_000 // 4096
  c.train.log_every = 1000
  c.train.checkpoint_every = 20000
  c.train.dead_window_tokens = 10_000_000
  # Above 16k wide Gemma Scope split the dictionary across devices (tensor parallel).
  c.mesh.data = 1
  c.mesh.model = -1
  return c
