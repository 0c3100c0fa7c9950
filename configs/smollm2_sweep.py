"""The reproduction on SmolLM2-135M: one architecture's sparsity sweep, or one objective, as one
ensemble.

  python experiments/train.py --config=configs/smollm2_sweep.py:RUN --workdir=DIR \
      --config.text.path=CORPUS.jsonl --config.data.path=STORE [--config.seed=1]
RUN: jumprelu | topk | batchtopk | gated (the headline: three sparsities each, run for three
seeds), or one of VARIANTS (JumpReLU's other objectives and options; seed 0).
Same data, width, steps and optimiser for every run; only the sparsity knob and the variant's
keys differ. scripts/reproduce.sh runs the whole comparison; scripts/corpus.py writes CORPUS.
"""
from configs import smollm2_135m

# Sparsity levels spanning roughly L0 10–140 at width 1024 (chosen from the earlier 512k-token
# runs of this comparison; each λ penalises a different quantity). JumpReLU has a fourth, so its
# curve spans every other architecture's L0 and is interpolated there.
SWEEPS = {
    "jumprelu": {"sparsity_coefficient": (3e-4, 1e-3, 3e-3, 1e-2)},  # λ of the L0 penalty
    "topk": {"k": (16, 32, 64)},
    "batchtopk": {"k": (16, 32, 64)},
    "gated": {"sparsity_coefficient": (0.1, 0.15, 0.2)},  # λ of the L1 penalty on the gate
}
# JumpReLU's other objectives and options (keys over the jumprelu run, at λ = 1e-3 unless a
# sweep says otherwise), each compared with the headline JumpReLU curve at its own L0.
VARIANTS = {
    "target_l0": {"sae.sparsity_loss": "target_l0", "sae.sparsity_coefficient": 1.0,
                  "sweep.target_l0": (20.0, 60.0)},  # Gemma Scope 2's quadratic penalty
    "tanh": {"sae.sparsity_loss": "tanh", "sae.pre_act_coefficient": 3e-6,
             "sweep.sparsity_coefficient": (1e-3, 3e-3)},  # Anthropic's, with its pre-act loss
    "frequency": {"sae.frequency_coefficient": 0.1},  # + the high-frequency-latent penalty
    "matryoshka": {"sae.matryoshka_prefixes": (64, 256)},
    "batchtopk_matryoshka": {"sae.arch": "batchtopk", "sae.k": 32,
                             "sae.matryoshka_prefixes": (64, 256)},
    "adaptive_eps": {"sae.bandwidth_rule": "adaptive"},  # a bandwidth per feature
    "no_grad_clip": {"optim.grad_clip": 0.0,  # the paper's optimiser: no clipping
                     "sweep.sparsity_coefficient": (3e-4, 1e-3, 3e-3, 1e-2)},
}


def get_config(arg: str = "jumprelu"):
  runs = sorted(SWEEPS) + sorted(VARIANTS)
  if arg not in runs:
    raise ValueError(f"configs/smollm2_sweep.py:RUN takes one of {runs}, got {arg!r}")
  c = smollm2_135m.get_config()
  # English prose: the Python documentation (scripts/corpus.py), ~2.7M tokens; 400k harvested.
  c.text.source = "files"
  c.text.path = "runs/repro/corpus.jsonl"
  c.harvest.num_tokens = 400_000
  c.eval.skip_contexts = 3400  # past the ~3,200 contexts the harvest reads (checked before it)
  c.eval.num_contexts = 64  # 8k scored tokens (scripts/evaluate_runs.py scores them)
  c.sae.width = 1024
  c.sae.arch = arg if arg in SWEEPS else "jumprelu"
  c.sae.k_aux = 256  # Gao et al.'s 512 is half this dictionary
  c.train.batch_size = 512
  c.train.num_steps = 2000  # 1.02M tokens per SAE, ~2.6 passes over the store
  c.train.checkpoint_every = 1000
  c.train.dead_window_tokens = 100_000
  if arg in SWEEPS:
    for axis, values in SWEEPS[arg].items():
      c.sweep[axis] = values
  else:
    for key, value in VARIANTS[arg].items():
      section, leaf = key.split(".")
      c[section][leaf] = value
  return c
