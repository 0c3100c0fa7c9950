"""Activation sources: `.npy` shards on disk (memory-mapped) and a synthetic source.

The batch at step s is a pure function of (seed, s): row positions s·B … s·B+B−1 of an endless
stream are mapped through a per-epoch pseudo-random permutation of the N stored rows. The
permutation is a Feistel network with cycle walking, so it needs O(1) memory for any N and a
resumed or multi-process run reads exactly the rows an uninterrupted run would.
"""
import glob
import json
import os
import queue
import threading

import ml_dtypes
import numpy as np
from absl import logging

from jumprelu import files

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
DTYPES = ("float32", "float16", "bfloat16")  # what an activation store may hold
_REPLACE_ATTEMPTS = 64  # tries to find a finite stand-in for a non-finite row


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective avalanche hash on uint64 (wrapping arithmetic)."""
  with np.errstate(over="ignore"):
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(i: np.ndarray, n: int, seed: int, epoch: np.ndarray) -> np.ndarray:
  """A pseudo-random bijection of [0, n) applied to i, different for every (seed, epoch)."""
  i = np.asarray(i, np.uint64)
  half = max(1, (int(n - 1).bit_length() + 1) // 2)  # the domain 2^(2·half) covers [0, n)
  mask = np.uint64((1 << half) - 1)
  with np.errstate(over="ignore"):
    base = _mix64(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) ^ _mix64(
        np.asarray(epoch, np.uint64) + np.uint64(0x632BE59BD9B4E019)))
  base = np.broadcast_to(base, i.shape)

  def feistel(v, b):
    left, right = v >> np.uint64(half), v & mask
    for r in range(4):
      with np.errstate(over="ignore"):
        round_key = _mix64(b + np.uint64(r + 1))
      left, right = right, left ^ (_mix64(right ^ round_key) & mask)
    return (left << np.uint64(half)) | right

  out = feistel(i, base)
  todo = out >= np.uint64(n)
  while todo.any():  # cycle walking: re-encrypt until inside [0, n); expected < 4 rounds
    out[todo] = feistel(out[todo], base[todo])
    todo = out >= np.uint64(n)
  return out.astype(np.int64)


class ActivationSource:
  """Rows from a list of [N_i, D] arrays (memory-maps or in-memory), sampled statelessly."""

  def __init__(self, arrays: list, names: list[str] | None = None, seed: int = 0):
    if not arrays:
      raise ValueError("the activation store is empty: no shards to read")
    widths = {a.shape[1] if a.ndim == 2 else None for a in arrays}
    if len(widths) != 1 or None in widths:
      shapes = [a.shape for a in arrays]
      raise ValueError(f"activation shards must all be [N, D] with one D; got shapes {shapes}")
    self.names = names or [f"array[{k}]" for k in range(len(arrays))]
    for a, name in zip(arrays, self.names):
      if a.dtype.name not in DTYPES:
        raise ValueError(f"activation shard {name} holds {a.dtype.name}; only {DTYPES} stores "
                         "are accepted (convert it, e.g. to float32)")
    self.arrays = arrays
    self.d = widths.pop()
    self.offsets = np.cumsum([0] + [a.shape[0] for a in arrays])
    self.n = int(self.offsets[-1])
    if self.n == 0:
      raise ValueError(f"the activation store holds 0 rows ({len(arrays)} empty shards)")
    self.seed = seed

  def rows(self, idx: np.ndarray) -> np.ndarray:
    """The rows with these global indices, as float32 [len(idx), D], read shard by shard."""
    out = np.empty((len(idx), self.d), np.float32)
    shard = np.searchsorted(self.offsets, idx, side="right") - 1
    for s in np.unique(shard):
      where = np.nonzero(shard == s)[0]
      local = idx[where] - self.offsets[s]
      order = np.argsort(local, kind="stable")  # sorted reads are sequential on disk
      out[where[order]] = np.asarray(self.arrays[s][local[order]], np.float32)
    return out

  def batch_indices(self, step: int, batch_size: int, lo: int = 0, hi: int | None = None):
    """Global row indices of positions [lo, hi) of the batch at `step`."""
    hi = batch_size if hi is None else hi
    pos = np.int64(step) * batch_size + np.arange(lo, hi, dtype=np.int64)
    return permute(pos % self.n, self.n, self.seed, pos // self.n)

  def where(self, g: int) -> str:
    """'SHARD at row R' for global row index g."""
    s = int(np.searchsorted(self.offsets, g, side="right") - 1)
    return f"{self.names[s]} at row {int(g - self.offsets[s])}"

  def _refuse_nonfinite(self, x: np.ndarray, idx: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
      raise FloatingPointError(
          f"non-finite activation in {self.where(idx[np.argmax(bad)])} ({what}); fix or remove "
          "that shard, or set --config.data.skip_nonfinite=True to train on other rows instead")

  def batch(self, step: int, batch_size: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Rows [lo, hi) of the batch at `step` (the whole batch by default), checked finite."""
    idx = self.batch_indices(step, batch_size, lo, hi)
    x = self.rows(idx)
    self._refuse_nonfinite(x, idx, f"batch of step {step}")
    return x

  def batch_skipping_nonfinite(self, step: int, batch_size: int, lo: int = 0,
                               hi: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Like `batch`, but a row holding NaN or Inf is replaced by a finite row from elsewhere in
    the store, chosen by (seed, step, position) alone: the batch keeps its static shape and a
    resumed run reads what an uninterrupted one did. Returns the rows and where the bad ones are."""
    hi = batch_size if hi is None else hi
    idx = self.batch_indices(step, batch_size, lo, hi)
    x = self.rows(idx)
    bad = ~np.isfinite(x).all(axis=1)
    replaced = [self.where(g) for g in idx[bad]]
    pos = np.int64(step) * batch_size + np.arange(lo, hi, dtype=np.int64)
    for attempt in range(1, _REPLACE_ATTEMPTS + 1):
      if not bad.any():
        return x, replaced
      p = pos[bad]  # each attempt reads the stream of another seed at the same positions
      alt = permute(p % self.n, self.n, (self.seed + attempt) % 2**64, p // self.n)
      x[bad] = self.rows(alt)
      bad[bad] = ~np.isfinite(x[bad]).all(axis=1)
    raise FloatingPointError(
        f"the batch of step {step} found no finite stand-in for {int(bad.sum())} non-finite rows "
        f"in {_REPLACE_ATTEMPTS} tries (e.g. {replaced[0]}); most of the store is non-finite")

  def mean_sq_norm(self, n_rows: int, skip_nonfinite: bool = False) -> float:
    """E‖x‖² over a seeded random sample of rows (for the input normalisation); non-finite rows
    raise, or with skip_nonfinite are left out."""
    n_rows = min(n_rows, self.n)
    idx = np.sort(permute(np.arange(n_rows), self.n, self.seed ^ 0x5EED, np.uint64(0)))
    x = self.rows(idx)
    if skip_nonfinite:
      x = x[np.isfinite(x).all(axis=1)]
      if not len(x):
        raise FloatingPointError(f"all {n_rows} rows sampled for the input normalisation "
                                 "(data.norm_rows) are non-finite")
    else:
      self._refuse_nonfinite(x, idx, "sampled for the input normalisation")
    sq = np.sum(x.astype(np.float64) ** 2, axis=1)
    top = np.sort(sq)[-max(1, len(sq) // 1000):]
    if len(sq) >= 1000 and top.sum() > 0.5 * sq.sum():
      logging.warning(
          "%d of the %d rows sampled for the input normalisation (0.1%%) carry %.0f%% of E‖x‖² "
          "(norms up to %.3g, median %.3g): outliers such as attention-sink tokens set the scale. "
          "Leave them out of the store (e.g. lm.skip_positions) or check the data.",
          len(top), len(sq), 100 * top.sum() / sq.sum(), np.sqrt(top.max()),
          np.sqrt(np.median(sq)))
    return float(np.mean(sq))


def shard_paths(path: str) -> list[str]:
  """One `.npy` file, or the sorted `.npy` shards of a directory."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.path {path!r} does not exist; point it at a .npy file or a "
                            "directory of .npy shards")
  if os.path.isdir(path):
    paths = sorted(glob.glob(os.path.join(path, "*.npy")))
    if not paths:
      raise FileNotFoundError(f"data.path {path!r} holds no .npy shards")
    return paths
  return [path]


