"""Throughput of a sweep trained as one vmapped ensemble against its members trained one by one.

  python scripts/bench_sweep.py                          # B=512 D=576 F=1024, 4 JumpReLU members
  python scripts/bench_sweep.py --arch topk --members 8 --width 4096

One round = what training all S members for one step costs: for the ensemble, one batch read
from a memory-mapped .npy store plus one ensemble step; one by one, S reads plus S single-SAE
steps (the members' own runs). Rounds alternate between the two, so machine load hits both
alike; each figure is the median of --rounds rounds after warm-up (compile excluded). The last
line reads `sequential/ensemble=X` (> 1: the ensemble trains the grid faster).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from jumprelu import data, sharding, sweep, train  # noqa: E402

AXIS = {"jumprelu": ("sparsity_coefficient", lambda i: 1e-4 * 2**i),
        "relu": ("sparsity_coefficient", lambda i: 0.03 * 2**i),
        "gated": ("sparsity_coefficient", lambda i: 0.1 * 2**i),
        "topk": ("k", lambda i: 8 * 2**i)}


def config(args, members: bool):
  c = base.get_config()
  c.data.d_in, c.sae.width, c.train.batch_size = args.d, args.width, args.batch
  c.sae.arch = args.arch
  c.sae.k_aux = min(256, args.width)
  c.mesh.data = c.mesh.model = 1
  if members:
    axis, value = AXIS[args.arch]
    c.sweep[axis] = tuple(value(i) for i in range(args.members))
  return c


def timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", choices=sorted(AXIS), default="jumprelu")
  p.add_argument("--members", type=int, default=4)
  p.add_argument("--batch", type=int, default=512)
  p.add_argument("--d", type=int, default=576)
  p.add_argument("--width", type=int, default=1024)
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  args = p.parse_args()

  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    np.save(os.path.join(tmp, "shard_00000.npy"),
            rng.normal(size=(64 * args.batch, args.d)).astype(np.float32))
    source = data.open_npy(tmp, seed=0)
    mesh = sharding.make_mesh(1, 1)
    key = jax.random.key(0)

    c_ens = config(args, members=True)
    grid = sweep.grid(c_ens)
    ens_state, ens_sh = train.sharded_init(c_ens, mesh, key, 1.0, len(grid))
    ens_step = train.jit_train_step(c_ens, mesh, ens_sh)
    singles = []
    for _, hp in grid:
      c = sweep.member_config(c_ens, hp)
      state, sh = train.sharded_init(c, mesh, key, 1.0)
      singles.append([train.jit_train_step(c, mesh, sh), state])
    box = {"ens": ens_state, "step": 0}

    def read():
      box["step"] += 1
      return sharding.global_batch(mesh, source.batch(box["step"], args.batch), args.batch)

    def ensemble_round():
      box["ens"], m = ens_step(box["ens"], read())
      jax.block_until_ready(m)

    def sequential_round():
      for s in singles:  # each member's own run reads its own copy of the batch
        s[1], m = s[0](s[1], read())
        jax.block_until_ready(m)

    times = {"ensemble": [], "sequential": []}
    for r in range(args.warmup + args.rounds):
      for name, fn in (("ensemble", ensemble_round), ("sequential", sequential_round)):
        t = timed(fn)
        if r >= args.warmup:
          times[name].append(t)
    read_s = statistics.median(timed(read) for _ in range(args.rounds))

  ens, seq = (statistics.median(times[k]) for k in ("ensemble", "sequential"))
  n = len(grid)
  tokens = args.batch * n  # SAE-tokens trained per round
  print(f"{args.arch} sweep of {n} SAEs ({', '.join(name for name, _ in grid)}), "
        f"B={args.batch} D={args.d} F={args.width}, fp32, {jax.devices()[0].device_kind}")
  print(f"{'':<24}{'s/round':>10}{'SAE-tokens/s':>14}")
  print(f"{'ensemble (vmapped)':<24}{ens:>10.4f}{tokens / ens:>14.0f}")
  print(f"{'one by one':<24}{seq:>10.4f}{tokens / seq:>14.0f}")
  print(f"{'(one batch read)':<24}{read_s:>10.4f}")
  print(f"sequential/ensemble={seq / ens:.2f}")


if __name__ == "__main__":
  main()
