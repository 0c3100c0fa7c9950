"""Compile-proof for TPU topologies from any machine: every program a config runs, compiled by
XLA for a named topology (libtpu's compile-only devices, `pip install "libtpu==0.0.42.*"`), with
XLA's per-device memory and cost-model figures beside the ideal time.

Programs (one row each):
  harvest  the LM to lm.site over lm.batch_contexts × lm.context_len tokens, on one process's
           local devices (every process runs the same program on its own), tensor-parallel over
           lm.model_parallel of them and batch-parallel over the rest
  train    the SAE step (train.step_impl resolved as a run on that platform resolves it) on the
           mesh of every device (mesh.data × mesh.model)
  sweep    the vmapped ensemble step of the config's sweep (or of --sweep=S members)
  live     the LM forward and the SAE (ensemble) step as one program over every device: the LM
           on the ("data", "model") mesh with lm.model_parallel, the SAE on its own mesh of the
           same devices; enough contexts for one batch, its first train.batch_size rows trained on
  eval_clean, eval_sae  spliced.py's two programs per eval batch (lm.batch_contexts contexts):
           the clean and zero-ablated runs, then the run with the SAE spliced in; per process

Ideal time = ideal FLOPs / (devices × the chip's peak bf16 FLOP/s): 12·B·D·F per SAE step (the
encoder, the decoder and their four gradient products), 2 × the parameters of the LM layers run
× tokens (the unembedding counted on full runs; attention's L² terms left out) for the LM.
These are compiler predictions, not measurements: XLA's cost model can be far off (it gives a
negative time for some programs on v5e; such rows say so).
"""
import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jumprelu import arch, live, sharding, sparse, spliced, sweep, train
from jumprelu.lm import load, model, shard

GiB = 2.0**30

# Per chip: (peak dense bf16 FLOP/s, HBM bytes). Google Cloud's TPU system-architecture pages
# (cloud.google.com/tpu/docs/v3, v4, v5e, v5p, v6e: "peak compute per chip (bf16)", "HBM
# capacity"). v3 and v4 topologies compile one device per TensorCore (two per chip), each
# holding half the chip's HBM and compute.
CHIPS = {
    "TPU v3": (123e12, 32 * GiB),
    "TPU v4": (275e12, 32 * GiB),
    "TPU v5 lite": (197e12, 16 * GiB),  # v5e
    "TPU v5": (459e12, 95 * GiB),  # v5p
    "TPU v6 lite": (918e12, 32 * GiB),  # v6e (Trillium)
}
ACCELERATOR_TYPES = {"v3": "v3-8", "v4": "v4-8", "v5e": "v5litepod-8", "v5p": "v5p-8",
                     "v6e": "v6e-8"}


def topology_devices(name: str) -> list:
  """The compile-only devices of a TPU topology such as "v5e:2x4" or "v5e:16x16"."""
  from jax.experimental import topologies
  generation = name.split(":")[0]
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", ACCELERATOR_TYPES.get(generation, "v5litepod-8"))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no metadata server to ask
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other compile-only processes
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except (ImportError, RuntimeError) as e:
    raise ValueError(f"--topology={name}: no TPU topology ({str(e).splitlines()[0][:200]}); "
                     "install libtpu (pip install \"libtpu==0.0.42.*\", the pin of jax 0.10's "
                     "tpu extra) and name one like v5e:2x4, v4:2x2x1, v5p:2x2x2, v6e:2x4") from e


def chip(devices) -> dict:
  """Per-device HBM and peak FLOP/s of a topology's devices (CHIPS over devices per chip)."""
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise ValueError(f"no peak FLOP/s or HBM known for {kind!r}; add it to aot.CHIPS")
  per_chip = len({getattr(d, "core_on_chip", 0) for d in devices})
  peak, hbm = CHIPS[kind]
  return {"kind": kind, "hbm": hbm / per_chip, "peak": peak / per_chip,
          "devices_per_chip": per_chip}


# ----------------------------------------------------------------------------- the LM

def lm_config(c) -> model.LMConfig:
  """The LMConfig from lm.model_path's config.json alone (no weights read), at lm.dtype."""
  path = c.lm.model_path
  if not path or not os.path.isfile(os.path.join(path, "config.json")):
    raise ValueError(f"lm.model_path={path!r} holds no config.json; point it at a checkpoint "
                     "directory (a directory with only config.json is enough)")
  return dataclasses.replace(load.hf_config(path), dtype=c.lm.dtype)


