"""Activations from the LM harvested into a `.npy` store (shards + manifest); live.py streams them instead.

The store is a directory of shard_NNNNN.npy files [rows, W] and manifest.json, which lists the
complete shards and where the next one starts (context index, kept rows of it already stored).
Shards are written to a temporary name and renamed, then the manifest is rewritten atomically,
so a killed harvest restarts from its last complete shard and yields the same store. BOS, EOS
and padding positions are never stored.
"""
import hashlib
import os

import ml_dtypes
import numpy as np
from absl import logging

from jumprelu import data, files, logs
from jumprelu.lm import activations as lm_act
from jumprelu.lm import model

MANIFEST = "manifest.json"
STORE_DTYPES = ("float32", "bfloat16")


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


def _write_manifest(directory: str, manifest: dict) -> None:
  """The store's commit record: a shard is part of the store once the manifest lists it."""
  files.save_json(os.path.join(directory, MANIFEST), manifest)


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
                     + "; ".join(diffs) + "); point data.path at a new directory, or delete this one")


def _drop_bad_shards(directory: str, manifest: dict) -> None:
  """Rolls the manifest back to before the first missing, truncated or mis-sized shard, so the
  harvest regenerates it and everything after it."""
  for i, shard in enumerate(manifest["shards"]):
    path = os.path.join(directory, shard["file"])
    try:
      rows = np.load(path, mmap_mode="r").shape[0]
      problem = None if rows == shard["rows"] else (
          f"holds {rows} rows, manifest.json says {shard['rows']}")
    except (OSError, ValueError) as e:
      problem = f"cannot be read ({e})"
    if problem:
      logging.warning("activation shard %s %s: harvesting again from it on", path, problem)
      manifest["tokens"] = sum(s["rows"] for s in manifest["shards"][:i])
      manifest["next_context"], manifest["skip_rows"] = shard["start"]
      manifest["shards"] = manifest["shards"][:i]
      manifest["complete"] = False
      _write_manifest(directory, manifest)
      return


def _save_shard(directory: str, index: int, rows_NxW: np.ndarray, dtype: str) -> str:
  name = f"shard_{index:05d}.npy"
  out = rows_NxW.astype(ml_dtypes.bfloat16).view(np.uint16) if dtype == "bfloat16" else rows_NxW
  files.save_npy(os.path.join(directory, name), out)
  return name


def harvest(c, directory: str, lm=None) -> dict:
  """Fills `directory` with harvest.num_tokens activations (resuming a partial store)."""
  if c.harvest.dtype not in STORE_DTYPES:
    raise ValueError(f"harvest.dtype must be one of {STORE_DTYPES}, got {c.harvest.dtype!r}")
  params, cfg, tokenizer, name = lm or lm_act.load_lm(c)
  spec = store_spec(c, cfg, tokenizer, name)
  if spec["width"] != c.data.d_in:
    raise ValueError(f"{c.lm.site} of {name} has width {spec['width']}, but data.d_in="
                     f"{c.data.d_in}; set --config.data.d_in={spec['width']}")
  os.makedirs(directory, exist_ok=True)
  manifest = data.read_manifest(directory)
  if manifest is None:
    manifest = {"spec": spec, "shards": [], "tokens": 0, "next_context": 0, "skip_rows": 0,
                "complete": False}
  check_spec(manifest, spec, directory)
  for f in os.listdir(directory):  # leftovers of a killed write are never part of the store
    if files.is_temporary(f):
      os.remove(os.path.join(directory, f))
  _drop_bad_shards(directory, manifest)
  target = c.harvest.num_tokens
  if manifest["complete"] or manifest["tokens"] >= target:
    return manifest

  site = model.parse_site(c.lm.site)
  forward = lm_act.site_fn(cfg, site)
  per_batch = c.lm.batch_contexts
  # The store holds every kept row of contexts < next_context and the first skip_rows of
  # next_context. Restart at a batch boundary so every forward sees the same batch of contexts
  # as an uninterrupted harvest did (same shapes, same values), and drop what is stored.
  cursor_ctx, cursor_skip = manifest["next_context"], manifest["skip_rows"]
  first = cursor_ctx - cursor_ctx % per_batch
  ctx_iter = lm_act.contexts(c, cfg, tokenizer)
  for _ in range(first):
    next(ctx_iter)
  pending = []  # (context index, offset of rows[0] among its kept rows, rows [n, W])
  index, exhausted = first, False
  bar = logs.progress(target, "harvest", "tok", start=manifest["tokens"], every_s=10.0)
  while manifest["tokens"] < target and not exhausted:
    batch = [t for _, t in zip(range(per_batch), ctx_iter)]
    exhausted = len(batch) < per_batch
    if not batch:
      break
    for b, rows in enumerate(lm_act.context_rows(c, forward, params, cfg, batch)):
      ctx = index + b
      if ctx > cursor_ctx:
        pending.append((ctx, 0, rows))
      elif ctx == cursor_ctx:
        pending.append((ctx, cursor_skip, rows[cursor_skip:]))
    index += per_batch
    _flush(directory, manifest, pending, target, c.harvest.shard_tokens, exhausted,
           c.harvest.dtype)
    seen = min(target, manifest["tokens"] + sum(len(rows) for _, _, rows in pending))
    bar.update(seen - bar.n)
  bar.close()
  if manifest["tokens"] < target:
    logging.warning("text.source %s ran out after %d tokens (harvest.num_tokens=%d)",
                    c.text.source, manifest["tokens"], target)
  manifest["complete"] = True
  _write_manifest(directory, manifest)
  logging.info("activation store %s: %d tokens in %d shards", directory, manifest["tokens"],
               len(manifest["shards"]))
  return manifest


def _flush(directory, manifest, pending, target, shard_rows, final, dtype) -> None:
  """Writes each full shard from `pending` (and what is left if `final` or at the target)."""
  while pending:
    available = sum(len(rows) for _, _, rows in pending)
    want = min(shard_rows, target - manifest["tokens"])
    if want <= 0 or (available < want and not final):
      return
    want = min(want, available)
    parts, taken = [], 0
    while taken < want:
      ctx, offset, rows = pending[0]
      take = min(want - taken, len(rows))
      parts.append(rows[:take])
      taken += take
      if take == len(rows):
        pending.pop(0)
        next_ctx, next_skip = ctx + 1, 0
      else:
        pending[0] = (ctx, offset + take, rows[take:])
        next_ctx, next_skip = ctx, offset + take
    start = [manifest["next_context"], manifest["skip_rows"]]
    name = _save_shard(directory, len(manifest["shards"]), np.concatenate(parts), dtype)
    manifest["shards"].append({"file": name, "rows": want, "start": start})
    manifest["tokens"] += want
    manifest["next_context"], manifest["skip_rows"] = next_ctx, next_skip
    _write_manifest(directory, manifest)
