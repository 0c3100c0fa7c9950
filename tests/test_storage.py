"""A store in a bucket, through fsspec's in-memory filesystem (memory://, what gs:// is in
production): the same rows as the local copy, read in whole blocks by ranged reads only."""
import collections
import os
import uuid

import jax
import ml_dtypes
import numpy as np
import pytest

from jumprelu import data, run, sharding, storage, train, validate
from tests.conftest import killed_then_resumed, tiny

D = 8


@pytest.fixture
def bucket():
  """A fresh memory:// folder, removed afterwards (the in-memory filesystem is per process)."""
  url = f"memory://bucket-{uuid.uuid4().hex}"
  yield url
  fs, path = storage._fs(url)
  if fs.exists(path):
    fs.rm(path, recursive=True)


def _harvested(directory, sizes=(256, 256, 256), width=D, seed=0):
  """A store laid out as harvest writes it: bfloat16 shards saved as uint16, a manifest."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(sum(sizes), width)).astype(ml_dtypes.bfloat16)
  shards, lo = [], 0
  for i, n in enumerate(sizes):
    storage.write_npy(storage.join(directory, f"shard_{i:05d}.npy"), x[lo:lo + n].view(np.uint16))
    shards.append({"file": f"shard_{i:05d}.npy", "rows": n})
    lo += n
  storage.write_json(storage.join(directory, "manifest.json"),
                     {"spec": {"dtype": "bfloat16", "width": width}, "shards": shards,
                      "tokens": int(sum(sizes)), "complete": True})
  return x.astype(np.float32)


def _copy(local_dir, url):
  for name in os.listdir(local_dir):
    with open(os.path.join(local_dir, name), "rb") as fh:
      storage.write_bytes(storage.join(url, name), fh.read())


def test_remote_npy_file_reads_row_ranges(tmp_path, bucket):
  x = (np.arange(40 * D) % 256).astype(np.float32).reshape(40, D)  # exact in bfloat16
  for name, a in (("f32.npy", x), ("bf16.npy", x.astype(ml_dtypes.bfloat16).view(np.uint16))):
    np.save(tmp_path / name, a)
    storage.write_npy(storage.join(bucket, name), a)
    remote = storage.NpyFile(storage.join(bucket, name))
    local = storage.NpyFile(str(tmp_path / name))
    assert remote.shape == local.shape == (40, D) and remote.dtype == local.dtype == a.dtype
    np.testing.assert_array_equal(remote.rows(7, 31), a[7:31])
    np.testing.assert_array_equal(local.rows(7, 31), a[7:31])
  bf16 = storage.NpyFile(storage.join(bucket, "bf16.npy")).view(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(bf16.rows(0, 40).astype(np.float32), x)
  storage.write_bytes(storage.join(bucket, "cut.npy"), (tmp_path / "f32.npy").read_bytes()[:500])
  with pytest.raises(ValueError, match="cut.npy is truncated"):
    storage.NpyFile(storage.join(bucket, "cut.npy"))
  storage.write_bytes(storage.join(bucket, "text.npy"), b"not an array")
  with pytest.raises(ValueError, match="no NUMPY magic"):
    storage.NpyFile(storage.join(bucket, "text.npy"))


def test_remote_store_gives_the_local_rows(tmp_path, bucket):
  x = _harvested(str(tmp_path), sizes=(256, 100, 300))
  _copy(str(tmp_path), bucket)
  assert data.read_manifest(bucket) == data.read_manifest(str(tmp_path))
  local = data.open_npy(str(tmp_path), seed=2, sampler="blocks", block_rows=64, buffer_blocks=4)
  remote = data.open_npy(bucket, seed=2, block_rows=64, buffer_blocks=4)  # auto: blocks
  assert remote.sampler == "blocks" and isinstance(remote.arrays[0], storage.NpyFile)
  assert isinstance(local.arrays[0], np.memmap)
  assert (remote.n, remote.d) == (local.n, local.d) == (656, D)
  for step in (0, 1, 30, 7):
    np.testing.assert_array_equal(remote.batch(step, 16), local.batch(step, 16))
    np.testing.assert_array_equal(remote.batch(step, 16), x[remote.batch_indices(step, 16)])
  assert data.shard_paths(bucket) == [storage.join(bucket, f"shard_{i:05d}.npy") for i in range(3)]
  assert data.open_npy(str(tmp_path)).sampler == "rows"  # a local store keeps today's sampler
  with pytest.raises(ValueError, match="data.sampler='rows' reads single rows"):
    data.open_npy(bucket, sampler="rows")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.open_npy(storage.join(bucket, "nothing"))


@pytest.mark.parametrize("processes", [1, 2])
def test_remote_store_is_read_in_whole_blocks_only(tmp_path, bucket, monkeypatch, processes):
  """One epoch (48 steps of 16 over 768 rows in 3 windows of 4 blocks of 64 rows) reads every
  block of a process's lanes once, one ranged read per block, plus the next window's read
  ahead; nothing else but each shard's header, never a whole file."""
  _harvested(bucket, sizes=(256, 256, 256))
  calls = []
  real = storage.read_bytes
  monkeypatch.setattr(storage, "read_bytes",
                      lambda path, start=None, end=None: (calls.append((path, start, end)),
                                                          real(path, start, end))[1])
  block_bytes = 64 * D * 2
  for p in range(processes):
    calls.clear()
    s = data.open_npy(bucket, seed=1, block_rows=64, buffer_blocks=4)
    lo, hi = p * 16 // processes, (p + 1) * 16 // processes
    for step in range(48):
      s.batch(step, 16, lo, hi)
    for f in list(s._pieces.values()):  # the read-ahead runs on a pool: let it land first
      f.result()
    assert [c[0] for c in calls if not c[0].endswith(".npy")] == [bucket + "/manifest.json"]
    calls[:] = [c for c in calls if c[0].endswith(".npy")]
    headers = [c for c in calls if c[1] == 0 and c[2] == 4096]
    reads = [c for c in calls if c not in headers]
    assert len(headers) == 3 and all(c[1] is not None and c[2] is not None for c in calls)
    assert all(end - start == block_bytes for _, start, end in reads)
    # Window w's block in lane j is piece 4w + j; windows 0-2 are the epoch, 3 is read ahead.
    lanes = range(4 * p // processes, 4 * (p + 1) // processes)
    expected = collections.Counter()
    for g in [4 * w + j for w in range(4) for j in lanes]:
      row = int(s.stream_rows(g * 64))
      shard = s.arrays[row // 256]
      expected[(shard.path, shard._offset + row % 256 * D * 2)] += 1
    assert collections.Counter((path, start) for path, start, _ in reads) == expected
    if processes == 1:  # the first three windows read every block of the store
      assert len({shard for shard, start in expected}) == 3 and len(set(expected)) >= 12
    s.mean_sq_norm(128)  # the normalisation reads whole blocks too
    assert all(end - start in (block_bytes, 4096) for _, start, end in calls)


def _tiny_blocks(path):
  return tiny(**{"data.source": "npy", "data.path": path, "data.sampler": "blocks",
                 "data.block_rows": 128, "data.buffer_blocks": 8, "data.norm_rows": 256})


def test_training_on_a_bucket_equals_training_on_the_local_copy(tmp_path, bucket, monkeypatch):
  """configs/tiny.py with the block sampler: a run on the memory:// copy of the store, killed at
  step 8 and resumed, trains the same SAE as an uninterrupted run on the local copy."""
  x, _, _ = data.synthetic(1000, 16, 32, 3.0, seed=0)  # 1000 rows: a short block of 104
  os.makedirs(tmp_path / "store")
  np.save(tmp_path / "store" / "shard_00000.npy", x[:600])
  np.save(tmp_path / "store" / "shard_00001.npy", x[600:])
  _copy(str(tmp_path / "store"), bucket)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])

  def fit(path, workdir):
    c = _tiny_blocks(path)
    validate.check_config(c)
    source, _ = run.make_source(c)
    assert source.sampler == "blocks"
    return train.fit(c, str(workdir), source, mesh)[0]

  local = fit(str(tmp_path / "store"), tmp_path / "local")
  remote = killed_then_resumed(monkeypatch, lambda: fit(bucket, tmp_path / "remote"))
  for a, b in zip(jax.tree.leaves(local.params), jax.tree.leaves(remote.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_checks_the_block_sampler_keys(bucket):
  c = _tiny_blocks(bucket)
  c.data.buffer_blocks = 5
  with pytest.raises(ValueError, match=r"data.buffer_blocks must be a divisor of "
                                       r"train.batch_size=64"):
    validate.check_config(c)
  c = _tiny_blocks(bucket)
  c.data.sampler = "rows"
  with pytest.raises(ValueError, match=r"data.sampler must be 'blocks' or 'auto' for a remote"):
    validate.check_config(c)
  c.data.sampler = "random"
  with pytest.raises(ValueError, match=r"data.sampler must be one of \('auto', 'rows', 'blocks'\)"):
    validate.check_config(c)
