"""Live training: a sweep of S SAEs sharing one LM pass per chunk against the same S live runs
one after another, in SAE-training tokens per second.

  python scripts/bench_live.py                  # SmolLM2-135M (embedded GGUF), resid_post.14
  python scripts/bench_live.py --members 4 --contexts 64 --steps 16 --width 2048

One run here = one live chunk of training: the LM forward over data.live_chunk_contexts
contexts (on the devices; the chunk stays there), the input scale from it, and
data.live_chunk_steps steps of the SAE (or of the ensemble) on batches gathered from it, as
train.fit runs them. The ensemble run trains S members on every batch; each one-SAE run trains
one member and runs its own LM pass, as S separate jobs would. Everything is compiled first (a
warm-up chunk), so the timings are steady state. Prints the LM pass and the SAE steps of each
run, tokens/s, and ends with `live_sweep/sequential=X` (the sweep's speed-up).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import smollm2_135m  # noqa: E402
from jumprelu import live, sharding, sweep, train  # noqa: E402
from jumprelu.lm import activations as lm_act  # noqa: E402

LAMBDAS = (3e-4, 1e-3, 3e-3, 1e-2)  # configs/smollm2_sweep.py's JumpReLU sweep


def config(args, members: int):
  c = smollm2_135m.get_config()
  c.data.source = "live"
  c.data.live_chunk_contexts, c.data.live_chunk_steps = args.contexts, args.steps
  c.sae.width, c.train.batch_size = args.width, args.batch
  c.mesh.data = c.mesh.model = 1
  c.sweep.sparsity_coefficient = tuple(LAMBDAS[i % len(LAMBDAS)] * (1 + i // len(LAMBDAS))
                                       for i in range(members)) if members else ()
  return c


def one_run(c, lm, mesh, chunk: int) -> tuple[float, float]:
  """(seconds of the LM pass and input scale, seconds of the SAE steps) of one live chunk."""
  t0 = time.perf_counter()
  source = live.LiveSource(c, lm, mesh)
  first = chunk * c.data.live_chunk_steps
  source.chunk(chunk)  # blocks: the finite-row mask comes back to the host
  scale = source.mean_sq_norm(c.data.norm_rows) ** 0.5
  members = len(sweep.grid(c))
  state, shardings = train.sharded_init(c, mesh, jax.random.key(c.seed), scale, members)
  step_fn = source.gathering(train.jit_train_step(c, mesh, shardings))
  t1 = time.perf_counter()
  for s in range(first, first + c.data.live_chunk_steps):  # as train.fit: gathered in the step
    state, metrics = step_fn(state, source.step_input(s, c.train.batch_size)[0])
  jax.block_until_ready((state, metrics))
  return t1 - t0, time.perf_counter() - t1


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--members", type=int, default=4)
  p.add_argument("--contexts", type=int, default=64, help="data.live_chunk_contexts")
  p.add_argument("--steps", type=int, default=16, help="data.live_chunk_steps")
  p.add_argument("--batch", type=int, default=512)
  p.add_argument("--width", type=int, default=2048)
  args = p.parse_args()
  sweep_c, one_c = config(args, args.members), config(args, 0)
  lm = lm_act.load_lm(sweep_c)
  mesh = sharding.make_mesh(1, 1)
  tokens = args.steps * args.batch  # SAE-training tokens per member per chunk
  print(f"LM {lm[3]} to {sweep_c.lm.site}; chunk: {args.contexts} contexts x "
        f"{sweep_c.lm.context_len} tokens, {args.steps} steps of {args.batch}; SAE width "
        f"{args.width}; {args.members} members; {jax.device_count()} device(s)", flush=True)
  for c in (sweep_c, one_c):  # warm-up: every program compiled
    one_run(c, lm, mesh, 0)
  lm_s, sae_s = one_run(sweep_c, lm, mesh, 1)
  ensemble = lm_s + sae_s
  print(f"sweep of {args.members}: LM pass {lm_s:.1f} s + {args.steps} ensemble steps "
        f"{sae_s:.1f} s = {ensemble:.1f} s: {args.members * tokens / ensemble:,.0f} tokens/s",
        flush=True)
  runs = [one_run(one_c, lm, mesh, 1) for _ in range(args.members)]
  sequential = sum(a + b for a, b in runs)
  print(f"{args.members} runs one after another: LM passes "
        f"{' + '.join(f'{a:.1f}' for a, _ in runs)} s, {args.steps} one-SAE steps "
        f"{' + '.join(f'{b:.1f}' for _, b in runs)} s = {sequential:.1f} s: "
        f"{args.members * tokens / sequential:,.0f} tokens/s", flush=True)
  print(f"live_sweep/sequential={sequential / ensemble:.2f}")


if __name__ == "__main__":
  main()
