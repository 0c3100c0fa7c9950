"""Times the JumpReLU train step against its floor and against SAELens, on one machine, in one run.

  python scripts/bench.py                       # CPU default: B=4096 D=576 F=16384, fp32
  python scripts/bench.py --shape gemma2 --precision bfloat16   # D=2304 F=16384 (accelerators)
  python scripts/bench.py --shape gemma9 --peak_tflops 989       # D=3584 F=131072

Rows (each the median of --steps timed calls after --warmup untimed ones; compile excluded; the
candidates run interleaved, one call each per round, so a change in machine load hits all alike):
  floor jax / floor torch  the fastest dense x @ W_enc of the step's shape and precision: the one
                           product no JumpReLU step can skip (2·B·D·F FLOPs). The faster is "floor".
  ours dense / ours sparse train.jit_train_step with train.step_impl = dense | sparse: Adam, decoder
                           renorm, parallel-gradient removal and every metric included.
  peer saelens             SAELens's JumpReLUTrainingSAE.training_forward_pass + backward + grad
                           clipping + Adam (β1 = 0) + its firing-statistics update: the body of its
                           SAETrainer._train_step (needs `pip install -e .[bench]`).
  input pipeline           data.ActivationSource.batch from a memory-mapped .npy store (written by
                           this script, so the page cache is warm: an upper bound for disk reads).
FLOP/s are dense-equivalent: 2·B·D·F for the floor, 10·B·D·F for a train step (five products),
whatever the step actually computes. The SAE is set in a realistic sparse regime: each feature's θ
is its (1 − --l0_frac) quantile of pre-activations, so ~--l0_frac of entries fire and a few sit in
the STE window. The last line reads `step/floor=X peer/ours=Y` for the faster of our two steps.
"""
import argparse
import os
import platform
import sys
import tempfile
import time

# glibc returns every freed block above 32 MiB to the kernel, so each step's [B, F] temporaries are
# page-faulted in afresh; on VMs that report free pages to the host that costs more than the
# arithmetic. One arena, no mmap and no trimming keep them mapped. Applied to every candidate
# alike (one process); --no-malloc_tuning measures without it.
_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
             "glibc.malloc.trim_threshold=68719476736")
if (platform.system() == "Linux" and "--no-malloc_tuning" not in sys.argv
    and os.environ.get("GLIBC_TUNABLES") != _TUNABLES):
  os.environ["GLIBC_TUNABLES"] = _TUNABLES
  os.execv(sys.executable, [sys.executable] + sys.argv)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from jumprelu import data, sae, sharding, train  # noqa: E402
from jumprelu import run as run_lib  # noqa: E402

SHAPES = {"cpu": (576, 16384), "gemma2": (2304, 16384), "gemma9": (3584, 131072)}
# Dense peak TFLOP/s per chip, for the "of peak" column: (float32 matmul, bfloat16).
PEAKS = {"TPU v3": (123, 123), "TPU v4": (275, 275), "TPU v5 lite": (197, 197),
         "TPU v5": (459, 459), "NVIDIA H100": (494, 989), "NVIDIA H200": (494, 989),
         "NVIDIA A100": (156, 312)}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", choices=sorted(SHAPES), default="cpu", help="D and F presets")
  p.add_argument("--batch", type=int, default=4096)
  p.add_argument("--d_in", type=int, help="overrides the preset's D")
  p.add_argument("--width", type=int, help="overrides the preset's F")
  p.add_argument("--precision", choices=sae.MATMUL_DTYPES, default="float32")
  p.add_argument("--steps", type=int, default=20, help="timed calls per candidate (median)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls first (compile included)")
  p.add_argument("--l0_frac", type=float, default=0.01, help="fraction of entries that fire")
  p.add_argument("--sparse_capacity", type=float, default=0.02)
  p.add_argument("--impls", default="dense,sparse", help="our step implementations to time")
  p.add_argument("--no-peer", dest="peer", action="store_false", help="skip SAELens")
  p.add_argument("--no-torch", dest="torch", action="store_false",
                 help="skip the torch floor and the peer (torch's CPU bf16 products are very slow)")
  p.add_argument("--store_batches", type=int, default=8, help="batches in the .npy store")
  p.add_argument("--peak_tflops", type=float, help="device peak, for the fraction-of-peak column")
  p.add_argument("--precision_study", type=int, metavar="STEPS",
                 help="instead: train configs/synthetic.py for STEPS steps with fp32 and bf16 "
                      "matmuls (and the sparse step) and compare loss, L0, FVU and recovery")
  p.add_argument("--no-malloc_tuning", dest="malloc_tuning", action="store_false",
                 help="leave glibc's malloc defaults (see the comment at the top)")
  return p.parse_args()