def lm_flops(cfg, tokens: int, layers: int, unembed: bool) -> float:
  """2 × (matmul params of `layers` layers, + the unembedding) × tokens."""
  q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  per_layer = 2 * cfg.d_model * q + 2 * cfg.d_model * kv + 3 * cfg.d_model * cfg.d_ff
  return 2.0 * tokens * (layers * per_layer + (cfg.vocab_size * cfg.d_model if unembed else 0))


def _shard_bytes(a) -> int:
  return int(np.prod(a.sharding.shard_shape(a.shape), dtype=np.int64)) * a.dtype.itemsize


# ----------------------------------------------------------------------------- programs

def _sae_state(c, mesh, n_members):
  abstract = jax.eval_shape(lambda: train.init_state(c, jax.random.key(0), 1.0, n_members))
  shardings = sharding.tree_shardings(mesh, abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings), shardings


def _sweep_config(c, n: int):
  """c with a sweep of n λ values (log-spaced around sae.sparsity_coefficient), dense step."""
  c = c.copy_and_resolve_references()
  lam = c.sae.sparsity_coefficient
  with c.unlocked():
    c.sweep.sparsity_coefficient = tuple(float(v) for v in np.geomspace(lam / 2, lam * 2, n))
    c.train.step_impl = "dense"
  return c


def programs(c, devices, sweep_n: int = 0, with_live: bool | None = None) -> list[dict]:
  """[{name, lower: () -> Lowered, flops: ideal FLOPs, devices: how many run it, note}]."""
  platform = devices[0].platform
  c = sparse.resolve_step_impl(c, platform)
  out = []
  # Evaluation needs the LM: harvest and live runs, or a store whose LM lm.model_path names.
  evaluates = c.eval.num_contexts > 0 and (c.data.source in ("harvest", "live") or (
      c.data.source == "npy" and bool(c.lm.model_path)))
  has_lm = c.data.source in ("harvest", "live") or evaluates or with_live
  cfg = lm_config(c) if has_lm else None
  local = [d for d in devices if d.process_index == devices[0].process_index]
  dtype = c.lm.param_dtype
  site = model.parse_site(c.lm.site) if has_lm else None
  if cfg is not None:
    # Harvest and evaluation run on each process's own devices; where XLA refuses a program on
    # part of a slice (v5e and v6e pods: "device assignment should include all slice devices"),
    # the same work as one program over every device (each process its own contexts).
    per_process = _lm_programs(c, cfg, site, local, dtype, evaluates)
    whole = _lm_programs(c, cfg, site, devices, dtype, evaluates)
    for p, fallback in zip(per_process, whole):
      p["fallback"] = fallback
    out += [p for p in per_process if p["name"] == "harvest"]

  mesh = sharding.make_mesh(c.mesh.data, c.mesh.model, devices)
  sharding.check_divisible(mesh, c.sae.width, c.train.batch_size)
  bdf = 12.0 * c.train.batch_size * c.data.d_in * c.sae.width
  members = len(sweep.grid(c))
  state, shardings = _sae_state(c, mesh, members)
  batch = jax.ShapeDtypeStruct((c.train.batch_size, c.data.d_in), jnp.float32,
                               sharding=sharding.batch_sharding(mesh))
  step = train.jit_train_step(c, mesh, shardings)
  out.append({"name": "sweep" if members else "train",
              "lower": lambda: step.lower(state, batch), "args": (state, batch),
              "flops": bdf * max(members, 1),
              "devices": len(devices),
              "note": (f"{members} SAEs, " if members else "") +
                      f"{c.train.step_impl}, mesh {dict(mesh.shape)}"})
  sc = c
  if sweep_n and not members:
    sc = _sweep_config(c, sweep_n)
    s_state, s_shardings = _sae_state(sc, mesh, sweep_n)
    s_step = train.jit_train_step(sc, mesh, s_shardings)
    out.append({"name": "sweep", "lower": lambda: s_step.lower(s_state, batch),
                "args": (s_state, batch),
                "flops": bdf * sweep_n, "devices": len(devices),
                "note": f"{sweep_n} SAEs, dense, mesh {dict(mesh.shape)}"})

  if cfg is not None and (with_live or (with_live is None and c.data.source == "live")):
    out.append(_live(sc, cfg, site, devices, mesh, dtype, bdf))

  if evaluates:
    out += [p for p in per_process if p["name"] != "harvest"]
  return out


