"""Live activations: the LM computes them chunk by chunk while training runs, on the training
mesh, instead of a store being read. The activations never leave the devices.

Chunk k holds the activations of contexts [k·C, (k+1)·C) (C = data.live_chunk_contexts; the text
restarts when it runs out) as a jax array [C, L, W] whose contexts are split over "data" like
the SAE batch's rows, so each process runs the LM only on the contexts its own devices hold
(with 2 processes each does half the LM work). Its rows are the kept tokens in context order,
the rows a harvest of the same contexts stores. Steps [k·S, (k+1)·S) (S = data.live_chunk_steps)
draw their batches from it through the store's stateless permutation, seeded by (seed, k): the
batch at a step is a pure function of (seed, step), so a resumed run recomputes its chunk and
gets the same rows. Each training step gathers its batch from the chunk on the devices inside
its own program (`gathering`, `gather`). A sweep's ensemble trains every member on the same
batch, so S SAEs share one LM pass per chunk.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from jumprelu import data, sharding
from jumprelu.lm import activations as lm_act
from jumprelu.lm import model

CHUNK_SPEC = P("data", None, None)  # [C, L, W]: contexts split across "data", as the batch rows
_REPLACE_ATTEMPTS = 64  # as data.ActivationSource: tries to find a finite stand-in for a row


def gather(mesh, acts_CxLxW: jax.Array, pos_B: jax.Array) -> jax.Array:
  """Rows pos_B (flat positions c·L + l) of the chunk, as the [B, W] batch laid out over the mesh.

  Each device picks, of the B rows, those in its own contexts (zeros for the rest), and a
  reduce-scatter over "data" hands every device its B / data rows: nothing but the batch moves
  between devices, and the sum of one row with zeros is that row exactly."""
  return _gather_fn(mesh)(acts_CxLxW, pos_B)


@functools.cache
def _gather_fn(mesh):
  def local(acts_cxLxW, pos_B):
    rows_NxW = acts_cxLxW.reshape(-1, acts_cxLxW.shape[-1])
    n = rows_NxW.shape[0]
    at_B = pos_B - jax.lax.axis_index("data") * n
    mine_B = (at_B >= 0) & (at_B < n)
    picked_BxW = jnp.where(mine_B[:, None], rows_NxW[jnp.clip(at_B, 0, n - 1)], 0.0)
    return jax.lax.psum_scatter(picked_BxW, "data", scatter_dimension=0, tiled=True)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(CHUNK_SPEC, P()), out_specs=sharding.BATCH_SPEC)
  return jax.jit(fn, out_shardings=sharding.batch_sharding(mesh))


class LiveSource:
  """Activations computed by the LM on the training mesh while training runs (see the module
  docstring). Training runs `gathering(step)` on `step_input`s; `global_batch` gives one batch
  on the mesh, `batch` a copy on the host."""

  on_mesh = True  # for train.py: the batch is made on the devices, in the main thread

  def __init__(self, c, lm=None, mesh=None):
    self.c = c
    self.mesh = mesh if mesh is not None else sharding.make_mesh(c.mesh.data, c.mesh.model)
    data_size, count = self.mesh.shape["data"], c.data.live_chunk_contexts
    if count % data_size:
      raise ValueError(f"data.live_chunk_contexts={count} is not divisible by mesh.data="
                       f"{data_size} (a chunk's contexts are split over it); choose a multiple "
                       f"of {data_size}")
    self.params, self.cfg, self.tokenizer, name = lm or lm_act.load_lm(c)
    self.site = model.parse_site(c.lm.site)
    self.d = model.site_width(self.cfg, self.site)
    self.names = [f"live {name} {c.lm.site}"]
    self.n = 0  # rows of the current chunk (for the log line)
    self._stream, self._next_ctx, self._k, self._chunk = None, 0, None, None
    self._forward = lm_act.site_fn(self.cfg, self.site)
    self._sharding = NamedSharding(self.mesh, CHUNK_SPEC)

  # --------------------------------------------------------------------------- the chunk

  def _contexts(self, first: int, count: int) -> list[np.ndarray]:
    """Contexts first … first+count−1 of the endlessly repeated packed text."""
    if self._stream is None or first < self._next_ctx:
      self._stream, self._next_ctx = lm_act.contexts(self.c, self.cfg, self.tokenizer), 0
    out = []
    while len(out) < count:
      try:
        tokens = next(self._stream)
      except StopIteration:
        if self._next_ctx == 0:
          raise ValueError(f"text.source {self.c.text.source!r} yields no context of "
                           f"{self.c.lm.context_len} tokens") from None
        self._stream = lm_act.contexts(self.c, self.cfg, self.tokenizer)  # another pass over the text
        continue
      if self._next_ctx >= first:
        out.append(tokens)
      self._next_ctx += 1
    return out

  def _activations(self, tokens_CxL: np.ndarray) -> jax.Array:
    """The chunk's activations [C, L, W] on the mesh; this process runs the LM only on the
    contexts its devices hold, lm.batch_contexts at a time (a short batch padded by repeating
    its last context: one compiled shape, the same values)."""
    count, per_batch = len(tokens_CxL), self.c.lm.batch_contexts
    lo, hi = sharding.process_rows(self.mesh, count)
    parts = []
    for start in range(lo, hi, per_batch):
      batch = tokens_CxL[start:min(start + per_batch, hi)]
      padded = np.concatenate([batch, np.repeat(batch[-1:], per_batch - len(batch), 0)])
      parts.append(self._forward(self.params, padded)[:len(batch)])
    mine = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    shape = (count, *mine.shape[1:])
    index_map = self._sharding.addressable_devices_indices_map(shape)
    pieces = [jax.device_put(mine[(idx[0].start or 0) - lo:(idx[0].stop or count) - lo], d)
              for d, idx in index_map.items()]
    return jax.make_array_from_single_device_arrays(shape, self._sharding, pieces)

  def chunk(self, k: int) -> dict:
    """Chunk k: {"acts": [C, L, W] on the mesh, "pos": the flat positions c·L + l of its kept
    tokens in order [n], "finite": whether each kept row is finite [n], "n", "seed", "first":
    its first context}. Computed once, kept until another chunk is asked for."""
    if k != self._k:
      count = self.c.data.live_chunk_contexts
      tokens_CxL = np.stack(self._contexts(k * count, count))
      acts = self._activations(tokens_CxL)
      keep_CxL = lm_act.keep_mask(self.cfg, tokens_CxL, self.c.lm.skip_positions)
      pos = np.flatnonzero(keep_CxL.ravel())
      if not len(pos):
        raise ValueError(f"live chunk {k} (contexts {k * count}..{(k + 1) * count - 1}) holds no "
                         "ordinary token; raise data.live_chunk_contexts or lm.context_len")
      sharding.wait_for_all("jumprelu_live_chunk")  # the processes' LM passes end unevenly
      finite_CxL = sharding.to_host(_finite_rows(acts))  # every process: all of the chunk's rows
      self._chunk = {"acts": acts, "pos": pos, "finite": np.asarray(finite_CxL).ravel()[pos],
                     "n": len(pos), "seed": (self.c.seed * 1_000_003 + k) % 2**63,
                     "first": k * count}
      self._k, self.n = k, len(pos)
      lo, hi = sharding.process_rows(self.mesh, count)
      logging.info("live chunk %d: %d rows; this process ran the LM on contexts %d..%d of "
                   "%d..%d", k, len(pos), k * count + lo, k * count + hi - 1, k * count,
                   (k + 1) * count - 1)
    return self._chunk

  def where(self, chunk: dict, i: int) -> str:
    """'live MODEL SITE context C position P' for row i of a chunk."""
    ctx, at = divmod(int(chunk["pos"][i]), self.c.lm.context_len)
    return f"{self.names[0]} context {chunk['first'] + ctx} position {at}"

  # --------------------------------------------------------------------------- batches

  def _rows(self, step: int, batch_size: int, skip_nonfinite: bool) -> tuple:
    """(the chunk, its row indices of the batch at `step`, where the replaced rows were):
    data.ActivationSource's sampling and non-finite handling, on the chunk's kept rows."""
    k, s = divmod(step, self.c.data.live_chunk_steps)
    chunk = self.chunk(k)
    n, seed, finite = chunk["n"], chunk["seed"], chunk["finite"]
    p = np.int64(s) * batch_size + np.arange(batch_size, dtype=np.int64)
    idx = data.permute(p % n, n, seed, p // n)
    bad = ~finite[idx]
    if bad.any() and not skip_nonfinite:
      raise FloatingPointError(
          f"non-finite activation in {self.where(chunk, idx[np.argmax(bad)])} (batch of step "
          f"{step}); check the LM, or set --config.data.skip_nonfinite=True to train on other "
          "rows instead")
    replaced = [self.where(chunk, i) for i in idx[bad]]
    for attempt in range(1, _REPLACE_ATTEMPTS + 1):
      if not bad.any():
        return chunk, idx, replaced
      q = p[bad]  # each attempt reads the stream of another seed at the same positions
      idx[bad] = data.permute(q % n, n, (seed + attempt) % 2**64, q // n)
      bad[bad] = ~finite[idx[bad]]
    raise FloatingPointError(
        f"the batch of step {step} found no finite stand-in for {int(bad.sum())} non-finite rows "
        f"in {_REPLACE_ATTEMPTS} tries (e.g. {replaced[0]}); most of the chunk is non-finite")

  def step_input(self, step: int, batch_size: int, skip_nonfinite: bool = False,
                 in_flight=None) -> tuple[tuple, list[str]]:
    """((the chunk's activations, the flat positions [B] of the batch at `step`): what a
    `gathering` step gathers its batch from; where the non-finite rows it replaced were).

    Every process calls it for every step, in order. Before a new chunk's LM pass (whose
    collectives must not run beside a step's: on CPU two processes could interleave them
    differently and deadlock) it waits for `in_flight`, the state of the step before."""
    if step // self.c.data.live_chunk_steps != self._k and in_flight is not None:
      jax.block_until_ready(in_flight)
    chunk, idx, replaced = self._rows(step, batch_size, skip_nonfinite)
    return (chunk["acts"], self._positions(chunk["pos"][idx])), replaced

  def gathering(self, step_fn):
    """A jitted step_fn(state, x) -> (state, metrics) as one program taking `step_input`'s
    value instead of x: it gathers its batch from the chunk itself (the old state donated).
    Compiled at its first call, which every process then starts together."""
    fn = jax.jit(lambda state, inp: step_fn(state, gather(self.mesh, *inp)), donate_argnums=0)
    compiled = []

    def run(state, inp):
      if not compiled:  # every process compiles it first, then all start it together
        compiled.append(fn.lower(state, inp).compile())
        sharding.wait_for_all("jumprelu_live_step")
      return compiled[0](state, inp)
    return run

  def global_batch(self, step: int, batch_size: int, skip_nonfinite: bool = False,
                   in_flight=None) -> tuple[jax.Array, list[str]]:
    """(the batch at `step` [B, W] laid out over the mesh, gathered on the devices once
    `in_flight` is ready, and waited for; where the non-finite rows it replaced were). For
    batches outside the training steps (export, histograms, tools)."""
    jax.block_until_ready(in_flight)
    inp, replaced = self.step_input(step, batch_size, skip_nonfinite)
    return jax.block_until_ready(gather(self.mesh, *inp)), replaced

  def _positions(self, pos: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(
        sharding.replicated(self.mesh), pos.astype(np.int32), pos.shape)

  def batch(self, step: int, batch_size: int, lo: int = 0, hi: int | None = None):
    """Rows [lo, hi) of the batch at `step`, copied to the host (for tools and tests)."""
    return np.asarray(sharding.to_host(self.global_batch(step, batch_size)[0]))[lo:hi]

  def batch_skipping_nonfinite(self, step: int, batch_size: int, lo: int = 0,
                               hi: int | None = None):
    x, replaced = self.global_batch(step, batch_size, skip_nonfinite=True)
    return np.asarray(sharding.to_host(x))[lo:hi], replaced

  def mean_sq_norm(self, n_rows: int, skip_nonfinite: bool = False) -> float:
    """E‖x‖² over the rows of chunk 0 that data.ActivationSource.mean_sq_norm samples (the same
    rows, copied to the host once: data.norm_rows of them at most)."""
    chunk = self.chunk(0)
    n = chunk["n"]
    idx = np.sort(data.permute(np.arange(min(n_rows, n)), n, chunk["seed"] ^ 0x5EED,
                               np.uint64(0)))
    finite = chunk["finite"][idx]
    if not finite.all() and not skip_nonfinite:
      raise FloatingPointError(
          f"non-finite activation in {self.where(chunk, idx[np.argmax(~finite)])} (sampled for "
          "the input normalisation); check the LM, or set --config.data.skip_nonfinite=True")
    idx = idx[finite]
    if not len(idx):
      raise FloatingPointError(f"all {len(finite)} rows sampled for the input normalisation "
                               "(data.norm_rows) are non-finite")
    pad = (-len(idx)) % self.mesh.shape["data"]  # the gather splits its rows over "data"
    pos = chunk["pos"][np.concatenate([idx, np.repeat(idx[-1:], pad)])]
    x = np.asarray(sharding.to_host(gather(self.mesh, chunk["acts"], self._positions(pos))))
    x = x[:len(idx)]
    # The same sum in the same order as a store's: all rows of a source of just these.
    return data.ActivationSource([x], self.names, seed=0).mean_sq_norm(len(x))


@jax.jit
def _finite_rows(acts_CxLxW):
  return jnp.all(jnp.isfinite(acts_CxLxW), axis=-1)
