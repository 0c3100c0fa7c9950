"""Activation sources: `.npy` shards (memory-mapped when local, read by ranged reads from a
bucket such as gs://) and a synthetic source.

The batch at step s is a pure function of (seed, s), so a resumed or multi-process run reads
exactly the rows an uninterrupted run would. Two samplers (data.sampler):
- rows: row positions s·B … s·B+B−1 of an endless stream are mapped through a per-epoch
  pseudo-random permutation of the N stored rows, a Feistel network with cycle walking (O(1)
  memory for any N). Every row is read on its own: right for a memory-map, not for a bucket.
- blocks: large contiguous blocks of rows are read into a per-process shuffle buffer (the scheme
  and its shuffle quality: the block-sampler section below). The default for a remote store.
"""
import concurrent.futures
import glob
import json
import os
import queue
import threading

import ml_dtypes
import numpy as np
from absl import logging

from jumprelu import files, storage

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
DTYPES = ("float32", "float16", "bfloat16")  # what an activation store may hold
_REPLACE_ATTEMPTS = 64  # tries to find a finite stand-in for a non-finite row
SAMPLERS = ("auto", "rows", "blocks")  # data.sampler; auto: blocks for a remote store, else rows
BLOCK_ROWS = 4096  # data.block_rows's default: 28 MiB per read at Gemma 2 9B's D=3584 in bf16
BUFFER_BLOCKS = 64  # data.buffer_blocks's default
_READ_THREADS = 8  # concurrent block reads (a bucket serves one stream far below its bandwidth)
_BLOCK_SALT, _PIECE_SALT = 0xB10C5, 0x91ECE  # keep the block sampler's keys apart from the rows'


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
  """Rows from a list of [N_i, D] arrays (memory-maps, in-memory arrays or remote
  storage.NpyFile), sampled statelessly by the "rows" or the "blocks" sampler."""

  def __init__(self, arrays: list, names: list[str] | None = None, seed: int = 0,
               sampler: str = "rows", block_rows: int = BLOCK_ROWS,
               buffer_blocks: int = BUFFER_BLOCKS):
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
    if sampler not in ("rows", "blocks"):
      raise ValueError(f"data.sampler must be 'rows' or 'blocks' here, got {sampler!r}")
    if block_rows < 1 or buffer_blocks < 1:
      raise ValueError(f"data.block_rows and data.buffer_blocks must be >= 1, got {block_rows} "
                       f"and {buffer_blocks}")
    self.sampler, self.buffer_blocks = sampler, buffer_blocks
    self.block_rows = min(block_rows, self.n)  # a block larger than the store is the store
    self._block_seed = (seed ^ _BLOCK_SALT) % 2**64
    self._piece_seed = (seed ^ _PIECE_SALT) % 2**64
    dtypes = {a.dtype for a in arrays}
    self._piece_dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    self._pieces, self._lock, self._pool = {}, threading.Lock(), None  # the block buffer

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

  def read_range(self, lo: int, hi: int) -> np.ndarray:
    """Global rows [lo, hi), one ranged read per shard they span (remote)."""
    parts = []
    s = int(np.searchsorted(self.offsets, lo, side="right") - 1)
    while lo < hi:
      while self.offsets[s + 1] <= lo:  # an empty shard
        s += 1
      end = min(hi, int(self.offsets[s + 1]))
      a, base = self.arrays[s], int(self.offsets[s])
      # Local: a view of the memory-map (or array), read when gathered: the page cache is the
      # buffer, and a block costs no extra copy.
      part = (a.rows(lo - base, end - base) if isinstance(a, storage.NpyFile)
              else a[lo - base:end - base])
      parts.append(part.astype(self._piece_dtype, copy=False))
      lo, s = end, s + 1
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def batch_indices(self, step: int, batch_size: int, lo: int = 0, hi: int | None = None):
    """Global row indices of positions [lo, hi) of the batch at `step`."""
    hi = batch_size if hi is None else hi
    return self._locate(self._key(step, batch_size, lo, hi))[0]

  def _key(self, step: int, batch_size: int, lo: int, hi: int) -> np.ndarray:
    """What positions [lo, hi) of the batch at `step` draw before the sampler's shuffle: [1, n]
    stream positions (rows), or [2, n] (piece, offset in its lane's window) (blocks)."""
    i = np.arange(lo, hi, dtype=np.int64)
    if self.sampler == "rows":
      return (np.int64(step) * batch_size + i)[None]
    c = self.lane_rows(batch_size)
    window, offset = np.divmod(np.int64(step) * c + i % c, self.block_rows)
    return np.stack([window * self.buffer_blocks + i // c, offset])

  def _locate(self, key: np.ndarray, attempt: int = 0) -> tuple:
    """(global rows, where to read them) for a key; attempt a > 0 gives the a-th stand-in."""
    if self.sampler == "rows":
      pos = key[0]  # each attempt reads the stream of another seed at the same positions
      idx = permute(pos % self.n, self.n, (self.seed + attempt) % 2**64, pos // self.n)
      return idx, idx
    piece, offset = key  # each attempt reads another row of the same (buffered) piece
    row = permute(offset, self.block_rows, (self._piece_seed + attempt) % 2**64, piece)
    return self.stream_rows(piece * self.block_rows + row), (piece, row)

  def _read(self, where, refill: bool = True) -> np.ndarray:
    """float32 rows at `where` (from _locate). Blocks: from the buffer; with refill, pieces no
    longer needed are dropped and the next window's are read ahead."""
    if self.sampler == "rows":
      return self.rows(where)
    piece, row = where
    pieces = self._fetch(np.unique(piece), ahead=refill)
    out = np.empty((len(piece), self.d), self._piece_dtype)  # gathered first, converted once
    for g, rows_KxD in pieces.items():
      at = np.flatnonzero(piece == g)
      out[at] = rows_KxD[row[at]]
    return out.astype(np.float32, copy=False)

  def where(self, g: int) -> str:
    """'SHARD at row R' for global row index g."""
    s = int(np.searchsorted(self.offsets, g, side="right") - 1)
    return f"{self.names[s]} at row {int(g - self.offsets[s])}"

  def _refuse_nonfinite(self, bad: np.ndarray, idx: np.ndarray, what: str) -> None:
    if bad.any():
      raise FloatingPointError(
          f"non-finite activation in {self.where(idx[np.argmax(bad)])} ({what}); fix or remove "
          "that shard, or set --config.data.skip_nonfinite=True to train on other rows instead")

  def batch(self, step: int, batch_size: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Rows [lo, hi) of the batch at `step` (the whole batch by default), checked finite."""
    hi = batch_size if hi is None else hi
    idx, where = self._locate(self._key(step, batch_size, lo, hi))
    x = self._read(where)
    self._refuse_nonfinite(~np.isfinite(x).all(axis=1), idx, f"batch of step {step}")
    return x

  def batch_skipping_nonfinite(self, step: int, batch_size: int, lo: int = 0,
                               hi: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Like `batch`, but a row holding NaN or Inf is replaced by a finite row from elsewhere in
    the store (blocks: from the same block), chosen by (seed, step, position) alone: the batch
    keeps its static shape and a resumed run reads what an uninterrupted one did. Returns the
    rows and where the bad ones are."""
    hi = batch_size if hi is None else hi
    key = self._key(step, batch_size, lo, hi)
    idx, where = self._locate(key)
    x = self._read(where)
    bad = ~np.isfinite(x).all(axis=1)
    replaced = [self.where(g) for g in idx[bad]]
    for attempt in range(1, _REPLACE_ATTEMPTS + 1):
      if not bad.any():
        return x, replaced
      x[bad] = self._read(self._locate(key[:, bad], attempt)[1], refill=False)
      bad[bad] = ~np.isfinite(x[bad]).all(axis=1)
    raise FloatingPointError(
        f"the batch of step {step} found no finite stand-in for {int(bad.sum())} non-finite rows "
        f"in {_REPLACE_ATTEMPTS} tries (e.g. {replaced[0]}); most of the store is non-finite")

  def mean_sq_norm(self, n_rows: int, skip_nonfinite: bool = False) -> float:
    """E‖x‖² over a seeded sample of rows (for the input normalisation): random rows (rows
    sampler) or the first n_rows of the block stream, whole blocks (blocks); non-finite rows
    raise, or with skip_nonfinite are left out."""
    n_rows = min(n_rows, self.n)
    if self.sampler == "rows":
      idx = np.sort(permute(np.arange(n_rows), self.n, self.seed ^ 0x5EED, np.uint64(0)))
      x = self.rows(idx)
      sq, bad = np.sum(x.astype(np.float64) ** 2, axis=1), ~np.isfinite(x).all(axis=1)
    else:  # a few pieces at a time, none kept: norm_rows may exceed the buffer
      idx, sq, bad = self.stream_rows(np.arange(n_rows)), [], []
      pieces = np.arange(-(-n_rows // self.block_rows))
      for first in range(0, len(pieces), _READ_THREADS):
        got = self._fetch(pieces[first:first + _READ_THREADS], ahead=False, keep=False)
        for g in sorted(got):
          x = got[g][:n_rows - g * self.block_rows].astype(np.float32)
          sq.append(np.sum(x.astype(np.float64) ** 2, axis=1))
          bad.append(~np.isfinite(x).all(axis=1))
      sq, bad = np.concatenate(sq), np.concatenate(bad)
    if skip_nonfinite:
      sq = sq[~bad]
      if not len(sq):
        raise FloatingPointError(f"all {n_rows} rows sampled for the input normalisation "
                                 "(data.norm_rows) are non-finite")
    else:
      self._refuse_nonfinite(bad, idx, "sampled for the input normalisation")
    top = np.sort(sq)[-max(1, len(sq) // 1000):]
    if len(sq) >= 1000 and top.sum() > 0.5 * sq.sum():
      logging.warning(
          "%d of the %d rows sampled for the input normalisation (0.1%%) carry %.0f%% of E‖x‖² "
          "(norms up to %.3g, median %.3g): outliers such as attention-sink tokens set the scale. "
          "Leave them out of the store (e.g. lm.skip_positions) or check the data.",
          len(top), len(sq), 100 * top.sum() / sq.sum(), np.sqrt(top.max()),
          np.sqrt(np.median(sq)))
    return float(np.mean(sq))

  # --------------------------------------------------------------------------- block sampler
  # data.sampler="blocks". K = data.block_rows, M = data.buffer_blocks, B = train.batch_size,
  # c = B / M (M must divide B).
  # 1. Row stream. The store's N rows are cut into ⌊N/K⌋ blocks of K consecutive rows, plus the
  #    last N mod K rows as one short block. Epoch e of the stream is the full blocks in a
  #    pseudo-random order (a Feistel permutation keyed by (seed, e)), then the short block:
  #    a permutation of all N rows, so nothing is left out. Epochs follow each other endlessly.
  # 2. Pieces. The stream is cut into pieces of K rows, piece g = positions [gK, gK + K). When K
  #    divides N a piece is one block; else it may join a block's end to the next block's (or
  #    epoch's) start: a few contiguous ranges, each one ranged read.
  # 3. Lanes. Batch position i is in lane j = i // c. Lane j at step s takes offsets
  #    u = s·c … s·c + c − 1 of its own sequence; offsets [wK, wK + K) (its window w) come from
  #    piece wM + j, offset u lands on row permute(u mod K; seed, piece) of that piece.
  # So window w reads M consecutive pieces of the stream in full over K / c steps, and windows
  # follow the stream: the steps of any whole number of windows read every row of the stream's
  # prefix once (each epoch in full; rows near an epoch's end share windows with the next's).
  # Shuffle quality: a batch holds c rows from each of M pieces (≈ M blocks of K consecutive
  # store rows: about M·K / lm.context_len contexts of a harvested store, against B random rows
  # for the rows sampler), and the K / c batches of a window draw from the same M pieces. Raise
  # M (memory) or lower K (smaller reads) to mix more.
  # Per process: rows [lo, hi) of every batch lie in lanes lo // c … (hi − 1) // c, so a process
  # reads only those lanes' pieces, each once (read ahead on a thread pool; it holds ~2 pieces
  # per lane: remote, K·D values in the store's dtype; local, views of the memory-map), and the
  # batch is the same for any process count. A non-finite row's stand-in is another row of its
  # piece; mean_sq_norm reads pieces 0, 1, … (whole blocks chosen by the seed).

  def lane_rows(self, batch_size: int) -> int:
    """c: the rows of every batch drawn from each of the M pieces of a window."""
    if batch_size % self.buffer_blocks:
      raise ValueError(
          f"train.batch_size={batch_size} is not a multiple of data.buffer_blocks="
          f"{self.buffer_blocks}: the block sampler draws B / M rows of every batch from each of "
          f"M blocks; set data.buffer_blocks to a divisor of {batch_size}")
    return batch_size // self.buffer_blocks

  def stream_rows(self, pos: np.ndarray) -> np.ndarray:
    """The global rows at positions `pos` of the block sampler's row stream."""
    k, full = self.block_rows, self.n // self.block_rows
    epoch, within = np.divmod(np.atleast_1d(np.asarray(pos, np.int64)), self.n)
    block, offset = np.divmod(within, k)
    out = within.copy()  # the short block keeps its place at the end of every epoch
    inside = block < full
    out[inside] = permute(block[inside], full, self._block_seed, epoch[inside]) * k + offset[inside]
    return out.reshape(np.shape(pos))

  def _read_piece(self, g: int) -> np.ndarray:
    """Piece g: stream positions [gK, gK + K), one ranged read per contiguous run of rows."""
    rows = self.stream_rows(g * self.block_rows + np.arange(self.block_rows))
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
    parts = [self.read_range(int(r[0]), int(r[-1]) + 1) for r in runs]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def _fetch(self, needed: np.ndarray, ahead: bool = True, keep: bool = True) -> dict:
    """{g: piece} for the pieces `needed`, read in parallel where not buffered. With ahead,
    every other piece is dropped and each needed piece's successor in its lane (g + M) is read
    ahead on the pool; without keep, pieces read here are not buffered."""
    needed = [int(g) for g in needed]
    with self._lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(_READ_THREADS, "jumprelu-blocks")
      later = [g + self.buffer_blocks for g in needed] if ahead else []
      if ahead:
        wanted = set(needed) | set(later)
        self._pieces = {g: f for g, f in self._pieces.items() if g in wanted}
      futures = {}
      for g in needed + later:  # the pool reads in submission order: needed pieces first
        f = self._pieces.get(g) or self._pool.submit(self._read_piece, g)
        if keep or g in self._pieces:
          self._pieces[g] = f
        futures[g] = f
    out = {}
    for g in needed:
      try:
        out[g] = futures[g].result()
      except BaseException:
        with self._lock:  # a failed read is retried by the next call, not remembered
          if self._pieces.get(g) is futures[g]:
            del self._pieces[g]
        raise
    return out


def shard_paths(path: str) -> list[str]:
  """One `.npy` file, or the sorted `.npy` shards of a directory (local or remote)."""
  if not storage.exists(path):
    raise FileNotFoundError(f"data.path {path!r} does not exist; point it at a .npy file or a "
                            "directory of .npy shards")
  if storage.isdir(path):
    if storage.is_remote(path):
      paths = [storage.join(path, f) for f in storage.listdir(path)
               if f.endswith(".npy") and not f.startswith(".") and not files.is_temporary(f)]
    else:
      paths = sorted(glob.glob(os.path.join(storage.local_path(path), "*.npy")))
    if not paths:
      raise FileNotFoundError(f"data.path {path!r} holds no .npy shards")
    return paths
  return [path]


def read_manifest(path: str) -> dict | None:
  """The manifest.json a harvested store carries, or None for plain .npy files."""
  path = storage.local_path(path)
  if storage.is_remote(path):
    return storage.read_json(storage.join(path, "manifest.json")) if storage.isdir(path) else None
  manifest = os.path.join(path, "manifest.json")
  if not os.path.isdir(path) or not os.path.exists(manifest):
    return None
  with open(manifest) as fh:
    return json.load(fh)


def resolve_sampler(sampler: str, path: str) -> str:
  """data.sampler for the store at `path`: "auto" is blocks for a remote store, else rows."""
  if sampler not in SAMPLERS:
    raise ValueError(f"data.sampler must be one of {SAMPLERS}, got {sampler!r}")
  if sampler == "auto":
    return "blocks" if storage.is_remote(path) else "rows"
  if sampler == "rows" and storage.is_remote(path):
    raise ValueError(f"data.sampler='rows' reads single rows at random, one request each from "
                     f"the remote store {path!r}; set data.sampler to 'blocks' or 'auto'")
  return sampler


def open_npy(path: str, seed: int = 0, sampler: str = "auto", block_rows: int = BLOCK_ROWS,
             buffer_blocks: int = BUFFER_BLOCKS) -> ActivationSource:
  """Opens every shard under `path` without loading one whole: memory-maps when local, ranged
  reads (storage.NpyFile) when remote; `sampler` and the block keys as data.sampler etc.

  A harvested store is read through its manifest: only the shards it lists, each checked to
  hold the rows it says; its bfloat16 shards (saved as uint16) are viewed as bfloat16.
  """
  sampler, path = resolve_sampler(sampler, path), storage.local_path(path)
  manifest = read_manifest(path)
  if manifest is None:
    paths, rows, stored = shard_paths(path), None, None
  else:
    if not manifest["shards"]:
      raise ValueError(f"the activation store {path} lists no shards; rerun the harvest")
    paths = [storage.join(path, s["file"]) for s in manifest["shards"]]
    rows, stored = [s["rows"] for s in manifest["shards"]], manifest["spec"]["dtype"]
  arrays = []
  for i, p in enumerate(paths):
    try:
      a = storage.NpyFile(p) if storage.is_remote(p) else np.load(p, mmap_mode="r")
    except (ValueError, OSError) as e:  # a missing, truncated or malformed file
      raise ValueError(f"cannot read activation shard {p}: {e}; rerun the harvest to repair "
                       "a harvested store") from e
    if a.dtype == np.dtype("V2") or (stored == "bfloat16" and a.dtype == np.uint16):
      a = a.view(ml_dtypes.bfloat16)  # np.save writes bfloat16 as 2-byte void; we as uint16
    if rows is not None and a.shape[0] != rows[i]:
      raise ValueError(f"activation shard {p} holds {a.shape[0]} rows but its manifest.json "
                       f"says {rows[i]}; rerun the harvest to repair the store")
    arrays.append(a)
  return ActivationSource(arrays, paths, seed, sampler, block_rows, buffer_blocks)


# ----------------------------------------------------------------------------- synthetic

def synthetic(n_rows: int, d: int, n_features: int, mean_l0: float, *, seed: int = 0,
              noise_std: float = 0.02, freq_exponent: float = 0.5, magnitude_sigma: float = 0.5,
              chunk: int = 65536, with_active: bool = False
              ) -> tuple[np.ndarray, np.ndarray, dict]:
  """Activations built from known features in superposition (n_features > d).

  Each feature fires independently, the i-th most frequent with a frequency ∝ i^−freq_exponent
  (a power law over freq_exponent·log10(n_features) decades; shuffled over features) scaled so
  the mean L0 is `mean_l0`, capped at 1/2; active magnitudes are heavy-tailed (log-normal, median
  1, log-σ `magnitude_sigma`); the other features' directions overlap, so an inactive feature's
  pre-activation is low noise, not zero (as in the paper's Figure 1). Returns x [n_rows, d]
  float32, the true dictionary [n_features, d] (unit rows) and facts (true L0, frequencies;
  with_active, also "active": which features fire in each row, [n_rows, n_features] bool).
  """
  rng = np.random.default_rng(seed)
  dict_GxD = rng.standard_normal((n_features, d))
  dict_GxD /= np.linalg.norm(dict_GxD, axis=1, keepdims=True)
  freq_G = 1.0 / np.arange(1, n_features + 1) ** freq_exponent
  freq_G = np.minimum(freq_G * mean_l0 / freq_G.sum(), 0.5)
  rng.shuffle(freq_G)
  x = np.empty((n_rows, d), np.float32)
  active_NxG = np.empty((n_rows, n_features), bool) if with_active else None
  l0 = 0
  for lo in range(0, n_rows, chunk):
    n = min(chunk, n_rows - lo)
    active = rng.random((n, n_features)) < freq_G
    mags = rng.lognormal(0.0, magnitude_sigma, (n, n_features)) * active
    l0 += int(active.sum())
    x[lo:lo + n] = mags @ dict_GxD + noise_std * rng.standard_normal((n, d))
    if with_active:
      active_NxG[lo:lo + n] = active
  facts = {"true_l0": l0 / n_rows, "freq": freq_G}
  return x, dict_GxD.astype(np.float32), {**facts, "active": active_NxG} if with_active else facts


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