def _lm_programs(c, cfg, site, devs, dtype, evaluates) -> list[dict]:
  """The harvest forward (when data.source=harvest) and the evaluation programs on `devs`: one
  process's devices, or several processes' (each with its own lm.batch_contexts contexts)."""
  procs = len({d.process_index for d in devs})
  scope = "process" if procs == 1 else "all"
  pmesh = sharding.lm_mesh(c, devs, cfg)
  lm_params = shard.abstract_params(cfg, pmesh, dtype)
  L, out = c.lm.context_len, []
  for key, per in (("lm.batch_contexts", c.lm.batch_contexts),
                   ("eval.batch_contexts", c.eval.batch_contexts)):
    if per * procs % pmesh.shape["data"]:
      raise ValueError(f"{key}={per} is not divisible by the {pmesh.shape['data'] // procs} "
                       f"data-parallel groups of a process ({len(devs) // procs} devices / "
                       f"{pmesh.shape['model']} along \"model\"); choose a multiple")
  if c.data.source == "harvest":
    n_ctx = c.lm.batch_contexts * procs
    tokens = jax.ShapeDtypeStruct((n_ctx, L), jnp.int32,
                                  sharding=sharding.lm_batch_sharding(pmesh))
    fwd = jax.jit(lambda p, t: model.forward(p, cfg, t, site=site, stop_at_site=True)[1])
    out.append({"name": "harvest", "lower": lambda: fwd.lower(lm_params, tokens),
                "args": (lm_params, tokens), "devices": len(devs),
                "flops": lm_flops(cfg, n_ctx * L, site.layer + 1, False),
                "loop": {**_layer_loop(cfg, pmesh, tokens, dtype, "harvest/" + scope),
                         "runs": 1, "trips": site.layer + 1},
                "note": f"{c.lm.batch_contexts}x{L} tokens/process, LM {dict(pmesh.shape)}"})
  if evaluates:
    tokens = jax.ShapeDtypeStruct((c.eval.batch_contexts * procs, L), jnp.int32,
                                  sharding=sharding.lm_batch_sharding(pmesh))
    layer = _layer_loop(cfg, pmesh, tokens, dtype, "eval/" + scope)
    out += _eval(c, cfg, site, pmesh, lm_params, tokens, len(devs), layer, procs)
  return out


def _layer_loop(cfg, mesh, tokens, dtype, key: str) -> dict:
  """A one-layer LM over the same tokens and mesh: XLA's cost analysis counts a while loop's
  body once, not once per trip, so an LM program's figures are corrected by this program's
  (see compile_program)."""
  one = dataclasses.replace(cfg, n_layers=1, sliding_layers=())
  params = shard.abstract_params(one, mesh, dtype)
  fwd = jax.jit(lambda p, t: model.forward(p, one, t, site=model.Site("resid_post", 0),
                                           stop_at_site=True)[1])
  return {"key": key, "lower": lambda: fwd.lower(params, tokens)}


def _live(c, cfg, site, devices, mesh, dtype, bdf) -> dict:
  """live.py's step as one program over every device: each process's LM forward of
  lm.batch_contexts contexts (the LM mesh spans the processes, its "model" groups within one),
  and the SAE (ensemble) step on a batch gathered (live.gather) from the chunk the devices hold
  meanwhile ([data.live_chunk_contexts, L, W] float32, split over the SAE mesh's "data")."""
  gmesh = sharding.lm_mesh(c, devices, cfg)
  L, B, W = c.lm.context_len, c.train.batch_size, model.site_width(cfg, site)
  n_ctx = c.lm.batch_contexts * len({d.process_index for d in devices})
  members = len(sweep.grid(c))
  state, shardings = _sae_state(c, mesh, members)
  params = shard.abstract_params(cfg, gmesh, dtype)
  tokens = jax.ShapeDtypeStruct((n_ctx, L), jnp.int32,
                                sharding=sharding.lm_batch_sharding(gmesh))
  chunk = jax.ShapeDtypeStruct((c.data.live_chunk_contexts, L, W), jnp.float32,
                               sharding=NamedSharding(mesh, live.CHUNK_SPEC))
  pos = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=sharding.replicated(mesh))
  if members:
    hp_S = sweep.stacked_hparams(sweep.grid(c))
    step_fn = lambda s, x: train.ensemble_step(c, s, x, hp_S)
  else:
    step_fn = lambda s, x: train.train_step(c, s, x)

  def live_step(lm_params, state, chunk_CxLxW, pos_B, tokens_NxL):
    acts = model.forward(lm_params, cfg, tokens_NxL, site=site, stop_at_site=True)[1]
    state, metrics = step_fn(state, live.gather(mesh, chunk_CxLxW, pos_B))
    return state, metrics, acts.astype(jnp.float32)

  shard_of = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
  fn = jax.jit(live_step, in_shardings=(shard_of(params), shardings, chunk.sharding,
                                        pos.sharding, tokens.sharding),
               out_shardings=(shardings, sharding.replicated(mesh),
                              NamedSharding(gmesh, P("data", None, None))), donate_argnums=1)
  return {"name": "live", "lower": lambda: fn.lower(params, state, chunk, pos, tokens),
          "args": (params, state, chunk, pos, tokens),
          "flops": lm_flops(cfg, n_ctx * L, site.layer + 1, False) + bdf * max(members, 1),
          "devices": len(devices), "loop": {**_layer_loop(cfg, gmesh, tokens, dtype, "global"),
                                            "runs": 1, "trips": site.layer + 1},
          "note": f"{n_ctx}x{L} tokens, LM {dict(gmesh.shape)}, chunk of "
                  f"{c.data.live_chunk_contexts}" + (f", {members} SAEs" if members else "")}


