"""The activation sources: stateless sampling, memory-mapping, bad data, synthetic data."""
import math
import os

import numpy as np
import pytest

from jumprelu import data


@pytest.mark.parametrize("n", [1, 2, 5, 64, 1000, 4097])
def test_permute_is_a_bijection(n):
  for epoch in (0, 1, 7):
    out = data.permute(np.arange(n), n, seed=3, epoch=np.uint64(epoch))
    assert sorted(out.tolist()) == list(range(n))


def test_epochs_and_seeds_shuffle_differently():
  a = data.permute(np.arange(1000), 1000, 0, np.uint64(0))
  assert not np.array_equal(a, data.permute(np.arange(1000), 1000, 0, np.uint64(1)))
  assert not np.array_equal(a, data.permute(np.arange(1000), 1000, 1, np.uint64(0)))
  assert not np.array_equal(a, np.arange(1000))


def _store(tmp_path, sizes=(300, 200, 500), d=8):
  rng = np.random.default_rng(0)
  arrays = [rng.normal(size=(n, d)).astype(np.float32) for n in sizes]
  for i, a in enumerate(arrays):
    np.save(tmp_path / f"shard_{i:05d}.npy", a)
  return np.concatenate(arrays)


def test_batch_is_a_pure_function_of_seed_and_step(tmp_path):
  full = _store(tmp_path)
  s1 = data.open_npy(str(tmp_path), seed=5)
  assert all(isinstance(a, np.memmap) for a in s1.arrays)  # never loaded whole
  s2 = data.open_npy(str(tmp_path), seed=5)
  np.testing.assert_array_equal(s1.batch(17, 64), s2.batch(17, 64))
  np.testing.assert_array_equal(s1.batch(17, 64), full[s1.batch_indices(17, 64)])
  assert not np.array_equal(s1.batch(17, 64), data.open_npy(str(tmp_path), seed=6).batch(17, 64))
  # process slices of a batch put together give the whole batch
  parts = [s1.batch(17, 64, lo, lo + 16) for lo in range(0, 64, 16)]
  np.testing.assert_array_equal(np.concatenate(parts), s1.batch(17, 64))


def test_one_epoch_reads_every_row_once(tmp_path):
  full = _store(tmp_path, sizes=(100, 156))
  s = data.open_npy(str(tmp_path), seed=1)
  idx = np.concatenate([s.batch_indices(step, 64) for step in range(4)])  # 256 rows = 1 epoch
  assert sorted(idx.tolist()) == list(range(256))
  assert len(full) == 256


def test_non_finite_row_is_named(tmp_path):
  full = _store(tmp_path)
  bad = np.load(tmp_path / "shard_00001.npy")
  bad[123, 4] = np.nan
  np.save(tmp_path / "shard_00001.npy", bad)
  s = data.open_npy(str(tmp_path))
  with pytest.raises(FloatingPointError, match=r"shard_00001\.npy at row 123"):
    for step in range(len(full) // 100 + 1):
      s.batch(step, 100)


def test_missing_and_empty_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.path .* does not exist"):
    data.open_npy(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="holds no .npy shards"):
    data.open_npy(str(tmp_path))
  np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
  with pytest.raises(ValueError, match="0 rows"):
    data.open_npy(str(tmp_path))


def test_shards_of_different_widths_are_refused(tmp_path):
  np.save(tmp_path / "a.npy", np.zeros((4, 8), np.float32))
  np.save(tmp_path / "b.npy", np.zeros((4, 9), np.float32))
  with pytest.raises(ValueError, match=r"one D; got shapes \[\(4, 8\), \(4, 9\)\]"):
    data.open_npy(str(tmp_path))


def test_truncated_shard_is_named(tmp_path):
  _store(tmp_path)
  path = tmp_path / "shard_00002.npy"
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(ValueError, match="shard_00002.npy"):
    data.open_npy(str(tmp_path))


def test_synthetic_has_requested_statistics_and_saves(tmp_path):
  x, g, facts = data.synthetic(20000, 16, 48, 4.0, seed=0)
  assert x.shape == (20000, 16) and g.shape == (48, 16) and x.dtype == np.float32
  assert abs(facts["true_l0"] - 4.0) < 0.1
  np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, rtol=1e-5)
  x2, g2, _ = data.synthetic(20000, 16, 48, 4.0, seed=0)
  np.testing.assert_array_equal(x, x2)
  data.save_synthetic(str(tmp_path), x, g, facts)
  s = data.open_npy(str(tmp_path / "acts"))
  assert s.n == 20000 and s.d == 16
  np.testing.assert_array_equal(np.load(tmp_path / "true_dictionary.npy"), g)
  assert os.path.exists(tmp_path / "facts.json")


