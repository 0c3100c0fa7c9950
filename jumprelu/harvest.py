"""Activations from the LM harvested into a `.npy` store by every process; live.py streams them.

The store is a directory or a bucket prefix (gs://..., through storage.py): shard_KKKKK.npy
files [rows, W] and manifest.json. BOS, EOS and padding positions (and lm.skip_positions) are
never stored.

Row order. The packed text is cut into chunks of C contexts (chunk_contexts: about
harvest.shard_tokens kept rows, a multiple of lm.batch_contexts). Shard k holds every kept row of
chunk k, context by context, position by position; the store is shards 0, 1, ... in order up to
the first whose rows reach harvest.num_tokens, and that last shard is cut to reach it exactly
(or the text runs out first: a warning). So the store holds the first harvest.num_tokens kept
rows of the text, in text order, whatever the process count.

Who harvests what. Chunk k is harvested by process k % P, in batches of lm.batch_contexts
contexts aligned on the chunk, so every process knows every shard's rows and where the store
ends without asking (each tokenizes the text up to the store's end and counts each context's
kept positions from its tokens alone). Where the LM runs is harvest.mesh:
- "local": each process's own LM copy on its own devices, no communication while harvesting, so
  one process dying cannot corrupt another's work.
- "global" (auto on a multi-process TPU job, whose slice runs only programs over all its
  devices): one LM over every device of every process ("model" within a process, "data" across),
  in lockstep rounds. Round r holds chunks rP .. rP+P-1; its forward steps are the most any of
  its chunks still to harvest needs; at step j each process feeds batch j of its chunk (or, its
  chunk done, past the store's end or shorter, a stand-in whose output it drops) as its rows of
  the global batch and keeps its own rows. Which chunks are done every process decides alike from
  the store as it was at the start (every part, and the rows of every recorded shard: each
  process reads its own and they swap them through jax.distributed's coordination service before
  anyone writes), so all run the same steps and skip the same rounds.
A store harvested by P processes is therefore the one-process store: the same shard files (byte
for byte when each device forwards the same rows, e.g. P processes × 4 devices, locally or
globally, and one × 4; else equal to the LM's numerical noise) and the same manifest.

Commit protocol. A shard is written whole (atomic rename locally, one object put in a bucket),
then recorded in its process's manifest.pNNNNN.json (rewritten whole after each shard). A kill
at any point leaves recorded complete shards, at most one complete unrecorded shard per process
(written again) and temporaries (removed). Rerunning the same command resumes: each process
skips its chunks recorded with the expected rows whose file holds them, and harvests the rest
(a missing, truncated or mis-sized shard is harvested again). When every process is done (a
barrier in jax.distributed's coordination service), process 0 writes manifest.json (the shards
in order with their rows, "tokens", where the next row would come from, "complete"; until then
it lists no shards, so a partial store cannot be trained on) and then
removes the per-process parts and shards past the end; a second barrier lets every process
return that manifest. A rerun on a complete store only checks its own shards (no text is read
unless one must be harvested again). A store of another model, site, width, dtype, context,
text or chunking is refused.

Memory: a harvesting process holds one shard in the storage dtype (bucket writes: ~2 copies).
"""
import hashlib
import itertools
import json
import re
import zlib

import jax
import ml_dtypes
import numpy as np
from absl import logging

from jumprelu import files, logs, sharding, storage
from jumprelu.lm import activations as lm_act
from jumprelu.lm import model

MANIFEST = "manifest.json"
FORMAT = 2  # manifests without "format" come from the single-process store cut at shard_tokens
STORE_DTYPES = ("float32", "bfloat16")
MESH_MODES = ("auto", "local", "global")
_PART = re.compile(r"manifest\.p(\d+)\.json")
_SHARD = re.compile(r"shard_(\d+)\.npy")
_barriers = itertools.count()  # every process calls harvest() the same number of times


# ----------------------------------------------------------------------------- the store

def store_spec(c, cfg, tokenizer, model_name: str) -> dict:
  """What a store holds; a store whose spec differs from the config's is refused."""
  site = model.parse_site(c.lm.site)
  return {
      "model": model_name, "site": model.format_site(site), "layer": site.layer,
      "hook_name": model.format_site(site, transformer_lens=True),
      "width": model.site_width(cfg, site), "dtype": c.harvest.dtype,
      "context_len": c.lm.context_len, "text": f"{c.text.source}:{c.text.path}",
      "bos_id": cfg.bos_id, "eos_id": cfg.eos_id, "skip_positions": c.lm.skip_positions,
      "tokenizer": hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16],
  }


