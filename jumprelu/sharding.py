"""The device mesh ("data", "model") and every array's PartitionSpec, declared in one place.

The dictionary (F) is split across "model" (tensor parallel, for wide SAEs); the batch is split
across "data". Optimiser state and per-feature statistics follow their feature axis.
"""
import itertools

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jumprelu.lm import model as lm_model

# Param name -> spec. Shapes: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], θ [F].
PARAM_SPECS = {
    "W_enc": P(None, "model"),  # [D, F]: columns (features) split across "model"
    "b_enc": P("model"),  # [F]
    "W_dec": P("model", None),  # [F, D]: rows (features) split across "model"
    "b_dec": P(),  # [D]: replicated, every device adds it
    "log_threshold": P("model"),  # [F]
    "threshold": P("model"),  # [F]
    "W_gate": P(None, "model"),  # [D, F]: the Gated SAE's encoder
    "b_gate": P("model"),  # [F]
    "r_mag": P("model"),  # [F]
    "b_mag": P("model"),  # [F]
    "tokens_since_fired": P("model"),  # [F] int32, for dead-feature counting
  "bw_count": P("model"),  # [F]: bandwidth.py's per-feature statistics (adaptive ε)
  "bw_sum": P("model"),  # [F]
  "bw_sumsq": P("model"),  # [F]
    "step": P(),  # [] int32: the train state's step counter, replicated
    "norm_scale": P(),  # [] float32: the input scale C, replicated
    "count": P(),  # [] int32: optax's step counters (schedules, bias correction), replicated
}
BATCH_SPEC = P("data", None)  # x [B, D]: rows split across "data"


def mesh_shape(data: int, model: int, n_devices: int) -> tuple[int, int]:
  """Resolves -1 entries (mesh.data / mesh.model) against the device count, and checks it."""
  if model == -1 and data == -1:
    raise ValueError("mesh.data and mesh.model cannot both be -1; set one of them")
  if model == -1:
    model = n_devices // data
  if data == -1:
    data = n_devices // model
  if data < 1 or model < 1:
    raise ValueError(f"mesh.data and mesh.model must be >= 1 (or -1); got data={data}, "
                     f"model={model} for {n_devices} devices")
  if data * model > n_devices:
    raise ValueError(f"mesh data={data} × model={model} needs {data * model} devices, but only "
                     f"{n_devices} are visible; lower mesh.data or mesh.model")
  return data, model


def make_mesh(data: int, model: int, devices=None) -> Mesh:
  """A ("data", "model") mesh over the first data×model devices."""
  devices = jax.devices() if devices is None else devices
  data, model = mesh_shape(data, model, len(devices))
  return Mesh(np.asarray(devices[:data * model]).reshape(data, model), ("data", "model"))


def _leaf_spec(path, leaf) -> P:
  """Spec of a state leaf from the innermost named key on its path (a param name, or a
  counter's field name). A leaf named nowhere in PARAM_SPECS is an error, not silently
  replicated: a new state leaf must declare how it is laid out.

  A leaf with one more axis than its spec belongs to a vmapped ensemble (sweep.py): its leading
  member axis [S] is replicated, the rest split as for one SAE."""
  names = [getattr(e, "key", getattr(e, "name", None)) for e in path]
  key = next((k for k in reversed(names) if isinstance(k, str)), None)
  if key not in PARAM_SPECS:
    raise ValueError(f"state leaf {jax.tree_util.keystr(path)} (key {key!r}, shape "
                     f"{tuple(np.shape(leaf))}) has no PartitionSpec; add {key!r} to "
                     "sharding.PARAM_SPECS with the layout of its axes")
  spec = PARAM_SPECS[key]
  if len(spec) == np.ndim(leaf) or not len(spec):  # P(): replicated, at any rank
    return spec
  if len(spec) + 1 == np.ndim(leaf):
    return P(None, *spec)
  raise ValueError(f"state leaf {jax.tree_util.keystr(path)} has shape "
                   f"{tuple(np.shape(leaf))}, but sharding.PARAM_SPECS[{key!r}] = {spec} is for {len(spec)} axes "
                   f"({len(spec) + 1} in an ensemble)")