def read_manifest(path: str) -> dict | None:
  """The manifest.json a harvested store carries, or None for plain .npy files."""
  manifest = os.path.join(path, "manifest.json")
  if not os.path.isdir(path) or not os.path.exists(manifest):
    return None
  with open(manifest) as fh:
    return json.load(fh)


def open_npy(path: str, seed: int = 0) -> ActivationSource:
  """Memory-maps every shard under `path` (never loads one whole).

  A harvested store is read through its manifest: only the shards it lists, each checked to
  hold the rows it says; its bfloat16 shards (saved as uint16) are viewed as bfloat16.
  """
  manifest = read_manifest(path)
  if manifest is None:
    paths, rows, stored = shard_paths(path), None, None
  else:
    if not manifest["shards"]:
      raise ValueError(f"the activation store {path} lists no shards; rerun the harvest")
    paths = [os.path.join(path, s["file"]) for s in manifest["shards"]]
    rows, stored = [s["rows"] for s in manifest["shards"]], manifest["spec"]["dtype"]
  arrays = []
  for i, p in enumerate(paths):
    try:
      a = np.load(p, mmap_mode="r")
    except (ValueError, OSError) as e:  # a missing, truncated or malformed file
      raise ValueError(f"cannot read activation shard {p}: {e}; rerun the harvest to repair "
                       "a harvested store") from e
    if a.dtype == np.dtype("V2") or (stored == "bfloat16" and a.dtype == np.uint16):
      a = a.view(ml_dtypes.bfloat16)  # np.save writes bfloat16 as 2-byte void; we as uint16
    if rows is not None and a.shape[0] != rows[i]:
      raise ValueError(f"activation shard {p} holds {a.shape[0]} rows but its manifest.json "
                       f"says {rows[i]}; rerun the harvest to repair the store")
    arrays.append(a)
  return ActivationSource(arrays, paths, seed)


