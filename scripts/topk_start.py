"""Is JumpReLU's recovery gap on the harder synthetic set in its objective or in its training?

  python scripts/topk_start.py                  # 4,000 steps each, then 1,000 of fine-tuning
  python scripts/topk_start.py --steps 1500 --finetune 500

Trains configs/synthetic_hard.py's TopK (k = 4) and a JumpReLU λ grid (one ensemble, gradient
clipping, log θ as in scripts/ablate.py's `grad_clip_1`) from scratch. Then it makes a JumpReLU
from the TopK SAE (its encoder, decoder and biases, one threshold for every latent set so the
training rows fire at the true L0) and scores both with the JumpReLU objective itself, mean
‖x − x̂‖² + λ·L0 on normalised held-out rows, at each λ of the grid: where the TopK-made JumpReLU
scores lower than the one trained at that λ, the objective prefers a dictionary training did not
find. Last, the TopK-made JumpReLU is trained on with that objective (the same λ grid, no λ
warm-up) to see whether it keeps the dictionary. Everything is measured on scripts/recovery.py's
65,536 held-out rows: L0, FVU, recovery (mean best cosine) and its rarest / most frequent thirds.
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jumprelu import arch, sweep  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ablate  # noqa: E402
import recovery  # noqa: E402

LAMBDAS = (0.005, 0.03, 0.1, 0.3)


def objective(params, xn_NxD, lam: float) -> dict:
  """The JumpReLU SAE's loss terms on normalised rows: mean ‖x − x̂‖², mean L0, their sum."""
  f = np.asarray(jax.jit(lambda p, x: arch.features(p, x, arch="jumprelu"))(params, xn_NxD))
  x_hat = f @ np.asarray(params["W_dec"]) + np.asarray(params["b_dec"])
  recon = float(np.mean(np.sum((xn_NxD - x_hat) ** 2, axis=1)))
  l0 = float(np.mean(np.sum(f != 0, axis=1)))
  return {"recon": recon, "l0": l0, "loss": recon + lam * l0}


def jumprelu_from_topk(c, topk_params, xn_NxD, l0: float) -> dict:
  """TopK's weights as a JumpReLU with one threshold θ for all latents: the (1 − l0/F) quantile
  of the ReLU'd pre-activations on rows xn, so those rows fire l0 latents on average."""
  pre = np.maximum(xn_NxD @ np.asarray(topk_params["W_enc"]) + np.asarray(topk_params["b_enc"]), 0)
  theta = float(np.quantile(pre, 1 - l0 / pre.shape[1]))
  params = {k: jnp.asarray(topk_params[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
  name = "log_threshold" if c.sae.threshold_param == "log" else "threshold"
  value = math.log(theta) if name == "log_threshold" else theta
  params[name] = jnp.full((c.sae.width,), value, jnp.float32)
  return params


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=0, help="train.num_steps (0: the config's 4,000)")
  p.add_argument("--finetune", type=int, default=1000, help="steps of JumpReLU from TopK's start")
  args = p.parse_args()
  c_topk = ablate.variant_config("topk", ablate.VARIANTS["topk"], args.steps)
  c_jump = ablate.variant_config("grad_clip_1", ablate.VARIANTS["grad_clip_1"], args.steps,
                                 LAMBDAS)
  source, _ = ablate._source(c_jump)
  x, true_GxD, true_l0, active = recovery.held_out(c_jump, with_active=True)

  t0 = time.time()
  topk, _ = ablate.train_in_process(c_topk, source)
  jump, members = ablate.train_in_process(c_jump, source)
  norm = float(topk.norm_scale)
  xn = x / norm
  print(f"trained TopK and {len(members)} JumpReLU members from scratch in {time.time() - t0:.0f} s")
  rows = [("TopK, k = 4", None, ablate.measure(c_topk, topk.params, norm, x, true_GxD, active),
           None)]
  for i, (m, _) in enumerate(members):
    params = sweep.take(jump.params, i)
    rows.append((f"JumpReLU from scratch, {m}", LAMBDAS[i],
                 ablate.measure(c_jump, params, norm, x, true_GxD, active),
                 objective(params, xn, LAMBDAS[i])))
  made = jumprelu_from_topk(c_jump, topk.params, xn, true_l0)
  made_m = ablate.measure(c_jump, made, norm, x, true_GxD, active)
  for lam in LAMBDAS:
    rows.append((f"JumpReLU made from TopK, λ = {lam}", lam, made_m, objective(made, xn, lam)))

  c_ft = ablate.variant_config("grad_clip_1", {**ablate.VARIANTS["grad_clip_1"],
                                               "optim.sparsity_warmup_steps": 0},
                               args.steps, LAMBDAS)
  t0 = time.time()
  ft, _ = ablate.train_in_process(c_ft, source, params=made, first_step=c_jump.train.num_steps,
                                  steps=args.finetune)
  print(f"fine-tuned the TopK-made JumpReLU for {args.finetune} steps in {time.time() - t0:.0f} s")
  for i, (m, _) in enumerate(members):
    params = sweep.take(ft.params, i)
    rows.append((f"TopK start + {args.finetune} JumpReLU steps, {m}", LAMBDAS[i],
                 ablate.measure(c_ft, params, norm, x, true_GxD, active),
                 objective(params, xn, LAMBDAS[i])))

  print(f"\ntrue L0 {true_l0:.2f}; {c_jump.train.num_steps} steps of {c_jump.train.batch_size}; "
        f"held-out rows {recovery.HELD_OUT}; objective = mean ‖x − x̂‖² + λ·L0, normalised rows")
  print("| SAE | λ | L0 | FVU | recovery | rare third | frequent third | objective at λ |")
  print("|---|---|---|---|---|---|---|---|")
  for name, lam, m, obj in rows:
    print(f"| {name} | {'–' if lam is None else lam} | {m['l0']:.2f} | {m['fvu']:.3f} "
          f"| {m['recovery']:.3f} | {m['cos_rare']:.3f} | {m['cos_frequent']:.3f} "
          f"| {'–' if obj is None else format(obj['loss'], '.4f')} |")


if __name__ == "__main__":
  main()
