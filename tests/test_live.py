"""Training streamed live from the LM: batches are pure in (seed, step) and match the store."""
import numpy as np
import pytest

from jumprelu import data, harvest, live, run, sharding
from jumprelu.lm import activations as lm_act
from tests.conftest import tiny
from tests.tiny_lm import tiny_lm


def config(**overrides):
  return tiny("live", **overrides)


@pytest.fixture(scope="module")
def lm():
  return tiny_lm()


def _rows(source, k):
  """Chunk k's rows (its kept tokens in context order), copied to the host."""
  chunk = source.chunk(k)
  return np.asarray(chunk["acts"]).reshape(-1, source.d)[chunk["pos"]]


def test_batches_are_pure_and_come_from_the_lm(tmp_path, lm):
  c = config()
  a, b = live.LiveSource(c, lm), live.LiveSource(c, lm)
  for step in (7, 0, 4, 7):  # out of order, across chunks, and back
    np.testing.assert_array_equal(a.batch(step, 32), b.batch(step, 32))
  # Chunk 0 holds the activations of contexts 0..7: the same rows a harvest stores first.
  store = c.copy_and_resolve_references()
  store.data.source, store.harvest.num_tokens = "harvest", a.chunk(0)["n"]
  harvest.harvest(store, str(tmp_path), lm)
  stored = np.concatenate([np.asarray(x) for x in data.open_npy(str(tmp_path)).arrays])
  np.testing.assert_array_equal(_rows(a, 0), stored)
  assert not np.array_equal(_rows(a, 1)[:10], stored[:10])
  # Its batches, gathered on the devices, are the ones a store of those rows gives (seed, k).
  from_store = data.ActivationSource([stored], seed=a.chunk(0)["seed"])
  for step in range(c.data.live_chunk_steps):
    np.testing.assert_array_equal(a.batch(step, 32), from_store.batch(step, 32))
  assert a.mean_sq_norm(50) == from_store.mean_sq_norm(50)


def test_batches_on_a_mesh_equal_one_device(lm):
  """Over 4 × 2 devices the chunk's contexts are split over "data" and the batch is gathered
  across them; the rows are those of one device."""
  one = live.LiveSource(config(), lm)
  mesh = sharding.make_mesh(4, 2)
  many = live.LiveSource(config(**{"mesh.data": 4, "mesh.model": 2}), lm, mesh)
  assert many.chunk(0)["acts"].sharding.spec == live.CHUNK_SPEC
  for step in (0, 5):
    x = many.global_batch(step, 32)[0]
    assert x.sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(x), one.batch(step, 32))
  with pytest.raises(ValueError, match="data.live_chunk_contexts=6 is not divisible by "
                     "mesh.data=4"):
    live.LiveSource(config(**{"data.live_chunk_contexts": 6}), lm, mesh)


def test_nonfinite_rows_are_refused_or_replaced(lm):
  c = config()
  source = live.LiveSource(c, lm)
  chunk = source.chunk(0)
  idx = data.ActivationSource([np.zeros((chunk["n"], 1), np.float32)], seed=chunk["seed"]
                              ).batch_indices(0, 32)
  chunk["finite"][idx[3]] = False  # as if the LM had given a NaN there
  with pytest.raises(FloatingPointError, match="non-finite activation in live tiny-random "
                     r"resid_post.1 context \d+ position \d+ \(batch of step 0\)"):
    source.batch(0, 32)
  x, replaced = source.batch_skipping_nonfinite(0, 32)
  assert len(replaced) == 1
  rows = _rows(source, 0)
  np.testing.assert_array_equal(np.delete(x, 3, 0), np.delete(rows[idx], 3, 0))
  assert not np.array_equal(x[3], rows[idx[3]])


def test_live_training_resumes_exactly(tmp_path, lm, monkeypatch):
  monkeypatch.setattr(lm_act, "load_lm", lambda c: lm)
  c = config(**{"train.num_steps": 10, "train.checkpoint_every": 4})
  whole = run.train_and_evaluate(c, str(tmp_path / "whole"))
  c.train.num_steps = 6  # stops after the checkpoint at 4 and two more steps ...
  run.train_and_evaluate(c, str(tmp_path / "cut"))
  c.train.num_steps = 10  # ... and is extended to 10 from the checkpoint at 6
  cut = run.train_and_evaluate(c, str(tmp_path / "cut"))
  assert cut["final"] == whole["final"]