def test_synthetic_firing_rates_and_magnitudes_follow_their_knobs():
  """configs/synthetic_hard.py's settings: rates over two decades, log-normal magnitudes."""
  n_features = 64
  x, g, facts = data.synthetic(65536, 16, n_features, 1.5, seed=0, noise_std=0.0,
                               freq_exponent=2 / np.log10(n_features), magnitude_sigma=1.0)
  freq = np.sort(facts["freq"])[::-1]
  np.testing.assert_allclose(freq[0] / freq[-1], 100.0, rtol=1e-6)  # two decades
  np.testing.assert_allclose(freq / freq[0], np.arange(1, n_features + 1) ** -(2 / np.log10(64)))
  assert freq[0] < 0.5 and abs(facts["true_l0"] - 1.5) < 0.05  # below the cap at 1/2
  # Rows holding exactly one feature: |x| is that feature's magnitude, log-normal with σ = 1.
  mags = np.linalg.norm(x, axis=1)
  one = (mags > 0) & (np.abs(np.abs(x @ g.T).max(1) - mags) < 1e-5)
  assert np.std(np.log(mags[one])) == pytest.approx(1.0, abs=0.05)
  _, _, equal = data.synthetic(1000, 16, n_features, 2.0, seed=0, freq_exponent=0.0)
  np.testing.assert_allclose(equal["freq"], 2.0 / n_features)


def test_dictionary_recovery():
  g = np.eye(4, 8, dtype=np.float32)
  assert data.dictionary_recovery(np.concatenate([g, -g]), g) == pytest.approx(1.0)
  assert data.dictionary_recovery(np.eye(4, 8, k=4, dtype=np.float32), g) == pytest.approx(0.0)


def test_outliers_that_set_the_normalisation_are_reported(caplog):
  x = np.random.default_rng(0).normal(size=(5000, 8)).astype(np.float32)
  s = data.ActivationSource([x])
  s.mean_sq_norm(5000)
  assert "carry" not in caplog.text
  x[:5] *= 1000.0  # 0.1% of rows, a million times the energy: attention-sink-like tokens
  s.mean_sq_norm(5000)
  assert "5 of the 5000 rows sampled for the input normalisation (0.1%) carry 100%" in caplog.text


def test_prefetch_yields_in_order_and_raises_at_the_failing_step():
  import threading
  seen = []

  def fn(step):
    seen.append(step)
    if step == 5:
      raise KeyboardInterrupt("simulated kill")
    return step * 10

  for depth in (0, 1, 3):
    seen.clear()
    it = data.Prefetch(fn, range(2, 9), depth)
    assert [next(it) for _ in range(3)] == [20, 30, 40]  # steps 2, 3, 4 come out before ...
    with pytest.raises(KeyboardInterrupt, match="simulated kill"):
      next(it)  # ... step 5's error, however far ahead the thread had read
    it.close()
    assert max(seen) == 5  # nothing is read past a failed step
  it = data.Prefetch(lambda s: s, range(1000), 2)
  assert next(it) == 0
  it.close()  # stops the thread though 998 steps are left
  assert not any(t.name == "jumprelu-prefetch" for t in threading.enumerate())
  assert list(data.Prefetch(lambda s: s, range(4), 2)) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- block sampler

def _blocks(x, seed=3, block_rows=64, buffer_blocks=4, split=(300, 1)):
  """A block-sampled source over x cut into shards at `split` (one shard of 1 row)."""
  cuts = np.cumsum(split)
  return data.ActivationSource(np.split(x, cuts), seed=seed, sampler="blocks",
                               block_rows=block_rows, buffer_blocks=buffer_blocks)


def _rows(n, d=4):
  return np.arange(n * d, dtype=np.float32).reshape(n, d)


def test_block_sampler_is_a_pure_function_of_seed_and_step():
  x = _rows(1000)
  a, b = _blocks(x), _blocks(x)
  seq = [a.batch(step, 16) for step in range(40)]  # read in order: the buffer fills and drains
  for step in (39, 3, 17, 0, 25):  # out of order, as a resumed run reads them
    np.testing.assert_array_equal(b.batch(step, 16), seq[step])
    np.testing.assert_array_equal(seq[step], x[a.batch_indices(step, 16)])
  assert not np.array_equal(_blocks(x, seed=4).batch(5, 16), seq[5])
  assert not np.array_equal(a.batch(5, 16), data.ActivationSource([x], seed=3).batch(5, 16))


