"""Training streamed live from the LM: batches are pure in (seed, step) and match the store."""
import numpy as np
import pytest

from jumprelu import data, harvest, live, run
from jumprelu.lm import activations as lm_act
from tests.conftest import tiny
from tests.tiny_lm import tiny_lm


def config(**overrides):
  return tiny("live", **overrides)


@pytest.fixture(scope="module")
def lm():
  return tiny_lm()


def test_batches_are_pure_and_come_from_the_lm(tmp_path, lm):
  c = config()
  a, b = live.LiveSource(c, lm), live.LiveSource(c, lm)
  for step in (7, 0, 4, 7):  # out of order, across chunks, and back
    np.testing.assert_array_equal(a.batch(step, 32), b.batch(step, 32))
  # Chunk 0 holds the activations of contexts 0..7: the same rows a harvest stores first.
  store = c.copy_and_resolve_references()
  store.data.source, store.harvest.num_tokens = "harvest", a.chunk(0).n
  harvest.harvest(store, str(tmp_path), lm)
  stored = np.concatenate([np.asarray(x) for x in data.open_npy(str(tmp_path)).arrays])
  np.testing.assert_array_equal(a.chunk(0).arrays[0], stored)
  assert not np.array_equal(a.chunk(1).arrays[0][:10], stored[:10])


def test_live_training_resumes_exactly(tmp_path, lm, monkeypatch):
  monkeypatch.setattr(lm_act, "load_lm", lambda c: lm)
  c = config(**{"train.num_steps": 10, "train.checkpoint_every": 4})
  whole = run.train_and_evaluate(c, str(tmp_path / "whole"))
  c.train.num_steps = 6  # stops after the checkpoint at 4 and two more steps ...
  run.train_and_evaluate(c, str(tmp_path / "cut"))
  c.train.num_steps = 10  # ... and is extended to 10 from the checkpoint at 6
  cut = run.train_and_evaluate(c, str(tmp_path / "cut"))
  assert cut["final"] == whole["final"]
