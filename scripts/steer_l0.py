"""How λ and the target L0 steer L0 on the default job, with θ trained through its log or
directly (issue 16, item 2 and its acceptance).

  python scripts/steer_l0.py --store runs/smollm2/activations   # every run (~30 min each, 2 CPUs)
  python scripts/steer_l0.py --store STORE --only raw_lambda,raw_target --workdir runs/steer_l0

Each run is configs/smollm2_135m.py (width 2048, 1,500 steps of 512, lr 1e-3, λ warmed up over
500 steps, θ₀ = 0.05) on an existing activation store (no harvest), trained as one vmapped
ensemble into WORKDIR/RUN: a λ grid with the paper's L0 objective, or a grid of targets with the
quadratic target-L0 objective (λ = 1), with θ trained directly (raw_*), through its log (log_*),
or through its log with θ's updates scaled ×20 (log_lr20_*, optim.threshold_lr_scale); raw_clip_*
clips each SAE's gradient to global norm 1 (optim.grad_clip). Every
member is then scored with the SAE spliced into the LM on the job's held-out contexts. Prints,
per member, the training L0 (mean of the last three logged batches) and the held-out L0, FVU,
delta LM loss and fraction of features that never fire there, then how far each grid spans and
how far each target's held-out L0 lands from it; a rerun reuses finished runs (and only reprints
them).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from configs import smollm2_135m  # noqa: E402
from jumprelu import run, sweep  # noqa: E402

LAMBDAS = (3e-4, 1e-3, 3e-3)  # 1e-3: the default job's λ
LOG_LAMBDAS = (1e-4, 1e-3, 1e-2)  # log θ: wider, as its L0 moves less
TARGETS = (20.0, 50.0, 100.0)

# θ parameterisation × objective ('section.key' -> value over the default job's config)
RAW = {"sae.threshold_param": "raw", "sae.threshold_init": 0.05}
LOG = {"sae.threshold_param": "log", "sae.threshold_init": 0.05}
TARGET = {"sae.sparsity_loss": "target_l0", "sae.sparsity_coefficient": 1.0,
          "sweep.target_l0": TARGETS}
RUNS = {
    "raw_lambda": {**RAW, "sae.sparsity_loss": "l0", "sweep.sparsity_coefficient": LAMBDAS},
    "raw_target": {**RAW, **TARGET},
    "log_lambda": {**LOG, "sae.sparsity_loss": "l0", "sweep.sparsity_coefficient": LOG_LAMBDAS},
    # log θ with θ's updates ×20: at θ = θ₀ = 0.05 a step moves θ as far as a raw θ step
    "log_lr20_lambda": {**LOG, "optim.threshold_lr_scale": 20.0, "sae.sparsity_loss": "l0",
                        "sweep.sparsity_coefficient": LAMBDAS},
    # θ itself with each SAE's gradient clipped to global norm 1 (ablate.py's largest win)
    "raw_clip_lambda": {**RAW, "optim.grad_clip": 1.0, "sae.sparsity_loss": "l0",
                        "sweep.sparsity_coefficient": LAMBDAS},
    # the same at smaller λ: where L0 goes past 100 in a long run
    "raw_clip_small_lambda": {**RAW, "optim.grad_clip": 1.0, "sae.sparsity_loss": "l0",
                              "sweep.sparsity_coefficient": (3e-5, 1e-4)},
    # the same, its first 1,000 steps trained as TopK with k = 32 (sae.topk_start_steps)
    "raw_clip_topk_start_lambda": {**RAW, "optim.grad_clip": 1.0, "sae.sparsity_loss": "l0",
                                   "sae.topk_start_steps": 1000, "sae.k": 32,
                                   "sweep.sparsity_coefficient": LAMBDAS},
}


def config(name: str, store: str, steps: int):
  c = smollm2_135m.get_config()
  c.data.source = "npy"
  c.data.path = store
  c.train.num_steps = steps
  c.train.checkpoint_every = min(steps, 1500)  # a long run resumes from its last 1,500 steps
  c.log.tensorboard = c.log.progress = False
  for key, value in RUNS[name].items():
    section, k = key.split(".")
    c[section][k] = value
  return c


def train_l0(mdir: str, last: int = 3) -> float:
  """Mean L0 of the last `last` logged training batches of a member."""
  with open(os.path.join(mdir, "metrics.jsonl")) as fh:
    rows = [json.loads(line) for line in fh]
  l0s = [r["l0"] for r in rows if "l0" in r and "step" in r][-last:]
  return sum(l0s) / len(l0s)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--store", default="runs/smollm2/activations",
                 help="the default job's activation store (runs/smollm2/activations after it)")
  p.add_argument("--workdir", default="runs/steer_l0")
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--only", default="", help=f"comma-separated runs of {sorted(RUNS)}")
  args = p.parse_args()
  names = args.only.split(",") if args.only else list(RUNS)
  unknown = [n for n in names if n not in RUNS]
  if unknown:
    raise SystemExit(f"--only takes runs of {sorted(RUNS)}, got {unknown}")
  if not os.path.exists(os.path.join(args.store, "manifest.json")):
    raise SystemExit(f"--store {args.store} holds no manifest.json: run the default job first "
                     "(python experiments/train.py --config=configs/smollm2_135m.py "
                     "--workdir=runs/smollm2) or pass its store")
  logging.set_verbosity(logging.WARNING)
  print(f"{args.steps} steps of 512 per SAE, width 2048; held-out: the job's eval contexts")
  print(f"{'run':<16} {'member':<10} {'L0 train':>9} {'L0 eval':>8} {'FVU':>6} {'ΔLM':>6} "
        f"{'dead':>6} {'vs target':>9}")
  spans, misses, train_s = {}, {}, {}
  for name in names:
    c = config(name, args.store, args.steps)
    wdir = os.path.join(args.workdir, name)
    evals = [os.path.join(sweep.member_dir(wdir, m), "eval.json") for m, _ in sweep.grid(c)]
    if not all(os.path.exists(e) for e in evals):
      run.train_and_evaluate(c, wdir)
    with open(os.path.join(wdir, "summary.json")) as fh:
      train_s[name] = json.load(fh)["seconds"]
    if not all(os.path.exists(e) for e in evals):  # the store's text is not the config's
      print(f"{name}: trained, not evaluated (the store at {args.store} was harvested from "
            f"other text than the default job's); score it with experiments/evaluate.py "
            f"--workdir={wdir} --config.text.source=... --config.text.path=... as that store's "
            "manifest names them")
      continue
    l0s = []
    for (member, hp), path in zip(sweep.grid(c), evals):
      with open(path) as fh:
        ev = json.load(fh)
      l0 = ev["l0"]
      l0s.append(l0)
      miss = ""
      if c.sae.sparsity_loss == "target_l0":
        misses.setdefault(name, []).append(l0 / hp["target_l0"] - 1)
        miss = f"{100 * misses[name][-1]:+8.1f}%"
      print(f"{name:<16} {member:<10} {train_l0(sweep.member_dir(wdir, member)):9.1f} "
            f"{l0:8.1f} {ev['fvu']:6.3f} {ev['delta_lm_loss']:6.3f} "
            f"{100 * ev['frac_features_dead_on_eval']:5.1f}% {miss:>9}", flush=True)
    spans[name] = (min(l0s), max(l0s))
  print()
  for name, (lo, hi) in spans.items():
    line = f"{name}: held-out L0 {lo:.1f} to {hi:.1f} ({hi / max(lo, 1e-9):.1f}×)"
    if name in misses:
      line += f", worst miss {100 * max(misses[name], key=abs):+.1f}% of the target"
    print(line + f"; trained in {train_s[name] / 60:.1f} min")


if __name__ == "__main__":
  main()
