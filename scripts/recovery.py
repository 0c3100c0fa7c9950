"""Dictionary recovery on the harder synthetic benchmark, every architecture and objective at
matched L0 (issue 16, item 4).

  python scripts/recovery.py                       # 1,500 steps each (11-13 min, 2 CPU cores)
  python scripts/recovery.py --full                # configs/synthetic_hard.py's 4,000 steps
  python scripts/recovery.py --only jumprelu,topk --workdir runs/recovery

Each method trains once into WORKDIR/METHOD (a rerun reuses what is finished there): where λ
sets the L0, its grid trains as one vmapped ensemble; TopK and BatchTopK take k = 4 and the
target-L0 objective the target 4, the data's mean L0. Every SAE is then measured from its raw-unit
export on 65,536 held-out rows of the same distribution: L0, FVU, and dictionary recovery (for
each true feature the best cosine with a learned direction: their mean, and the fraction above
0.9). A method's "@ L0*" line interpolates its members in log L0 at the true L0 (matched L0);
TopK-like methods are at it by construction.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from configs import synthetic_hard  # noqa: E402
from jumprelu import arch, data, export, sweep  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

HELD_OUT = 65536  # rows after the training rows (data.synthetic yields the same prefix)
THRESHOLD = 0.9  # a true feature counts as recovered above this best cosine

# method -> config overrides ('section.key' -> value); a sweep.* tuple trains as one ensemble.
METHODS = {
    "jumprelu": {"sweep.sparsity_coefficient": (0.02, 0.04, 0.08)},
    "jumprelu_target_l0": {"sae.sparsity_loss": "target_l0", "sae.sparsity_coefficient": 1.0},
    "jumprelu_target_l0_freq": {"sae.sparsity_loss": "target_l0", "sae.sparsity_coefficient": 1.0,
                                "sae.frequency_coefficient": 0.1},
    "jumprelu_tanh": {"sae.sparsity_loss": "tanh",
                      "sweep.sparsity_coefficient": (0.03, 0.06, 0.12)},
    "jumprelu_tanh_preact": {"sae.sparsity_loss": "tanh", "sae.pre_act_coefficient": 1e-3,
                             "sweep.sparsity_coefficient": (0.03, 0.06, 0.12)},
    "relu": {"sae.arch": "relu", "sweep.sparsity_coefficient": (0.4, 0.8, 1.6)},
    "gated": {"sae.arch": "gated", "sweep.sparsity_coefficient": (0.4, 0.8, 1.6)},
    "topk": {"sae.arch": "topk"},
    "batchtopk": {"sae.arch": "batchtopk"},
    "batchtopk_matryoshka": {"sae.arch": "batchtopk", "sae.matryoshka_prefixes": (32, 128)},
}


def method_config(name: str, args):
  c = synthetic_hard.get_config(None if args.full else "quick")
  if args.steps:
    c.train.num_steps = args.steps
  c.sae.threshold_param = args.threshold_param
  c.log.tensorboard = False
  c.log.progress = False
  c.train.checkpoint_every = c.train.num_steps
  for key, value in METHODS[name].items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  return c


def held_out(c, with_active: bool = False):
  """(x [HELD_OUT, D], the true dictionary [G, D], the data's true L0) for c's data, and with
  with_active the rows' true active features [HELD_OUT, G] (bool) after them."""
  s = c.data.synthetic
  if s.n_rows % 65536:  # data.synthetic draws rows in chunks of 65,536
    raise ValueError("data.synthetic.n_rows must be a multiple of 65536 for the held-out rows")
  x, true_GxD, facts = data.synthetic(s.n_rows + HELD_OUT, c.data.d_in, s.n_features, s.mean_l0,
                                  seed=s.seed, noise_std=s.noise_std,
                                  freq_exponent=s.freq_exponent,
                                  magnitude_sigma=s.magnitude_sigma, with_active=with_active)
  out = (x[s.n_rows:], true_GxD, facts["true_l0"])
  return out + (facts["active"][s.n_rows:],) if with_active else out


def measure(run_dir: str, x_NxD, true_GxD) -> dict:
  """L0, FVU and recovery of the SAE exported in run_dir, on raw activations x."""
  name, k, params = arch.split_raw(export.load(os.path.join(run_dir, "export", "params.npz")))
  f = np.asarray(arch.features(params, x_NxD, arch=name, k=k))
  x_hat = f @ params["W_dec"] + params["b_dec"]
  cos = data.best_cosines(params["W_dec"], true_GxD)
  return {"l0": float(np.mean(np.sum(f != 0, axis=1))),
          "fvu": float(np.sum((x_NxD - x_hat) ** 2) / np.sum((x_NxD - x_NxD.mean(0)) ** 2)),
          "recovery": float(np.mean(cos)), "above": float(np.mean(cos > THRESHOLD))}


def at_l0(rows: list[dict], l0: float) -> dict | None:
  """The members' recovery, fraction above 0.9 and FVU interpolated linearly in log L0 at l0
  (None when no two members bracket it)."""
  return compare.at_l0(rows, l0, ("recovery", "above", "fvu"))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="runs/recovery")
  p.add_argument("--only", default="", help="comma-separated methods (default: all): "
                 + ", ".join(METHODS))
  p.add_argument("--full", action="store_true",
                 help="configs/synthetic_hard.py's 4,000 steps (default: its 'quick' 1,500)")
  p.add_argument("--steps", type=int, default=0, help="train.num_steps (0: the config's)")
  p.add_argument("--threshold_param", default="log", choices=("log", "raw"),
                 help="JumpReLU's sae.threshold_param")
  args = p.parse_args()
  logging.set_verbosity(logging.WARNING)
  names = [n for n in args.only.split(",") if n] or list(METHODS)
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")

  from jumprelu import run  # here: scripts/ablate.py imports this module without the pipeline
  x, true_GxD, true_l0 = held_out(method_config(names[0], args))
  lines = []
  for name in names:
    c = method_config(name, args)
    t0 = time.time()
    run.train_and_evaluate(c, os.path.join(args.workdir, name))
    seconds = time.time() - t0
    members = sweep.grid(c)
    dirs = ([(m, sweep.member_dir(os.path.join(args.workdir, name), m)) for m, _ in members]
            or [("", os.path.join(args.workdir, name))])
    rows = [{"member": m, **measure(d, x, true_GxD)} for m, d in dirs]
    lines.append((name, rows, at_l0(rows, true_l0) if len(rows) > 1 else None, seconds))
    print(f"{name}: {len(rows)} SAE(s), {c.train.num_steps} steps, {seconds:.0f} s", flush=True)

  print(f"\ntrue L0 {true_l0:.2f}; {len(true_GxD)} true features, width "
        f"{method_config(names[0], args).sae.width}; held-out rows {HELD_OUT}")
  print(f"{'method':<26} {'member':<12} {'L0':>6} {'FVU':>6} {'cos':>6} {'>0.9':>6}")
  for name, rows, interp, _ in lines:
    for r in rows:
      print(f"{name:<26} {r['member'] or '-':<12} {r['l0']:6.2f} {r['fvu']:6.3f} "
            f"{r['recovery']:6.3f} {r['above']:6.3f}")
    if interp:
      print(f"{name:<26} {'@ L0*':<12} {true_l0:6.2f} {interp['fvu']:6.3f} "
            f"{interp['recovery']:6.3f} {interp['above']:6.3f}")


if __name__ == "__main__":
  main()
