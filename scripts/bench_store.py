"""Read throughput of the block sampler against random rows, from a local .npy store.

  python scripts/bench_store.py                 # 65536 rows of D=2304 in bfloat16 (288 MiB)
  python scripts/bench_store.py --rows 131072 --d 3584 --steps 64

Writes a store as a harvest does (bfloat16 shards saved as uint16, a manifest), then reads
--steps batches of --batch rows through ActivationSource.batch (what the train loop's prefetch
thread calls) with each sampler, from a fresh source: cold (the store's pages dropped from the
page cache with posix_fadvise(DONTNEED) first, so the disk is read) and warm. The block pass
includes the reads it starts ahead for the next window. Then the block sampler on a memory://
copy (fsspec's in-memory filesystem: a bucket's request pattern without the network), with its
ranged reads counted. The last line reads `blocks/rows cold=X warm=Y`.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from jumprelu import data, storage  # noqa: E402


def write_store(directory: str, rows: int, d: int, shards: int) -> list[str]:
  rng = np.random.default_rng(0)
  entries, paths = [], []
  for i, n in enumerate(np.diff(np.linspace(0, rows, shards + 1).astype(int))):
    name = f"shard_{i:05d}.npy"
    x = rng.standard_normal((n, d), np.float32).astype(ml_dtypes.bfloat16)
    np.save(os.path.join(directory, name), x.view(np.uint16))
    entries.append({"file": name, "rows": int(n)})
    paths.append(os.path.join(directory, name))
  storage.write_json(os.path.join(directory, "manifest.json"),
                     {"spec": {"dtype": "bfloat16", "width": d}, "shards": entries,
                      "tokens": rows, "complete": True})
  return paths


def drop_cache(paths: list[str]) -> None:
  for p in paths:
    fd = os.open(p, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def read_pass(path: str, sampler: str, args) -> float:
  """Seconds to read --steps batches from a fresh source (and the reads it started ahead)."""
  s = data.open_npy(path, seed=0, sampler=sampler, block_rows=args.block_rows,
                    buffer_blocks=args.buffer_blocks)
  t = time.perf_counter()
  for step in range(args.steps):
    s.batch(step, args.batch)
  for f in list(s._pieces.values()):  # the next window's reads, started ahead: counted too
    f.result()
  return time.perf_counter() - t


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", type=int, default=65536)
  p.add_argument("--d", type=int, default=2304)
  p.add_argument("--shards", type=int, default=4)
  p.add_argument("--batch", type=int, default=4096)
  p.add_argument("--steps", type=int, default=64)
  p.add_argument("--block_rows", type=int, default=4096)
  p.add_argument("--buffer_blocks", type=int, default=16)
  args = p.parse_args()
  row_bytes = args.d * 2
  tmp = tempfile.mkdtemp(prefix="bench_store_")
  try:
    paths = write_store(tmp, args.rows, args.d, args.shards)
    mib = args.rows * row_bytes / 2**20
    print(f"store: {args.rows} rows x D={args.d} bfloat16 in {args.shards} shards = {mib:.0f} MiB;"
          f" {args.steps} batches of {args.batch}; blocks of {args.block_rows} rows "
          f"({args.block_rows * row_bytes / 2**20:.1f} MiB), {args.buffer_blocks} per batch")
    rows_read = args.steps * args.batch
    rate = {}
    for sampler in ("rows", "blocks"):
      for cache in ("cold", "warm"):
        if cache == "cold":
          drop_cache(paths)
        seconds = read_pass(tmp, sampler, args)
        rate[sampler, cache] = rows_read / seconds
        print(f"{sampler:6s} {cache}: {rows_read / seconds:10.0f} rows/s "
              f"{rows_read * row_bytes / seconds / 2**20:8.1f} MiB/s of batches ({seconds:.2f} s)")

    bucket = "memory://bench_store"
    for name in os.listdir(tmp):
      with open(os.path.join(tmp, name), "rb") as fh:
        storage.write_bytes(storage.join(bucket, name), fh.read())
    calls = []
    real = storage.read_bytes

    def counted(path, start=None, end=None):
      calls.append(0 if end is None else end - (start or 0))
      return real(path, start, end)

    storage.read_bytes = counted
    seconds = read_pass(bucket, "blocks", args)
    storage.read_bytes = real
    print(f"blocks memory://: {rows_read / seconds:10.0f} rows/s; {len(calls)} ranged reads "
          f"({len(calls) / args.steps:.2f} per step, median {np.median(calls) / 2**20:.1f} MiB, "
          f"{sum(calls) / 2**20:.0f} MiB in all) for {args.steps * args.batch} rows")
    storage._fs(bucket)[0].rm("/bench_store", recursive=True)
    print(f"blocks/rows cold={rate['blocks', 'cold'] / rate['rows', 'cold']:.2f} "
          f"warm={rate['blocks', 'warm'] / rate['rows', 'warm']:.2f}")
  finally:
    shutil.rmtree(tmp)


if __name__ == "__main__":
  main()
