"""Per-device memory of a config's train step on a mesh, without allocating a single weight.

The state is built abstractly (eval_shape), laid out by sharding.py, and the jitted step is
lowered and compiled for those shapes; XLA's memory analysis then gives what each device holds
(arguments: params, optimiser state, batch; temporaries: one step's activations).
"""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu import sharding, sweep, train, validate
from jumprelu.lm import load, model

GiB = 2.0**30


def _per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes the first device holds of a tree laid out by `shardings`."""
  total = 0
  for leaf, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    shard = s.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * leaf.dtype.itemsize
  return total


def report(c, devices=None) -> dict:
  """Bytes per device of params, optimiser state, batch, and the compiled step's temporaries."""
  devices = jax.devices() if devices is None else devices
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.model, devices)
  sharding.check_divisible(mesh, c.sae.width, c.train.batch_size)
  n_members = len(sweep.grid(c))  # a sweep holds every member's state at once
  abstract = jax.eval_shape(lambda: train.init_state(c, jax.random.key(0), 1.0, n_members))
  shardings = sharding.tree_shardings(mesh, abstract)
  batch = jax.ShapeDtypeStruct((c.train.batch_size, c.data.d_in), np.float32,
                               sharding=sharding.batch_sharding(mesh))
  step = train.jit_train_step(c, mesh, shardings)
  compiled = step.lower(abstract, batch).compile()
  analysis = compiled.memory_analysis()
  out = {
      "mesh": dict(mesh.shape),
      "params": _per_device_bytes(abstract.params, shardings.params),
      "optimizer": _per_device_bytes(abstract.opt_state, shardings.opt_state),
      "batch": _per_device_bytes(batch, batch.sharding),
      "temporaries": int(getattr(analysis, "temp_size_in_bytes", 0)),
      "arguments": int(getattr(analysis, "argument_size_in_bytes", 0)),
  }
  out["total"] = out["arguments"] + out["temporaries"]
  return out


def lm_param_count(cfg) -> int:
  """Parameters of an LMConfig, from the shapes model.forward reads."""
  d, f, q, kv = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  norms = 4 if cfg.family == "gemma2" else 2
  layer = d * q + 2 * d * kv + q * d + 3 * d * f + norms * d
  embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  return embed + d + cfg.n_layers * layer


def lm_bytes_per_device(cfg, model_size: int, dtype) -> int:
  """Bytes of LM params each device holds with the "model" axis model_size devices wide
  (sharding.lm_param_specs: a split axis divides by model_size, the rest is replicated)."""
  specs = sharding.lm_param_specs(cfg, model_size)
  is_shape = lambda x: isinstance(x, tuple) and all(isinstance(n, int) for n in x)
  shards = jax.tree.map(
      lambda shape, spec: int(np.prod([n // model_size if s == "model" else n
                                       for n, s in zip(shape, (*spec, *[None] * len(shape)))])),
      model.param_shapes(cfg), specs, is_leaf=is_shape)
  return sum(jax.tree.leaves(shards)) * jnp.dtype(dtype).itemsize  # jnp: knows bfloat16


def text_supply(c) -> str:
  """The text tokens the run reads (harvest, then evaluation past eval.skip_contexts) against
  what text.source holds, where that is known without tokenizing it."""
  L = c.lm.context_len
  train = c.harvest.num_tokens if c.data.source == "harvest" else 0
  held = (c.eval.skip_contexts + c.eval.num_contexts) * L
  if c.eval.split:
    line = (f"text: the run reads up to {train / 1e9:.3g}B tokens of split {c.text.split!r} and "
            f"{held / 1e6:.3g}M of eval.split {c.eval.split!r}; text.source={c.text.source!r} ")
  else:
    line = (f"text: the run reads up to {max(train, held) / 1e9:.3g}B tokens; "
            f"text.source={c.text.source!r} ")
  if c.text.source == "hf":
    return line + f"streams {c.text.path!r} from the hub (its size is not known offline)"
  if c.text.source == "files":
    paths = glob.glob(c.text.path, recursive=True)
    size = sum(os.path.getsize(p) for p in paths)
    return line + f"holds {len(paths)} files, {size / 1e9:.3g} GB of text"
  return line + "is the standard library's docstrings (offline, small: a demo source)"


def dry_run(c) -> str:
  """What a run of config `c` would hold, built abstractly: the LM (from lm.model_path's
  config.json, when it is a checkpoint directory) and the SAE train step per device."""
  validate.check_config(c)  # a bad key is a one-line ValueError, not a JAX error from tracing
  lines = []
  if c.lm.model_path and os.path.isfile(os.path.join(c.lm.model_path, "config.json")):
    cfg = load.hf_config(c.lm.model_path)
    site = model.parse_site(c.lm.site)
    n = lm_param_count(cfg)
    lines.append(f"LM {os.path.basename(os.path.normpath(c.lm.model_path))}: {cfg.family}, "
                 f"{cfg.n_layers} layers, d_model {cfg.d_model}, {n / 1e9:.2f}B parameters "
                 f"({n * 4 / GiB:.1f} GiB float32, {n * 2 / GiB:.1f} GiB bfloat16); "
                 f"{c.lm.site} has width {model.site_width(cfg, site)}")
    mp = jax.local_device_count() if c.lm.model_parallel == -1 else c.lm.model_parallel
    lines.append(f"LM params per device: {lm_bytes_per_device(cfg, mp, c.lm.param_dtype) / GiB:.2f}"
                 f" GiB ({c.lm.param_dtype}, split over lm.model_parallel={mp} devices; "
                 "scripts/aot_tpu.py compiles the LM's programs for a TPU topology)")
  else:
    lines.append("LM: no checkpoint directory with a config.json at lm.model_path "
                 f"({c.lm.model_path!r}); SAE only")
  if c.data.source in ("harvest", "live") or c.eval.num_contexts:
    lines.append(text_supply(c))
  n = len(sweep.grid(c))
  lines.append(f"SAE train step ({c.sae.arch}{f', a sweep of {n} SAEs' if n else ''}), "
               f"B={c.train.batch_size} D={c.data.d_in} F={c.sae.width}, per device:")
  lines.append(table(report(c)))
  return "\n".join(lines)


def table(r: dict) -> str:
  rows = [("mesh", str(r["mesh"]))] + [
      (k, f"{r[k] / GiB:8.3f} GiB") for k in ("params", "optimizer", "batch", "temporaries",
                                               "total")]
  return "\n".join(f"{k:<12} {v}" for k, v in rows)