def load() -> str:
  return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") \
      else "n/a"


# ----------------------------------------------------------------------------- candidates

def config(args, d, f, impl):
  c = base.get_config()
  c.data.d_in, c.sae.width, c.train.batch_size = d, f, args.batch
  c.train.step_impl, c.train.sparse_capacity = impl, args.sparse_capacity
  c.train.matmul_dtype = args.precision
  c.optim.lr_warmup_steps = c.optim.sparsity_warmup_steps = 0  # the recipe's steady state
  c.mesh.data, c.mesh.model = -1, 1
  return c


def sparse_regime(params, x_BxD, l0_frac):
  """θ at each feature's (1 − l0_frac) quantile of π(x): ~l0_frac of the entries fire."""
  pre_BxF = sae.pre_activations(params, x_BxD)
  theta_F = jnp.maximum(jnp.quantile(pre_BxF, 1.0 - l0_frac, axis=0), 1e-3)
  return {**params, "log_threshold": jnp.log(theta_F)}


def our_step(c, x_BxD, params):
  """A callable running train_step once (state carried between calls) and its first metrics."""
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.model)
  state, shardings = train.sharded_init(c, mesh, jax.random.key(0), 1.0)
  params = jax.tree.map(jnp.copy, params)  # each step donates its own buffers
  state = jax.device_put(state.replace(params=params), shardings)
  x = sharding.global_batch(mesh, np.asarray(x_BxD), c.train.batch_size)
  step_fn = train.jit_train_step(c, mesh, shardings)
  box = {"state": state}

  def run():
    box["state"], metrics = step_fn(box["state"], x)
    jax.block_until_ready(metrics)
    return metrics
  return run


def jax_floor(x_BxD, W_enc_DxF, dtype):
  fn = jax.jit(lambda x, w: sae.matmul(x, w, dtype))
  return lambda: jax.block_until_ready(fn(x_BxD, W_enc_DxF))


def torch_device():
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sync():
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def torch_floor(x_BxD, W_enc_DxF, dtype):
  import torch
  dt = torch.float32 if dtype == "float32" else torch.bfloat16
  dev = torch_device()
  x = torch.as_tensor(np.array(x_BxD)).to(dev, dt)
  w = torch.as_tensor(np.array(W_enc_DxF)).to(dev, dt)
  out = torch.empty((x.shape[0], w.shape[1]), dtype=dt, device=dev)

  def run():
    torch.matmul(x, w, out=out)  # into a kept buffer: the fastest way torch offers
    torch_sync()
  return run


def peer_step(c, x_BxD, params, precision):
  """SAELens's JumpReLU training step on the same SAE, batch, λ, ε and optimiser."""
  import contextlib

  import torch
  from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
  from sae_lens.saes.sae import TrainStepInput
  dev = torch_device()
  cfg = JumpReLUTrainingSAEConfig(
      d_in=c.data.d_in, d_sae=c.sae.width, dtype="float32", device=dev,
      apply_b_dec_to_input=False,  # our (and the paper's) π = x·W_enc + b_enc
      jumprelu_bandwidth=c.sae.bandwidth, l0_coefficient=c.sae.sparsity_coefficient)
  peer = JumpReLUTrainingSAE(cfg)
  with torch.no_grad():
    for name, value in (("W_enc", params["W_enc"]), ("b_enc", params["b_enc"]),
                        ("W_dec", params["W_dec"]), ("b_dec", params["b_dec"]),
                        ("threshold", sae.threshold(params))):
      getattr(peer, name).copy_(torch.as_tensor(np.array(value)))
  opt = torch.optim.Adam(peer.parameters(), lr=c.optim.learning_rate, betas=(0.0, c.optim.b2),
                         eps=c.optim.eps)
  x = torch.as_tensor(np.array(x_BxD)).to(dev)
  since_fired = torch.zeros(c.sae.width, device=dev)
  # SAELens's trainer runs bf16 by autocast over fp32 parameters, as our matmul_dtype does.
  autocast = (torch.autocast(dev, dtype=torch.bfloat16) if precision == "bfloat16"
              else contextlib.nullcontext())
  box = {"n": 0}

  def run():
    with autocast:
      out = peer.training_forward_pass(TrainStepInput(
          sae_in=x, coefficients={"l0": c.sae.sparsity_coefficient}, dead_neuron_mask=None,
          n_training_steps=box["n"], is_logging_step=False))
      with torch.no_grad():
        did_fire = out.feature_acts.bool().float().sum(-2).bool()
        since_fired.add_(1)
        since_fired[did_fire] = 0
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    torch_sync()
    box["n"] += 1
    return out
  return run


