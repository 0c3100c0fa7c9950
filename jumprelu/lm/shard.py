"""The LM's params placed straight into their shardings on a ("data", "model") mesh.

A Hugging Face checkpoint is read slice by slice: each param is built with
jax.make_array_from_callback, whose callback reads from the safetensors files only the slice
one of this process's devices holds (the layout: sharding.lm_param_specs). No host ever holds
more than one param's local shards, never the whole model. GGUF files are read whole on the
host, then put on the mesh. abstract_params needs no weights at all (ahead-of-time compiles);
load.hf_config reads the LMConfig from a directory holding only config.json.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu import sharding
from jumprelu.lm import gguf_file, load, model


def abstract_params(cfg: model.LMConfig, mesh, dtype="float32") -> dict:
  """The params dict as jax.ShapeDtypeStructs carrying their shardings on `mesh`."""
  dtype = jnp.dtype(dtype)
  return jax.tree.map(lambda shape, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s),
                      model.param_shapes(cfg), sharding.lm_shardings(cfg, mesh),
                      is_leaf=lambda x: isinstance(x, tuple))


class _CountedSlices:
  """load.HFTensors, counting the bytes of every slice read (in the file's dtype)."""

  def __init__(self, tensors):
    self.tensors, self.bytes = tensors, 0

  def __call__(self, name):
    return _CountedSlice(self, self.tensors(name))


class _CountedSlice:

  def __init__(self, owner, slice_):
    self.owner, self.slice = owner, slice_

  def __getitem__(self, index):
    out = self.slice[index]
    self.owner.bytes += out.nbytes
    return out


def load_sharded(path: str, mesh, param_dtype="float32"):
  """(params, cfg, reads) from a HF checkpoint directory, each param on `mesh` as
  sharding.lm_param_specs lays it out, in `param_dtype`.

  Only this process's devices' slices are read, each distinct slice once (devices along "data"
  hold the same slice). reads: {"total": bytes read from the files, "slices": {param path
  ("layers/q_DxHDh"): [bytes of each distinct slice read]}}, for tests and logs.
  """
  cfg = load.hf_config(path)
  dtype = jnp.dtype(param_dtype)
  shardings = sharding.lm_shardings(cfg, mesh)
  slices = {}
  with load.HFTensors(path) as tensors:
    tensors.check_all_used(cfg)
    counted = _CountedSlices(tensors)

    def place(key_path, name, shape):
      shard = _get(shardings, key_path)
      cache, log = {}, slices.setdefault("/".join(k.key for k in key_path), [])

      def read(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:
          before = counted.bytes
          cache[key] = load.read_hf(counted, name, index, cfg.n_layers).astype(dtype, copy=False)
          log.append(counted.bytes - before)
        return cache[key]

      return jax.make_array_from_callback(shape, shard, read, dtype=dtype)

    params = jax.tree_util.tree_map_with_path(
        place, load.hf_names(cfg), model.param_shapes(cfg),
        is_leaf=lambda x: isinstance(x, str))
  return params, cfg, {"total": counted.bytes, "slices": slices}


def _get(tree, key_path):
  for k in key_path:
    tree = tree[k.key]
  return tree


def put_on_mesh(params, cfg: model.LMConfig, mesh, param_dtype="float32"):
  """Host (or single-device) params -> the same params sharded on `mesh`, in `param_dtype`."""
  dtype = jnp.dtype(param_dtype)
  params = jax.tree.map(lambda a: np.asarray(a).astype(dtype, copy=False), params)
  return jax.device_put(params, sharding.lm_shardings(cfg, mesh))


def load_on_mesh(path: str, mesh, param_dtype="float32"):
  """(params, cfg, tokenizer) on `mesh`: a HF directory read slice by slice (load_sharded), a
  .gguf file read whole on this host and then placed (GGUF stays single-host)."""
  if os.path.isdir(path):
    params, cfg, _ = load_sharded(path, mesh, param_dtype)
    return params, cfg, load.hf_tokenizer(path)
  if os.path.isfile(path) and path.endswith(".gguf"):
    params, cfg, tokenizer = gguf_file.load_gguf(path, np.float32)
    return put_on_mesh(params, cfg, mesh, param_dtype), cfg, tokenizer
  return load.load(path)  # raises its error for a path that is neither