def _eval(c, cfg, site, pmesh, lm_local, tokens, n_local, layer, procs) -> list[dict]:
  """spliced.py's clean run and SAE-spliced run over one eval batch (eval.batch_contexts), on one
  process's devices."""
  n_ctx, L = tokens.shape
  raw = jax.eval_shape(lambda: arch.init(c, jax.random.key(0)))
  if c.sae.arch in ("jumprelu", "batchtopk"):  # export.raw_params: θ written out explicitly
    raw = {**{n: raw[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")},
           "threshold": jax.ShapeDtypeStruct((c.sae.width,), jnp.float32)}
  # Features split over "model", as evaluate_many places them (sharding.sae_shardings).
  sae_abs = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=sh),
                         raw, sharding.sae_shardings(pmesh, raw))
  kw = dict(cfg=cfg, site=site)
  clean_abs = jax.eval_shape(
      lambda p, t: spliced._clean(p, t, skip_positions=c.lm.skip_positions, **kw),
      lm_local, tokens)
  batch_sharded = lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=NamedSharding(pmesh, P("data", *([None] * (a.ndim - 1)))))
  clean_abs = jax.tree.map(batch_sharded, clean_abs)
  half = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(pmesh))
  k = c.sae.k if c.sae.arch == "topk" else None
  full = lm_flops(cfg, n_ctx * L, cfg.n_layers, True)
  sae_f = 4.0 * n_ctx * L * c.data.d_in * c.sae.width  # encode and decode, twice
  note = f"{n_ctx // procs}x{L} tokens/process"
  return [
      {"name": "eval_clean", "lower": lambda: spliced._clean.lower(
          lm_local, tokens, skip_positions=c.lm.skip_positions, **kw),
       "args": (lm_local, tokens), "flops": 2 * full, "devices": n_local, "note": note + ", clean + zero-ablated",
       "loop": {**layer, "runs": 2, "trips": cfg.n_layers}},
      {"name": "eval_sae", "lower": lambda: spliced._sae_sums.lower(
          lm_local, sae_abs, tokens, clean_abs, half, arch=c.sae.arch, k=k, **kw),
       "args": (lm_local, sae_abs, tokens, clean_abs, half), "flops": full + sae_f,
       "devices": n_local, "note": note + ", SAE spliced in",
       "loop": {**layer, "runs": 1, "trips": cfg.n_layers}},
  ]


# ----------------------------------------------------------------------------- compile

def _compile(lower) -> tuple:
  t0 = time.time()
  compiled = lower().compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (compiled.memory_analysis(), float(cost.get("flops", 0)),
          float(cost.get("optimal_seconds", float("nan"))), time.time() - t0)