# ----------------------------------------------------------------------------- input pipeline

def input_pipeline(args, d, rng):
  """tokens/s read by ActivationSource.batch from a memory-mapped .npy store (page cache warm)."""
  with tempfile.TemporaryDirectory() as tmp:
    n = args.store_batches * args.batch
    rows = np.lib.format.open_memmap(os.path.join(tmp, "acts.npy"), "w+", np.float32, (n, d))
    for lo in range(0, n, args.batch):
      rows[lo:lo + args.batch] = rng.standard_normal((args.batch, d), np.float32) / np.sqrt(d)
    rows.flush()
    del rows
    source = data.open_npy(tmp, seed=0)
    x = source.batch(0, args.batch)
    times = []
    for step in range(1, max(args.steps, 2 * args.store_batches) + 1):
      t0 = time.perf_counter()
      source.batch(step, args.batch)
      times.append(time.perf_counter() - t0)
  return x, float(np.median(times))


# ----------------------------------------------------------------------------- precision study

def precision_study(steps: int):
  """Short synthetic runs: what bf16 matmul inputs (and the sparse step) change in training."""
  from configs import synthetic
  rows = []
  for impl, dtype in (("dense", "float32"), ("dense", "bfloat16"), ("sparse", "float32"),
                      ("sparse", "bfloat16")):
    c = synthetic.get_config()
    c.train.num_steps, c.train.step_impl, c.train.matmul_dtype = steps, impl, dtype
    c.train.sparse_capacity = 0.25  # width 256: L0 ≈ 4 plus the window; dense while L0 is high
    c.train.log_every = c.train.checkpoint_every = steps
    c.log.tensorboard, c.log.progress, c.export.saelens = False, False, False
    with tempfile.TemporaryDirectory() as tmp:
      t0 = time.perf_counter()
      summary = run_lib.train_and_evaluate(c, tmp)
      seconds = time.perf_counter() - t0
    m = summary["final"]
    rows.append((impl, dtype, m["loss"], m["l0"], m["fvu"], summary["dictionary_recovery"],
                 m.get("dense_fallback", float("nan")), seconds))
    print(f"# done: {impl} {dtype} in {seconds:.0f} s", flush=True)
  print(f"\nconfigs/synthetic.py, {steps} steps (true L0 {summary['true_l0']:.2f})")
  print(f"{'step':<8}{'matmul':<10}{'loss':>10}{'L0':>8}{'FVU':>9}{'recovery':>10}"
        f"{'fallback':>10}{'seconds':>9}")
  for impl, dtype, loss, l0, fvu, rec, fb, sec in rows:
    print(f"{impl:<8}{dtype:<10}{loss:>10.5f}{l0:>8.3f}{fvu:>9.5f}{rec:>10.4f}{fb:>10.0f}"
          f"{sec:>9.0f}")


# ----------------------------------------------------------------------------- main

