"""The device mesh ("data", "model") and every array's PartitionSpec, declared in one place.

The dictionary (F) is split across "model" (tensor parallel, for wide SAEs); the batch is split
across "data". Optimiser state and per-feature statistics follow their feature axis.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
