"""The LM as the job uses it: loaded once per config, the text packed into contexts, which
positions count, and a jitted forward to a site. Harvest, live training, evaluation and the
feature tools all go through here."""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu import sharding
from jumprelu.lm import load, model, shard, text


def load_lm(c, devices=None):
  """(params, cfg, tokenizer, model name) for config key lm.model_path ("" = SmolLM2-135M).

  The params are stored in lm.param_dtype on sharding.lm_mesh(c) over `devices` (default: this
  process's local devices, so each process holds its own copy and harvests with no
  cross-process traffic; jax.devices() gives one mesh spanning every process). mesh_of(params)
  recovers the mesh. Loaded once per (config, devices): harvest, live training and evaluation
  in one job share it."""
  devices = tuple(jax.local_devices() if devices is None else devices)
  # Harvest and live training forward lm.batch_contexts contexts at a time: refuse a batch that
  # cannot split over "data" before the weights are read (site_fn checks every batch again).
  _check_batch(c.lm.batch_contexts, sharding.lm_mesh_of(c.lm.model_parallel, devices))
  return _load_lm(c.lm.model_path or load.default_model_path(), c.lm.dtype, c.lm.param_dtype,
                  c.lm.model_parallel, c.lm.bos_id, c.lm.eos_id, devices)


@functools.cache
def _load_lm(path: str, dtype: str, param_dtype: str, model_parallel: int, bos_id: int,
             eos_id: int, devices: tuple):
  if os.path.isdir(path):  # read slice by slice straight onto the mesh
    mesh = sharding.lm_mesh_of(model_parallel, devices, load.hf_config(path))
    params, cfg, _ = shard.load_sharded(path, mesh, param_dtype)
    tokenizer = load.hf_tokenizer(path)
  else:  # GGUF: read whole on this host, then placed
    params, cfg, tokenizer = load.load(path, jnp.dtype(param_dtype))
    mesh = sharding.lm_mesh_of(model_parallel, devices, cfg)
    params = shard.put_on_mesh(params, cfg, mesh, param_dtype)
  cfg = dataclasses.replace(cfg, dtype=dtype, bos_id=cfg.bos_id if bos_id < 0 else bos_id,
                            eos_id=cfg.eos_id if eos_id < 0 else eos_id)
  return params, cfg, tokenizer, os.path.basename(os.path.normpath(path))


def mesh_of(params):
  """The ("data", "model") mesh load_lm placed `params` on; None for params on one device
  (e.g. tests' tiny LMs), which site_fn then runs unsharded."""
  s = getattr(params["embed_VxD"], "sharding", None)
  return s.mesh if isinstance(s, jax.sharding.NamedSharding) else None


@functools.cache
def _stdlib_docs() -> tuple[str, ...]:
  return tuple(text.stdlib_docstrings())  # imports the whole standard library: do it once


def documents(c):
  """The text documents named by text.source: stdlib | files | hf."""
  if c.text.source == "stdlib":
    return iter(_stdlib_docs())
  if c.text.source == "files":
    return text.local_files(c.text.path, field=c.text.field)
  if c.text.source == "hf":
    return text.hf_dataset(c.text.path, c.text.split, field=c.text.field)
  raise ValueError(f"text.source must be one of ('stdlib', 'files', 'hf'), got {c.text.source!r}")


def contexts(c, cfg, tokenizer):
  """Packed int32 contexts [lm.context_len], BOS first, in a fixed order."""
  return text.pack(documents(c), tokenizer, c.lm.context_len, cfg.bos_id, cfg.eos_id)


def keep_mask(cfg, tokens_BxL, skip_positions: int = 0):
  """Positions whose activations are used: not BOS, EOS or padding, nor the first
  `skip_positions` after BOS. Works on numpy and jax arrays."""
  keep_BxL = text.harvest_mask(tokens_BxL, cfg.bos_id, cfg.eos_id, cfg.pad_id)
  if skip_positions:
    keep_BxL = keep_BxL & (np.arange(tokens_BxL.shape[1]) > skip_positions)
  return keep_BxL


def context_rows(c, forward, params, cfg, batch: list) -> list[np.ndarray]:
  """Each context's kept activations [n_i, W], from one forward over lm.batch_contexts contexts
  (a short batch is padded by repeating its last context: one compiled shape, same values)."""
  tokens_BxL = np.stack(batch + [batch[-1]] * (c.lm.batch_contexts - len(batch)))
  acts_BxLxW = np.asarray(forward(params, tokens_BxL))
  keep_BxL = keep_mask(cfg, tokens_BxL, c.lm.skip_positions)
  return [acts_BxLxW[b][keep_BxL[b]] for b in range(len(batch))]


@functools.cache
def site_fn(cfg, site):
  """(params, tokens [B, L]) -> float32 activation [B, L, W] at `site`, jitted, stopping after
  its layer. tokens: host numpy or a jax array. On params from load_lm the batch is split over
  the mesh's "data" axis (B must be a multiple of its size) and the result stays there, sharded
  (np.asarray gathers it). On a mesh spanning processes (load_lm(c, jax.devices())), numpy
  tokens are this process's rows of the global batch and the result is a global array, to be
  consumed on the devices (live training)."""
  fwd = functools.partial(model.forward, cfg=cfg, site=site, stop_at_site=True)
  plain = jax.jit(lambda params, tokens: fwd(params, tokens_BxL=tokens)[1].astype(jnp.float32))

  def run(params, tokens_BxL):
    mesh = mesh_of(params)
    if mesh is None:
      return plain(params, tokens_BxL)
    return _site_on_mesh(cfg, site, mesh)(params, tokens_on_mesh(mesh, tokens_BxL))

  return run


@functools.cache
def _site_on_mesh(cfg, site, mesh):
  fwd = functools.partial(model.forward, cfg=cfg, site=site, stop_at_site=True)
  return jax.jit(lambda params, tokens: fwd(params, tokens_BxL=tokens)[1].astype(jnp.float32),
                 in_shardings=(sharding.lm_shardings(cfg, mesh), sharding.lm_batch_sharding(mesh)),
                 out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))


def tokens_on_mesh(mesh, tokens_BxL):
  """Tokens [B, L] split over the LM mesh's "data" axis (a jax array already there passes
  through); refuses a B that does not split, before any compute."""
  batch = sharding.lm_batch_sharding(mesh)
  if isinstance(tokens_BxL, jax.Array) and tokens_BxL.sharding == batch:
    return tokens_BxL
  tokens_BxL = np.asarray(tokens_BxL)
  _check_batch(tokens_BxL.shape[0], mesh)
  return jax.make_array_from_process_local_data(batch, tokens_BxL)


def _check_batch(n_contexts: int, mesh):
  local = sharding.local_data_size(mesh)
  if n_contexts % local:
    raise ValueError(
        f"{n_contexts} contexts per LM forward do not split over the LM mesh's {local} "
        f"\"data\" devices in this process (mesh {dict(mesh.shape)}, lm.model_parallel="
        f"{mesh.shape['model']}); set lm.batch_contexts to a multiple of {local}, or raise "
        "lm.model_parallel so fewer devices share the batch")


def model_name(c) -> str:
  """lm.model_path's file or folder name: what a harvested store's manifest records as "model"."""
  return os.path.basename(os.path.normpath(c.lm.model_path or load.default_model_path()))


def model_info(c) -> dict:
  """lm.model_path's Hugging Face id, quantisation and file name, for export metadata."""
  return load.model_info(c.lm.model_path or load.default_model_path())
