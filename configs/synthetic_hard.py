"""The harder synthetic benchmark (issue 16, item 4): 256 true features in D=64 (4× overcomplete)
firing at power-law rates over two decades (0.4 down to 0.004 of rows), log-normal magnitudes
(log-σ 0.5), noise; SAEs of width 512. scripts/recovery.py trains every architecture and objective
on it at matched L0 and reports dictionary recovery.

  get_config()         4,000 steps of 1,024 (about a minute per SAE on 2 CPU cores)
  get_config("quick")  1,500 steps: the recovery script's fast mode
"""
import math

from configs import synthetic


def get_config(arg=None):
  c = synthetic.get_config()
  c.data.d_in = 64
  s = c.data.synthetic
  s.n_rows = 524288
  s.n_features = 256  # 4× overcomplete in D=64
  s.mean_l0 = 4.0
  s.freq_exponent = 2 / math.log10(s.n_features)  # rates ∝ i^−α span two decades
  s.magnitude_sigma = 0.5
  s.noise_std = 0.05
  c.sae.width = 512
  c.sae.target_l0 = 4.0  # the data's mean L0 (the generated set's measured L0 is ≈ 4.0)
  c.sae.k = 4
  c.sae.k_aux = 256
  c.sae.sparsity_coefficient = 0.02
  if arg == "quick":
    c.train.num_steps = 1500
    c.optim.sparsity_warmup_steps = 500
  elif arg is not None:
    raise ValueError(f"configs/synthetic_hard.py takes no argument or 'quick'; got {arg!r}")
  return c