def tree_shardings(mesh: Mesh, tree):
  """NamedShardings for a pytree of (abstract) arrays: params, optimiser state, train state."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, _leaf_spec(path, leaf)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_divisible(mesh: Mesh, width: int, batch_size: int) -> None:
  """F must split evenly over "model" and the batch over "data" (checked before compiling)."""
  model, data = mesh.shape["model"], mesh.shape["data"]
  if width % model:
    raise ValueError(f"sae.width={width} is not divisible by mesh.model={model}; choose a width "
                     f"that is a multiple of {model}")
  if batch_size % data:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by mesh.data={data}; "
                     f"choose a multiple of {data}")


def sae_shardings(mesh: Mesh, arrays: dict) -> dict:
  """Shardings of an SAE's (raw-unit, any architecture) arrays on an LM mesh for evaluation:
  features split over "model" as in training where the width divides it, else a copy per
  device."""
  if arrays["W_dec"].shape[0] % mesh.shape["model"]:
    return jax.tree.map(lambda _: replicated(mesh), arrays)
  return tree_shardings(mesh, arrays)


def process_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
  """The [lo, hi) rows of the global batch that this process's devices hold."""
  sharding = batch_sharding(mesh)
  index_map = sharding.addressable_devices_indices_map((batch_size, 1))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [batch_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  lo, hi = min(starts), max(stops)
  return lo, hi


def global_batch(mesh: Mesh, local_rows: np.ndarray, batch_size: int) -> jax.Array:
  """Assembles the global [B, D] batch from this process's rows."""
  return jax.make_array_from_process_local_data(
      batch_sharding(mesh), local_rows, (batch_size, local_rows.shape[1]))


def to_host(tree):
  """Numpy copies of (possibly sharded, possibly multi-process) arrays, whole on every process."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


_barriers = itertools.count()  # every process passes the same barriers in the same order
BARRIER_TIMEOUT_MS = 24 * 3600 * 1000  # the last process may still be harvesting its chunk


def coordination_client():
  """jax.distributed's coordination-service client (no device collective), or None."""
  from jax._src import distributed  # as orbax does: the client has no public accessor
  return distributed.global_state.client


def wait_for_all(name: str) -> None:
  """Waits until every process reaches this point, at the coordination service (no device
  collective): before a collective that follows uneven work. On CPU, gloo gives up on a peer
  that is ~30 s late ("Read timeout")."""
  if jax.process_count() == 1:
    return
  client = coordination_client()
  if client is None:
    multihost_utils.sync_global_devices(name)
  else:
    client.wait_at_barrier(f"{name}_{next(_barriers)}", BARRIER_TIMEOUT_MS)


# ---------------------------------------------------------------------------------------------
# The LM (jumprelu/lm/model.py's params dict) on a ("data", "model") mesh.
#
# Megatron-style tensor parallelism over "model", batch over "data". Each attention block is
# split by heads: q's columns and o's rows are laid out head-major (h * Dh + d), so splitting
# them over "model" gives every device whole query heads, and k/v split the same way give it
# exactly the KV heads those query heads read (head h reads KV head h // G). The MLP is split
# by hidden unit (gate/up columns, down rows), so each device's block ends in one partial sum
# that XLA all-reduces. The vocabulary is split too (embed rows, unembed columns): at Gemma 2's
# 256k tokens it is the largest single weight. Norms are tiny and replicated. The stacked layer
# axis is never split: every device runs every layer (fori_loop), on its share of each.
# ---------------------------------------------------------------------------------------------

LM_BATCH_SPEC = P("data", None)  # tokens [B, L]: contexts split across "data"


def lm_param_specs(cfg, model_size: int) -> dict:
  """PartitionSpecs mirroring the LM params dict (model.param_shapes) for a "model" axis of
  `model_size` devices. Axes that do not divide evenly are replicated (see the comments)."""
  def split(size, spec):
    return spec if size % model_size == 0 else P()

  # GQA models often have fewer KV heads than devices (SmolLM2: 3; Llama 3 8B: 8): k/v are
  # then replicated, each device computing every KV head (a small [D, K*Dh] matmul) rather than
  # splitting a head's Dh across devices, which would cut through its RoPE halves and scores.
  kv = split(cfg.n_kv_heads, P(None, None, "model"))
  layer = {
      "q_DxHDh": split(cfg.n_heads, P(None, None, "model")),  # [layers, D, H*Dh]: query heads
      "k_DxKDh": kv,  # [layers, D, K*Dh]: KV heads
      "v_DxKDh": kv,  # [layers, D, K*Dh]
      "o_HDhxD": split(cfg.n_heads, P(None, "model", None)),  # [layers, H*Dh, D]: rows = heads
      "gate_DxF": split(cfg.d_ff, P(None, None, "model")),  # [layers, D, F]: hidden units
      "up_DxF": split(cfg.d_ff, P(None, None, "model")),  # [layers, D, F]
      "down_FxD": split(cfg.d_ff, P(None, "model", None)),  # [layers, F, D]
  }
  shapes = lm_model.param_shapes(cfg)
  specs = {
      "embed_VxD": split(cfg.vocab_size, P("model", None)),  # [V, D]: vocabulary rows
      "final_norm_D": P(),  # [D]
      "layers": {k: layer.get(k, P()) for k in shapes["layers"]},  # norms [layers, D]: replicated
  }
  if "unembed_DxV" in shapes:
    specs["unembed_DxV"] = split(cfg.vocab_size, P(None, "model"))  # [D, V]: vocabulary columns
  return specs


def lm_shardings(cfg, mesh: Mesh) -> dict:
  """NamedShardings of the LM params on `mesh` (lm_param_specs for its "model" size)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      lm_param_specs(cfg, mesh.shape["model"]),
                      is_leaf=lambda x: isinstance(x, P))


def lm_mesh(c, devices=None, lm_cfg=None) -> Mesh:
  """The LM's ("data", "model") mesh: "model" = lm.model_parallel devices (-1: every device of
  this process), "data" = the rest. `devices` defaults to this process's local devices (each
  process its own LM copy, as harvest needs); pass jax.devices() for one mesh spanning every
  process. Each "model" group lies within one process (devices are ordered by process), so the
  per-layer all-reduces never cross hosts. With `lm_cfg` (an LMConfig) the model size is also
  checked against the LM's attention heads."""
  return lm_mesh_of(c.lm.model_parallel, jax.local_devices() if devices is None else devices,
                    lm_cfg)


def lm_mesh_of(model_parallel: int, devices, lm_cfg=None) -> Mesh:
  """lm_mesh from the value of lm.model_parallel and the devices."""
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  per_process = {}
  for d in devices:
    per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
  local = min(per_process.values())
  model = local if model_parallel == -1 else model_parallel
  valid = [m for m in range(1, local + 1)
           if all(n % m == 0 for n in per_process.values())
           and (lm_cfg is None or lm_cfg.n_heads % m == 0)]
  if model not in valid:
    why = f"the {local} devices of a process" + (
        f" and the LM's {lm_cfg.n_heads} attention heads" if lm_cfg is not None else "")
    raise ValueError(f"lm.model_parallel={model_parallel} (model size {model}) must divide {why}; "
                     f"choose one of {valid}")
  return Mesh(np.asarray(devices).reshape(len(devices) // model, model), ("data", "model"))


def local_data_size(mesh: Mesh) -> int:
  """How many rows of the "data" axis hold a device of this process."""
  rows = np.vectorize(lambda d: d.process_index == jax.process_index())(mesh.devices)
  return int(rows.any(axis=1).sum())


def lm_batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, LM_BATCH_SPEC)