# ----------------------------------------------------------------------------- synthetic

def synthetic(n_rows: int, d: int, n_features: int, mean_l0: float, *, seed: int = 0,
              noise_std: float = 0.02, freq_exponent: float = 0.5, magnitude_sigma: float = 0.5,
              chunk: int = 65536) -> tuple[np.ndarray, np.ndarray, dict]:
  """Activations built from known features in superposition (n_features > d).

  Each feature fires independently, the i-th most frequent with a frequency ∝ i^−freq_exponent
  (a power law over freq_exponent·log10(n_features) decades; shuffled over features) scaled so
  the mean L0 is `mean_l0`, capped at 1/2; active magnitudes are heavy-tailed (log-normal, median
  1, log-σ `magnitude_sigma`); the other features' directions overlap, so an inactive feature's
  pre-activation is low noise, not zero (as in the paper's Figure 1). Returns x [n_rows, d]
  float32, the true dictionary [n_features, d] (unit rows) and facts (true L0, frequencies).
  """
  rng = np.random.default_rng(seed)
  dict_GxD = rng.standard_normal((n_features, d))
  dict_GxD /= np.linalg.norm(dict_GxD, axis=1, keepdims=True)
  freq_G = 1.0 / np.arange(1, n_features + 1) ** freq_exponent
  freq_G = np.minimum(freq_G * mean_l0 / freq_G.sum(), 0.5)
  rng.shuffle(freq_G)
  x = np.empty((n_rows, d), np.float32)
  l0 = 0
  for lo in range(0, n_rows, chunk):
    n = min(chunk, n_rows - lo)
    active = rng.random((n, n_features)) < freq_G
    mags = rng.lognormal(0.0, magnitude_sigma, (n, n_features)) * active
    l0 += int(active.sum())
    x[lo:lo + n] = mags @ dict_GxD + noise_std * rng.standard_normal((n, d))
  return x, dict_GxD.astype(np.float32), {"true_l0": l0 / n_rows, "freq": freq_G}


def save_synthetic(directory: str, x: np.ndarray, dict_GxD: np.ndarray, facts: dict) -> None:
  """Writes acts/shard_00000.npy, true_dictionary.npy and facts.json so any tool can train on it."""
  files.save_npy(os.path.join(directory, "acts", "shard_00000.npy"), x)
  files.save_npy(os.path.join(directory, "true_dictionary.npy"), dict_GxD)
  files.save_json(os.path.join(directory, "facts.json"),
                  {"true_l0": facts["true_l0"], "n_rows": len(x), "d": x.shape[1],
                   "n_features": len(dict_GxD)})


def dictionary_recovery(W_dec_FxD: np.ndarray, true_GxD: np.ndarray) -> float:
  """Mean over true features of the best cosine similarity with any learned direction."""
  return float(np.mean(best_cosines(W_dec_FxD, true_GxD)))


def best_cosines(W_dec_FxD: np.ndarray, true_GxD: np.ndarray) -> np.ndarray:
  """Each true feature's best cosine similarity with any learned direction [G]."""
  learned = W_dec_FxD / np.linalg.norm(W_dec_FxD, axis=1, keepdims=True)
  true = true_GxD / np.linalg.norm(true_GxD, axis=1, keepdims=True)
  return np.max(true @ learned.T, axis=1)


# ----------------------------------------------------------------------------- prefetch

class Prefetch:
  """fn(step) for step in `steps`, in order, computed up to `depth` steps ahead on a thread.

  The train loop hands it "read this step's rows and put them on the devices", so the next
  batches are read and copied while the current step runs. An exception fn raises (a bad row, a
  simulated kill) is re-raised by next() at the step that raised it, not before; close() stops
  the thread. depth 0 computes each fn(step) in next() itself."""

  def __init__(self, fn, steps, depth: int):
    self._fn, self._steps, self._depth = fn, iter(steps), depth
    if depth > 0:
      self._queue = queue.Queue(maxsize=depth)
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._fill, daemon=True, name="jumprelu-prefetch")
      self._thread.start()

  def _fill(self):
    for step in self._steps:
      try:
        item = (True, self._fn(step))
      except BaseException as e:  # noqa: B036 -- handed to the consumer, raised there
        item = (False, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if self._stop.is_set() or not item[0]:
        return

  def __iter__(self):
    return self

  def __next__(self):
    if self._depth == 0:
      return self._fn(next(self._steps))
    while True:
      try:
        ok, value = self._queue.get(timeout=0.1)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise StopIteration from None
    if not ok:
      raise value
    return value

  def close(self):
    if self._depth > 0:
      self._stop.set()
      self._thread.join()
