"""How λ (and the target L0) steers L0 with θ trained through its log or directly (issue 16,
item 2), on the harder synthetic benchmark (configs/synthetic_hard.py).

  python scripts/threshold_param.py                  # 1,500 steps per SAE (~5 min, 2 CPU cores)
  python scripts/threshold_param.py --steps 4000 --workdir runs/theta4000

For each sae.threshold_param (log, raw) two ensembles train into WORKDIR/PARAM_{lambda,target}:
the paper's L0 objective over a λ grid, and the quadratic target-L0 objective over a grid of
targets. Prints each member's L0 on its last training batches and on held-out rows, and how far
the L0 range spans (max/min) under each parameterisation; a rerun reuses finished runs.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import logging  # noqa: E402

import recovery  # noqa: E402
from configs import synthetic_hard  # noqa: E402
from jumprelu import run, sweep  # noqa: E402

LAMBDAS = (0.003, 0.01, 0.03, 0.1, 0.3)
TARGETS = (2.0, 4.0, 8.0, 16.0, 32.0)


def config(param: str, kind: str, steps: int):
  c = synthetic_hard.get_config("quick")
  c.train.num_steps = steps
  c.train.checkpoint_every = steps
  c.log.tensorboard = c.log.progress = False
  c.sae.threshold_param = param
  if kind == "lambda":
    c.sweep.sparsity_coefficient = LAMBDAS
  else:
    c.sae.sparsity_loss = "target_l0"
    c.sae.sparsity_coefficient = 1.0
    c.sweep.target_l0 = TARGETS
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="runs/threshold_param")
  p.add_argument("--steps", type=int, default=1500)
  args = p.parse_args()
  logging.set_verbosity(logging.WARNING)
  x, true_GxD, true_l0 = recovery.held_out(config("log", "lambda", args.steps))
  print(f"true L0 {true_l0:.2f}; {args.steps} steps of 1,024 per SAE")
  print(f"{'θ param':<8} {'objective':<10} {'member':<12} {'L0 train':>9} {'L0 held-out':>12} "
        f"{'FVU':>6} {'cos':>6}")
  spans = {}
  for param in ("log", "raw"):
    for kind in ("lambda", "target"):
      c = config(param, kind, args.steps)
      workdir = os.path.join(args.workdir, f"{param}_{kind}")
      summary = run.train_and_evaluate(c, workdir)
      l0s = []
      for name, _ in sweep.grid(c):
        r = recovery.measure(sweep.member_dir(workdir, name), x, true_GxD)
        l0s.append(r["l0"])
        print(f"{param:<8} {kind:<10} {name:<12} {summary['members'][name]['final']['l0']:9.2f} "
              f"{r['l0']:12.2f} {r['fvu']:6.3f} {r['recovery']:6.3f}", flush=True)
      spans[param, kind] = (min(l0s), max(l0s))
  for (param, kind), (lo, hi) in spans.items():
    print(f"{param} θ, {kind} grid: held-out L0 from {lo:.2f} to {hi:.2f} ({hi / max(lo, 1e-9):.1f}×)")


if __name__ == "__main__":
  main()