def chunk_contexts(c) -> int:
  """Contexts per chunk (= per shard): about harvest.shard_tokens kept rows, and a multiple of
  lm.batch_contexts so every LM forward sees the same batch whatever the process count."""
  per_context = c.lm.context_len - 1 - c.lm.skip_positions  # kept rows of a full context
  batches = max(1, round(c.harvest.shard_tokens / per_context / c.lm.batch_contexts))
  return batches * c.lm.batch_contexts


def shard_name(chunk: int) -> str:
  return f"shard_{chunk:05d}.npy"


def part_name(process: int) -> str:
  return f"manifest.p{process:05d}.json"


def size_report(c) -> str:
  """The store's predicted size on disk (for --dry_run): rows × width × dtype, and its shards."""
  itemsize = 2 if c.harvest.dtype == "bfloat16" else 4
  per_chunk = chunk_contexts(c) * (c.lm.context_len - 1 - c.lm.skip_positions)
  shards = -(-c.harvest.num_tokens // per_chunk)
  total = c.harvest.num_tokens * c.data.d_in * itemsize
  return (f"activation store: {c.harvest.num_tokens:,} rows × {c.data.d_in} × {c.harvest.dtype} "
          f"= {_bytes(total)} on disk, in at least {shards:,} shards of {chunk_contexts(c):,} "
          f"contexts (≤ {per_chunk:,} rows, ≤ {_bytes(per_chunk * c.data.d_in * itemsize)} "
          "each: about the host memory one harvesting process needs)")


def _bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024


def check_store(c, stored: dict, directory: str) -> None:
  """Refuses, before compiling, a store from another model, site or storage dtype."""
  wanted = {"site": model.format_site(model.parse_site(c.lm.site))}
  if c.data.source == "harvest" or c.lm.model_path:
    wanted["model"] = lm_act.model_name(c)
  if c.data.source == "harvest":
    wanted["dtype"] = c.harvest.dtype
  check_spec({"spec": stored}, wanted, directory)


def check_spec(manifest: dict, spec: dict, directory: str) -> None:
  """Refuses a store harvested with another model, site, width, dtype, context or text."""
  diffs = [f"{k}: store has {manifest['spec'].get(k)!r}, config wants {v!r}"
           for k, v in spec.items() if manifest["spec"].get(k) != v]
  if diffs:
    raise ValueError(f"activation store {directory} does not match the config ("
                     + "; ".join(diffs) + "); point data.path at a new directory, or delete "
                     "this one")


def _check_chunking(stored: dict, chunk: int, path: str) -> None:
  if stored.get("chunk_contexts") != chunk:
    raise ValueError(
        f"activation store {path} is cut in chunks of {stored.get('chunk_contexts')} contexts, "
        f"the config in chunks of {chunk} (from harvest.shard_tokens and lm.batch_contexts); "
        "set those as the store was harvested, or point data.path at a new directory")


def _records(directory: str, spec: dict, chunk: int) -> dict[int, set[int]]:
  """{chunk: the row counts it was recorded with} from manifest.json and every process's part,
  each checked to be a store of this spec and chunking."""
  names = [n for n in storage.listdir(directory) if n == MANIFEST or _PART.fullmatch(n)]
  records = {}
  for name in names:
    m = storage.read_json(storage.join(directory, name))
    if m is None:  # removed since the listing (process 0 tidying up a finished store)
      continue
    check_spec(m, spec, storage.join(directory, name))
    _check_chunking(m, chunk, storage.join(directory, name))
    for s in m["shards"]:
      records.setdefault(s["chunk"], set()).add(s["rows"])
  return records


def _shard_rows(path: str, width: int) -> tuple[int | None, str]:
  """(rows the shard file holds, "") or (None, what is wrong with it)."""
  try:
    shape = storage.NpyFile(path).shape
  except (OSError, ValueError, EOFError) as e:  # missing, truncated, empty or not an .npy file
    return None, f"cannot be read ({e})"
  if len(shape) != 2 or shape[1] != width:
    return None, f"has shape {shape}, not [rows, {width}]"
  return shape[0], ""


def _owner(name: str, processes: int) -> int | None:
  """The process whose writes make `name` (a store file or its temporary), or None."""
  if name.startswith(MANIFEST):
    return 0
  m = re.match(_SHARD.pattern, name) or re.match(_PART.pattern, name)
  if m is None:
    return None
  return int(m.group(1)) % processes if name.startswith("shard_") else int(m.group(1))


def mesh_mode(c) -> str:
  """harvest.mesh resolved to "local" or "global" ("auto": global on a multi-process TPU job,
  where XLA runs only programs over every device of the slice)."""
  if c.harvest.mesh not in MESH_MODES:
    raise ValueError(f"harvest.mesh must be one of {MESH_MODES}, got {c.harvest.mesh!r}")
  if c.harvest.mesh != "auto":
    return c.harvest.mesh
  return "global" if jax.process_count() > 1 and jax.devices()[0].platform == "tpu" else "local"


def _spans_every_device(params) -> bool:
  mesh = lm_act.mesh_of(params)
  return mesh is not None and mesh.devices.size == jax.device_count()


def batches_needed(kept_C, rows: int, batch: int) -> int:
  """LM forwards of `batch` contexts (aligned on the chunk) until a chunk whose contexts keep
  kept_C rows has given its first `rows` > 0 rows."""
  last = int(np.searchsorted(np.cumsum(kept_C), rows))  # the context holding row `rows`
  return last // batch + 1


def _local_rows(acts_BxLxW) -> np.ndarray:
  """This process's rows of a forward's output, in order (all of them on one process)."""
  if not isinstance(acts_BxLxW, jax.Array) or acts_BxLxW.is_fully_addressable:
    return np.asarray(acts_BxLxW)
  shards = {s.index[0].start or 0: s for s in acts_BxLxW.addressable_shards}  # "model" copies
  return np.concatenate([np.asarray(shards[i].data) for i in sorted(shards)])


def _held_rows(directory: str, spec: dict, records: dict, process: int,
               processes: int) -> dict[int, tuple[int | None, str]]:
  """{recorded chunk: _shard_rows of its file} for every process's chunks, as the store was
  before anyone writes to it (it returns once every process has read it). Each process reads its
  own chunks' files and they swap what they found through the coordination service's key-value
  store; without one (processes played in turn by tests) every file is read here."""
  def held(k):
    return _shard_rows(storage.join(directory, shard_name(k)), spec["width"])

  client = sharding.coordination_client() if processes > 1 and jax.process_count() > 1 else None
  if client is None:
    rows = {k: held(k) for k in records}
    _barrier(directory, "planned", processes)
    return rows
  rows = {k: held(k) for k in records if k % processes == process}
  name = f"jumprelu_harvest_{zlib.crc32(directory.encode()):08x}_planned_{next(_barriers)}"
  client.key_value_set(f"{name}/{process}", json.dumps({k: r for k, (r, _) in rows.items()}))
  for i in range(processes):
    if i != process:
      got = json.loads(client.blocking_key_value_get(f"{name}/{i}", sharding.BARRIER_TIMEOUT_MS))
      rows.update({int(k): (r, "") for k, r in got.items()})
  return rows


def _barrier(directory: str, stage: str, processes: int) -> None:
  """Waits until every process of the job reaches this point (nothing when there is one)."""
  if processes > 1:
    sharding.wait_for_all(f"jumprelu_harvest_{zlib.crc32(directory.encode()):08x}_{stage}")


# ----------------------------------------------------------------------------- the harvest

def harvest(c, directory: str, lm=None, *, process: tuple[int, int] | None = None) -> dict | None:
  """Fills `directory` (a path or bucket URL) with harvest.num_tokens activations, resuming a
  partial store and repairing a damaged one; every process of the job calls it. Returns the
  manifest. process: (index, count), default jax's; tests give it to play several processes in
  one (then the barriers are skipped, and only index 0 writes and returns the manifest)."""
  if c.harvest.dtype not in STORE_DTYPES:
    raise ValueError(f"harvest.dtype must be one of {STORE_DTYPES}, got {c.harvest.dtype!r}")
  p, procs = process or (jax.process_index(), jax.process_count())
  mode = mesh_mode(c)
  if mode == "global" and jax.process_count() > 1 and procs != jax.process_count():
    raise ValueError(f"harvest.mesh='global' runs every process of the job in lockstep; it "
                     f"cannot play {procs} processes in one (process={process}); use 'local'")
  if lm is None or (mode == "global" and jax.process_count() > 1 and
                    not _spans_every_device(lm[0])):
    lm = lm_act.load_lm(c, jax.devices()) if mode == "global" else lm_act.load_lm(c)
  params, cfg, tokenizer, name = lm
  mesh = lm_act.mesh_of(params)
  logging.info("harvest process %d/%d, harvest.mesh=%s: the LM on %s", p, procs, mode,
               f"mesh {dict(mesh.shape)} of {mesh.devices.size} devices" if mesh else "1 device")
  spec = store_spec(c, cfg, tokenizer, name)
  if spec["width"] != c.data.d_in:
    raise ValueError(f"{c.lm.site} of {name} has width {spec['width']}, but data.d_in="
                     f"{c.data.d_in}; set --config.data.d_in={spec['width']}")
  chunk, target = chunk_contexts(c), c.harvest.num_tokens
  storage.makedirs(directory)
  final = storage.read_json(storage.join(directory, MANIFEST))
  if final is not None:
    check_spec(final, spec, directory)
    if "format" not in final:  # a store written before harvesting was split over processes
      if final["complete"] and final["tokens"] >= target:
        return final
      raise ValueError(f"activation store {directory} is a partial store of an earlier "
                       "harvest.py, which cannot be resumed; delete it, or point data.path at a "
                       "new directory")
  records = _records(directory, spec, chunk)
  for f in storage.listdir(directory):  # leftovers of this process's killed writes
    if files.is_temporary(f) and _owner(f, procs) == p:
      storage.remove(storage.join(directory, f))

  if final is None and p == 0:  # so a partial store is never read as a plain folder of shards
    _write_manifest(directory, {
        "format": FORMAT, "spec": spec, "chunk_contexts": chunk, "num_tokens": target,
        "shards": [], "tokens": 0, "next_context": 0, "skip_rows": 0, "complete": False})
  h = _Harvester(c, directory, spec, (params, cfg, tokenizer), records, p, procs,
                 lockstep=mode == "global")
  if final is not None and final["complete"] and final["num_tokens"] == target and \
      final.get("chunk_contexts") == chunk:
    manifest = h.repair(final)  # the plan is known: only damaged shards are harvested again
  else:
    manifest = h.run(target)
  _barrier(directory, "harvested", procs)
  if p == 0:
    _commit(directory, manifest, spec, chunk, procs)
  _barrier(directory, "committed", procs)
  return storage.read_json(storage.join(directory, MANIFEST))


class _Harvester:
  """One process's share of the harvest: its chunks through the LM, each committed."""

  def __init__(self, c, directory, spec, lm, records, process, processes, lockstep=False):
    self.c, self.directory, self.spec, self.records = c, directory, spec, records
    self.lockstep = lockstep
    # Lockstep: every process decides for every chunk from the store as it was at the start
    # (the records, and the rows each recorded shard file held), so all decide alike.
    self.held = _held_rows(directory, spec, records, process, processes) if lockstep else None
    self.params, self.cfg, self.tokenizer = lm
    self.p, self.procs = process, processes
    self.chunk = chunk_contexts(c)
    self.forward = lm_act.site_fn(self.cfg, model.parse_site(c.lm.site))
    # This process's part: every record of its chunks, replaced as chunks are harvested again.
    self.part = {k: sorted(rows) for k, rows in records.items() if k % processes == process}
    self.harvested = 0

  def _chunks(self):
    """(k, chunk k's contexts [≤ C of them], each one's kept rows) until the text ends."""
    stream = lm_act.contexts(self.c, self.cfg, self.tokenizer)
    for k in itertools.count():
      contexts = list(itertools.islice(stream, self.chunk))
      if not contexts:
        return
      kept = lm_act.keep_mask(self.cfg, np.stack(contexts), self.c.lm.skip_positions).sum(1)
      yield k, contexts, kept
      if len(contexts) < self.chunk:
        return

  def _done(self, k: int, rows: int) -> bool:
    """Whether chunk k is recorded with `rows` rows and its file holds them."""
    if rows not in self.records.get(k, ()):
      return False
    path = storage.join(self.directory, shard_name(k))
    held, problem = self.held[k] if self.lockstep else _shard_rows(path, self.spec["width"])
    if held == rows:
      return True
    if k % self.procs == self.p:  # lockstep: the others' chunks are theirs to name
      logging.warning("activation shard %s %s: harvesting it again", path,
                      problem or f"holds {held} rows, its record says {rows}")
    return False

  def run(self, target: int) -> dict:
    """Harvests this process's missing chunks; returns the store's manifest (all processes')."""
    shards, tokens, cursor, exhausted = [], 0, None, True
    bar = logs.progress(target, "harvest", "tok", every_s=10.0)
    todo = []  # lockstep: this round's chunks to harvest (round r: chunks rP .. rP+P-1)
    for k, contexts, kept in self._chunks():
      rows = int(min(kept.sum(), target - tokens))
      if rows > 0:  # a chunk with no kept position (only padding) is no shard
        shards.append({"file": shard_name(k), "rows": rows, "chunk": k,
                       "contexts": [k * self.chunk, k * self.chunk + len(contexts)]})
        if not self._done(k, rows) and (self.lockstep or k % self.procs == self.p):
          if self.lockstep:
            todo.append((k, contexts if k % self.procs == self.p else None, kept, rows))
          else:
            self._harvest_chunk(k, contexts, rows)
      if self.lockstep and k % self.procs == self.procs - 1:
        self._round(todo)
        todo = []
      before, tokens = tokens, tokens + rows
      bar.update(tokens - bar.n)
      if tokens >= target:  # where the next row would come from: as evaluation's held-out
        ends = np.cumsum(kept)  # contexts must start past what training read
        j = int(np.searchsorted(ends, target - before))
        cursor = (k * self.chunk + j + 1, 0) if ends[j] == target - before else (
            k * self.chunk + j, int(target - before - (ends[j - 1] if j else 0)))
        exhausted = False
        break
      cursor = (k * self.chunk + len(contexts), 0)
    if todo:  # the last round, cut short by the store's or the text's end
      self._round(todo)
    bar.close()
    logging.info("harvest process %d/%d: %d of its shards harvested now, %d found complete",
                 self.p, self.procs, self.harvested,
                 sum(1 for s in shards if s["chunk"] % self.procs == self.p) - self.harvested)
    if exhausted:
      logging.warning("text.source %s ran out after %d tokens (harvest.num_tokens=%d)",
                      self.c.text.source, tokens, target)
    cursor = cursor or (0, 0)
    return {"format": FORMAT, "spec": self.spec, "chunk_contexts": self.chunk,
            "num_tokens": target, "shards": shards, "tokens": tokens,
            "next_context": cursor[0], "skip_rows": cursor[1], "complete": True}

  def repair(self, final: dict) -> dict:
    """Harvests again this process's damaged shards of a complete store."""
    wanted = {s["chunk"]: s["rows"] for s in final["shards"]}
    bad = [k for k, rows in sorted(wanted.items()) if (self.lockstep or k % self.procs == self.p)
           and not self._done(k, rows)]
    todo = []
    for k, contexts, kept in self._chunks() if bad else ():
      if k in bad and not self.lockstep:
        self._harvest_chunk(k, contexts, wanted[k])
      elif k in bad:
        todo.append((k, contexts if k % self.procs == self.p else None, kept, wanted[k]))
      if todo and (k % self.procs == self.procs - 1 or k == bad[-1]):
        self._round(todo)
        todo = []
      if k == bad[-1]:
        break
    return final

  def _round(self, todo: list) -> None:
    """One lockstep round: every process runs the same LM forwards over the global mesh, each
    feeding a batch of its chunk (todo: (k, its contexts on its process, kept rows per context,
    rows) of the round's chunks to harvest) or, with none left, a stand-in whose output is
    dropped; the chunks are then written and recorded by their processes."""
    if not todo:  # every process skips the same rounds
      return
    b = self.c.lm.batch_contexts
    steps = max(batches_needed(kept, rows, b) for _, _, kept, rows in todo)
    mine = [t for t in todo if t[0] % self.procs == self.p]
    k, contexts, kept, rows = mine[0] if mine else (None, None, None, 0)
    own = batches_needed(kept, rows, b) if mine else 0
    out, filled = self._buffer(rows), 0
    stand_in_BxL = np.zeros((b, self.c.lm.context_len), np.int32)
    for j in range(steps):
      batch = contexts[j * b:(j + 1) * b] if j < own else None
      tokens_BxL = _pad(batch, b) if batch else stand_in_BxL
      acts_BxLxW = _local_rows(self.forward(self.params, tokens_BxL))
      if batch:
        keep_BxL = lm_act.keep_mask(self.cfg, tokens_BxL, self.c.lm.skip_positions)
        filled = self._fill(out, filled, [acts_BxLxW[i][keep_BxL[i]] for i in range(len(batch))])
    if mine:
      self._record(k, out, filled)

  def _buffer(self, rows: int) -> np.ndarray:
    dtype = np.uint16 if self.c.harvest.dtype == "bfloat16" else np.float32
    return np.empty((rows, self.spec["width"]), dtype)

  def _fill(self, out: np.ndarray, filled: int, rows_list: list) -> int:
    """Copies a batch's kept rows into `out` from row `filled` on, up to its end."""
    for acts in rows_list:
      take = min(len(acts), len(out) - filled)
      out[filled:filled + take] = (acts[:take].astype(ml_dtypes.bfloat16).view(np.uint16)
                                   if out.dtype == np.uint16 else acts[:take])
      filled += take
    return filled

  def _harvest_chunk(self, k: int, contexts: list, rows: int) -> None:
    """The first `rows` kept rows of chunk k through the LM, written as shard k and recorded."""
    c = self.c
    out, filled, batch = self._buffer(rows), 0, c.lm.batch_contexts
    for b in range(0, len(contexts), batch):
      if filled == rows:  # the store's last shard: the LM stops once its rows are in
        break
      filled = self._fill(out, filled, lm_act.context_rows(c, self.forward, self.params,
                                                           self.cfg, contexts[b:b + batch]))
    self._record(k, out, filled)

  def _record(self, k: int, out: np.ndarray, filled: int) -> None:
    """Writes chunk k's rows as shard k and records it in this process's part."""
    rows = len(out)
    if filled != rows:
      raise RuntimeError(f"chunk {k} gave {filled} rows, its tokens' mask {rows}")
    _save_shard(self.directory, shard_name(k), out)
    self.part[k] = [rows]
    _write_part(self.directory, self.p, {
        "format": FORMAT, "spec": self.spec, "chunk_contexts": self.chunk, "process": self.p,
        "num_processes": self.procs,
        "shards": [{"chunk": j, "file": shard_name(j), "rows": r}
                   for j in sorted(self.part) for r in self.part[j]]})
    self.harvested += 1


def _pad(batch: list, size: int) -> np.ndarray:
  """A short batch padded by repeating its last context (one compiled shape, as context_rows)."""
  return np.stack(batch + [batch[-1]] * (size - len(batch)))


def _save_shard(directory: str, name: str, rows_NxW: np.ndarray) -> None:
  """The whole shard at once (atomically): complete, or not there at all."""
  storage.write_npy(storage.join(directory, name), rows_NxW)


def _write_part(directory: str, process: int, part: dict) -> None:
  """A process's commit record: its shard is part of the store once its part lists it."""
  storage.write_json(storage.join(directory, part_name(process)), part)


def _write_manifest(directory: str, manifest: dict) -> None:
  """The store's commit record, written by process 0 once every process's shards are in."""
  storage.write_json(storage.join(directory, MANIFEST), manifest)


def _commit(directory: str, manifest: dict, spec: dict, chunk: int, processes: int) -> None:
  """Checks every shard of the store is recorded, writes manifest.json, then tidies up: the
  per-process parts, shards past the end and temporaries go (nobody is writing any more)."""
  records = _records(directory, spec, chunk)
  for s in manifest["shards"]:
    if s["rows"] not in records.get(s["chunk"], ()):
      raise ValueError(
          f"activation shard {storage.join(directory, s['file'])} is not recorded as complete: "
          f"process {s['chunk'] % processes} of {processes} stopped before harvesting it; rerun "
          "the same command (every process) to finish the store. (If that process did finish, "
          "the store is not one every host sees: give data.path a bucket or a shared disk.)")
  _write_manifest(directory, manifest)
  keep = {s["file"] for s in manifest["shards"]} | {MANIFEST}
  for f in storage.listdir(directory):
    if _owner(f, processes) is not None and f not in keep:
      storage.remove(storage.join(directory, f))
  logging.info("activation store %s: %d tokens in %d shards", directory, manifest["tokens"],
               len(manifest["shards"]))
