"""The activation sources: stateless sampling, memory-mapping, bad data, synthetic data."""
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