def compile_program(p: dict, ch: dict, bodies: dict | None = None) -> dict:
  """Compiles one program; its per-device memory, FLOPs and cost-model time beside the ideal.

  A program with a layer loop (p["loop"]) adds (trips − 1) × runs times its one-layer program's
  FLOPs and time (compiled once per key into `bodies`): XLA counts a loop body once. A program
  XLA refuses for want of HBM gives a row with the temporaries it asked for; one it refuses on
  part of a slice is compiled as p["fallback"], over every device."""
  args = sum(_shard_bytes(a) for a in jax.tree.leaves(p["args"]))  # the first device's shards
  row = {"program": p["name"], "arguments": args, "argument_shards": args, "hbm": ch["hbm"],
         "outputs": 0,
         "ideal_flops": p["flops"] / p["devices"],
         "ideal_s": p["flops"] / (p["devices"] * ch["peak"]), "note": p["note"]}
  try:
    m, flops, model_s, row["compile_s"] = _compile(p["lower"])
  except Exception as e:  # XLA refuses a program on part of a slice, or one that does not fit
    if "should include all slice devices" in str(e) and "fallback" in p:
      row = compile_program(p["fallback"], ch, bodies)
      return {**row, "note": row["note"] + "; one program over every process (XLA refuses "
                             "one on a process's devices alone in this slice)"}
    need = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or need is None:
      raise
    temps = float(need[1]) * 2.0**(10 * "KMGT".index(need[2]) + 10)
    return {**row, "temporaries": int(temps), "total": int(args + temps), "flops": math.nan,
            "cost_model_s": math.nan, "compile_s": math.nan,
            "note": p["note"] + "; XLA refused it: out of HBM"}
  if "loop" in p:
    loop, bodies = p["loop"], {} if bodies is None else bodies
    if loop["key"] not in bodies:
      bodies[loop["key"]] = _compile(loop["lower"])[1:3]
    body_flops, body_s = bodies[loop["key"]]
    extra = (loop["trips"] - 1) * loop["runs"]
    flops += extra * body_flops
    model_s = model_s + extra * body_s if model_s > 0 and body_s > 0 else min(model_s, body_s)
  temps, args = int(m.temp_size_in_bytes), int(m.argument_size_in_bytes)  # TPU tiles pad a little
  outs = int(m.output_size_in_bytes) - int(m.alias_size_in_bytes)  # donated buffers reused
  return {**row, "arguments": args, "temporaries": temps, "outputs": outs,
          "total": args + temps + outs,
          "flops": flops, "cost_model_s": model_s}


def compile_all(c, topology: str, sweep_n: int = 0, with_live: bool | None = None,
                only=None, log=print) -> list[dict]:
  """Every program of config c compiled for `topology`; one row each (see compile_program)."""
  devices = topology_devices(topology)
  ch = chip(devices)
  log(f"{topology}: {len(devices)} devices ({ch['kind']}, {ch['devices_per_chip']} per chip) in "
      f"{len({d.process_index for d in devices})} processes; "
      f"{ch['hbm'] / GiB:.1f} GiB HBM and {ch['peak'] / 1e12:.1f} TFLOP/s bf16 per device")
  rows, bodies = [], {}
  for p in programs(c, devices, sweep_n, with_live):
    if only and p["name"] not in only:
      continue
    rows.append(compile_program(p, ch, bodies))
    log(format_row(rows[-1]))
  return rows


HEADER = (f"{'program':<11} {'args GiB':>9} {'temp GiB':>9} {'out GiB':>8} {'total GiB':>9} "
          f"{'HBM GiB':>8} {'TFLOP/dev':>10} {'ideal TF':>9} {'model ms':>9} {'ideal ms':>9} {'model/ideal':>11}"
          "  note")


def format_row(r: dict) -> str:
  ratio = (f"{r['cost_model_s'] / r['ideal_s']:11.2f}" if r["cost_model_s"] > 0 else
           f"{'(negative)' if r['cost_model_s'] < 0 else 'n/a':>11}")  # n/a: NaN, not compiled
  return (f"{r['program']:<11} {r['arguments'] / GiB:9.3f} {r['temporaries'] / GiB:9.3f} "
          f"{r['outputs'] / GiB:8.3f} {r['total'] / GiB:9.3f} {r['hbm'] / GiB:8.1f} "
          f"{r['flops'] / 1e12:10.3f} {r['ideal_flops'] / 1e12:9.3f} {r['cost_model_s'] * 1e3:9.2f} "
          f"{r['ideal_s'] * 1e3:9.2f} {ratio}  {r['note']}")


def summary(rows: list[dict]) -> str:
  top = max(r["total"] for r in rows)
  hbm = min(r["hbm"] for r in rows)
  return f"max_device_GiB={top / GiB:.3f} hbm_GiB={hbm / GiB:.1f} fits={top <= hbm}"