def test_block_sampler_reads_every_row_once_per_epoch():
  # N = 1024 = 4 windows of 4 blocks of 64 rows; c = 16 / 4 = 4 rows per block per batch
  s = _blocks(_rows(1024))
  for epoch in range(3):
    idx = np.concatenate([s.batch_indices(step, 16) for step in range(64 * epoch, 64 * epoch + 64)])
    assert sorted(idx.tolist()) == list(range(1024))
    batch = s.batch_indices(64 * epoch + 5, 16)
    assert len(np.unique(batch // 64)) == 4  # a batch mixes the window's 4 blocks, 4 rows each


@pytest.mark.parametrize("n,block_rows,buffer_blocks,batch", [
    (1000, 64, 4, 16),  # N not a multiple of the block: a short block of 40 rows per epoch
    (1000, 50, 4, 12),  # c = 3 does not divide K = 50: lanes change block mid-batch
    (1000, 2000, 2, 8),  # a block larger than the store is the store
])
def test_uneven_store_is_fully_used(n, block_rows, buffer_blocks, batch):
  """Every epoch of the block stream is a permutation of all rows, and the batches of whole
  windows read exactly a prefix of that stream: no row is left out, none read twice."""
  s = _blocks(_rows(n), block_rows=block_rows, buffer_blocks=buffer_blocks)
  for epoch in range(3):
    assert sorted(s.stream_rows(np.arange(epoch * n, epoch * n + n)).tolist()) == list(range(n))
  k = s.block_rows
  c = batch // buffer_blocks
  per = c // math.gcd(c, k)  # windows that end on a step boundary
  windows = per * -(-max(2, -(-2 * n // (buffer_blocks * k))) // per)  # two epochs or more
  steps = windows * k // c
  idx = np.concatenate([s.batch_indices(step, batch) for step in range(steps)])
  prefix = s.stream_rows(np.arange(windows * buffer_blocks * k))
  np.testing.assert_array_equal(np.sort(idx), np.sort(prefix))
  counts = np.bincount(idx, minlength=n)
  assert counts.min() >= len(idx) // n and counts.max() <= -(-len(idx) // n)


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_block_sampler_splits_over_processes(processes):
  """P processes, each reading rows [lo, hi) of every batch, put together the one-process batch,
  and each reads only the blocks of its lanes, each once."""
  x, b = _rows(1000), 32
  whole = [_blocks(x, buffer_blocks=8).batch(step, b) for step in range(40)]
  read = []
  for p in range(processes):
    s = _blocks(x, buffer_blocks=8)
    pieces = []
    real = s._read_piece
    s._read_piece = lambda g, real=real, pieces=pieces: (pieces.append(g), real(g))[1]
    lo, hi = p * b // processes, (p + 1) * b // processes
    for step in range(40):
      np.testing.assert_array_equal(s.batch(step, b, lo, hi), whole[step][lo:hi])
    assert len(pieces) == len(set(pieces))  # every block read once
    lanes = {g % 8 for g in pieces}
    assert lanes == set(range(8 * p // processes, 8 * (p + 1) // processes))
    read.append(set(pieces))
  assert all(not (read[p] & read[q]) for p in range(processes) for q in range(p))


def test_block_sampler_non_finite_rows():
  x = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32)
  x[123, 2] = np.nan
  s = _blocks(x, buffer_blocks=2)
  step = next(t for t in range(500) if 123 in s.batch_indices(t, 8))
  with pytest.raises(FloatingPointError, match=r"array\[0\] at row 123"):
    s.batch(step, 8)
  rows, replaced = s.batch_skipping_nonfinite(step, 8)
  assert replaced == ["array[0] at row 123"] and np.isfinite(rows).all()
  at = list(s.batch_indices(step, 8)).index(123)
  stand_in = np.flatnonzero((x == rows[at]).all(axis=1))
  assert len(stand_in) == 1 and stand_in[0] // 64 == 123 // 64  # from the same block
  again, _ = _blocks(x, buffer_blocks=2).batch_skipping_nonfinite(step, 8)
  np.testing.assert_array_equal(rows, again)
  with pytest.raises(FloatingPointError, match=r"array\[0\] at row 123"):
    s.mean_sq_norm(1000)
  assert s.mean_sq_norm(1000, skip_nonfinite=True) == pytest.approx(
      np.mean(np.sum(np.delete(x, 123, axis=0).astype(np.float64) ** 2, axis=1)))


def test_block_sampler_normalisation_reads_whole_blocks():
  x = np.random.default_rng(1).normal(size=(1000, 4)).astype(np.float32) * 3
  s = _blocks(x)
  pieces = []
  real = s._read_piece
  s._read_piece = lambda g: (pieces.append(g), real(g))[1]
  idx = s.stream_rows(np.arange(200))
  assert s.mean_sq_norm(200) == pytest.approx(np.mean(np.sum(x[idx].astype(np.float64) ** 2, 1)))
  assert sorted(pieces) == [0, 1, 2, 3]  # 200 rows: 4 blocks of 64, not 200 random rows
  assert len(np.unique(idx // 64)) == 4


def test_block_sampler_refuses_a_batch_it_cannot_split():
  with pytest.raises(ValueError, match=r"train.batch_size=30 is not a multiple of "
                                       r"data.buffer_blocks=4.*divisor of 30"):
    _blocks(_rows(100)).batch(0, 30)
