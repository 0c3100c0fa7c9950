"""The comparison on SmolLM2-135M: one architecture's sparsity sweep, trained as one ensemble.

  python experiments/train.py --config=configs/smollm2_sweep.py:ARCH --workdir=DIR \
      [--config.lm.site=resid_post.22] [--config.data.path=STORE]
ARCH: jumprelu | relu | gated | topk (four sparsities each), or eps: JumpReLU's bandwidth ε
swept at a fixed λ. Same data, width, steps and optimiser as every other arch; only the
sparsity knob differs. scripts/reproduce.sh runs the whole comparison.
"""
from configs import smollm2_135m

# Four sparsity levels per architecture, spanning roughly L0 10–100 at width 1024 (chosen with
# short calibration runs; the λ of each architecture penalises a different quantity).
SWEEPS = {
    "jumprelu": {"sparsity_coefficient": (3e-4, 1e-3, 3e-3, 1e-2)},  # L0 penalty
    "relu": {"sparsity_coefficient": (0.04, 0.07, 0.12, 0.2)},  # L1 penalty
    "gated": {"sparsity_coefficient": (0.05, 0.1, 0.2, 0.3)},  # L1 penalty on the gate
    "topk": {"k": (8, 16, 32, 64)},
    "eps": {"bandwidth": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)},  # JumpReLU at λ = 1e-3
}


def get_config(arg: str = "jumprelu"):
  if arg not in SWEEPS:
    raise ValueError(f"configs/smollm2_sweep.py:ARCH takes one of {sorted(SWEEPS)}, got {arg!r}")
  c = smollm2_135m.get_config()
  c.sae.arch = "jumprelu" if arg == "eps" else arg
  c.sae.width = 1024
  c.sae.sparsity_coefficient = 1e-3
  # θ trained directly (base.py's default too, said here as the comparison was run with it):
  # under Adam log θ moves by ~learning_rate·θ per step, so in 1,000 steps it hardly leaves its
  # init and λ barely changes L0 (log θ: λ 1e-4 to 3e-3 ended at L0 25.7 to 18.4; θ itself:
  # λ 1e-4 to 1e-2 gave L0 249 to 20 in 400 steps).
  if c.sae.arch == "jumprelu":
    c.sae.threshold_param = "raw"
  c.sae.k_aux = 256  # Gao et al.'s 512 is half this dictionary
  c.train.num_steps = 1000
  c.train.checkpoint_every = 500
  c.train.dead_window_tokens = 100_000
  for axis, values in SWEEPS[arg].items():
    c.sweep[axis] = values
  return c