def main():
  args = parse_args()
  if args.precision_study:
    return precision_study(args.precision_study)
  d, f = SHAPES[args.shape]
  d, f = args.d_in or d, args.width or f
  B = args.batch
  print(f"# bench: B={B} D={d} F={f} precision={args.precision} l0_frac={args.l0_frac} "
        f"steps={args.steps} (median) warmup={args.warmup}")
  print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"GLIBC_TUNABLES={'set' if os.environ.get('GLIBC_TUNABLES') == _TUNABLES else 'default'}")
  load_start = load()
  print(f"# load average at start: {load_start}", flush=True)

  rng = np.random.default_rng(0)
  x_BxD, read_s = input_pipeline(args, d, rng)
  c = config(args, d, f, "dense")
  params = sae.init(jax.random.key(0), d, f)
  params = jax.jit(sparse_regime, static_argnums=2)(params, x_BxD, args.l0_frac)

  candidates = {"floor jax": jax_floor(x_BxD, params["W_enc"], args.precision)}
  torch_version = None
  try:
    if args.torch:
      import torch
      torch_version = torch.__version__
      candidates["floor torch"] = torch_floor(x_BxD, params["W_enc"], args.precision)
  except ImportError:
    print("# torch not installed: no torch floor and no peer (pip install -e .[bench])")
  for impl in args.impls.split(","):
    candidates[f"ours {impl}"] = our_step(config(args, d, f, impl), x_BxD, params)
  if args.peer and torch_version:
    try:
      import sae_lens
      candidates["peer saelens"] = peer_step(c, x_BxD, params, args.precision)
      print(f"# peer: sae-lens {sae_lens.__version__}, torch {torch_version} on {torch_device()}")
    except ImportError:
      print("# sae-lens not installed: no peer (pip install -e .[bench])")

  first = {}
  for name, run in candidates.items():  # warm-up: compilation and first-touch excluded
    for _ in range(args.warmup):
      first[name] = run()
  times = {name: [] for name in candidates}
  for _ in range(args.steps):
    for name, run in candidates.items():
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
  load_end = load()

  median = {k: float(np.median(v)) for k, v in times.items()}
  floor = min(median[k] for k in median if k.startswith("floor"))
  kind = jax.devices()[0].device_kind
  peak = args.peak_tflops or next(
      (v[args.precision == "bfloat16"] for k, v in PEAKS.items() if kind.startswith(k)), None)
  flops = {k: (2 if k.startswith("floor") else 10) * B * d * f for k in median}
  print(f"\n{'candidate':<16}{'median s':>10}{'p10 s':>9}{'p90 s':>9}{'tokens/s':>11}"
        f"{'TFLOP/s':>9}{'of peak':>9}{'× floor':>9}")
  for k in median:
    p10, p90 = np.percentile(times[k], [10, 90])
    tflops = flops[k] / median[k] / 1e12
    of_peak = f"{tflops / peak:.1%}" if peak else "n/a"
    print(f"{k:<16}{median[k]:>10.4f}{p10:>9.4f}{p90:>9.4f}{B / median[k]:>11.0f}"
          f"{tflops:>9.3f}{of_peak:>9}{median[k] / floor:>9.2f}")
  print(f"{'input pipeline':<16}{read_s:>10.4f}{'':>18}{B / read_s:>11.0f}   (npy memmap "
        "ActivationSource.batch, page cache warm)")

  for k in (k for k in first if k.startswith("ours")):
    m = {n: float(v) for n, v in jax.device_get(first[k]).items()}
    extra = f" dense_fallback={m['dense_fallback']:.0f}" if "dense_fallback" in m else ""
    print(f"# {k}: L0={m['l0']:.1f} ({m['l0'] / f:.2%} of F) in_window={m['in_window']:.2e} "
          f"loss={m['loss']:.4f}{extra}")
  print(f"# load average: start {load_start}, end {load_end}")
  ours = min((k for k in median if k.startswith("ours")), key=median.get)
  ratios = [f"{k}: step/floor={median[k] / floor:.2f}" +
            (f" peer/ours={median['peer saelens'] / median[k]:.2f}" if "peer saelens" in median
             else "") for k in median if k.startswith("ours")]
  print("# " + "; ".join(ratios))
  print(f"# fastest of ours: {ours}; trained tokens/s {B / median[ours]:.0f} vs read tokens/s "
        f"{B / read_s:.0f}")
  peer_ratio = (f"{median['peer saelens'] / median[ours]:.2f}" if "peer saelens" in median
                else "n/a")
  print(f"step/floor={median[ours] / floor:.2f} peer/ours={peer_ratio}")


if __name__ == "__main__":
  main()
