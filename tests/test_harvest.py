"""Harvesting on a tiny random LM: the store's content, exact resume, repair, refusals."""
import json
import os

import ml_dtypes
import numpy as np
import pytest

from jumprelu import data, harvest, run
from jumprelu.lm import activations as lm_act
from jumprelu.lm import model
from tests.conftest import tiny
from tests.tiny_lm import tiny_lm

@pytest.fixture(scope="module")
def lm():
  return tiny_lm()


def config(**overrides):
  return tiny("harvest", **overrides)


def _read_store(path):
  s = data.open_npy(str(path))
  return np.concatenate([np.asarray(a, np.float32) for a in s.arrays])


def test_store_holds_the_site_activations_of_ordinary_tokens(tmp_path, lm):
  c = config()
  manifest = harvest.harvest(c, str(tmp_path), lm)
  assert manifest["tokens"] == 700 and manifest["complete"]
  assert [s["rows"] for s in manifest["shards"]] == [128] * 5 + [60]
  assert manifest["spec"]["hook_name"] == "blocks.1.hook_resid_post"
  stored = _read_store(tmp_path)

  params, cfg, tok, _ = lm
  stream = lm_act.contexts(c, cfg, tok)
  ctx = np.stack([next(stream) for _ in range(manifest["next_context"] + 1)])
  assert (ctx[:, 0] == cfg.bos_id).all()
  _, acts = model.forward(params, cfg, ctx, site=model.parse_site("resid_post.1"))
  keep = lm_act.keep_mask(cfg, ctx)
  assert not keep[:, 0].any() and not keep[ctx == cfg.eos_id].any()
  expected = np.asarray(acts)[keep][:700]
  np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5)


def _kill_after(monkeypatch, fn_name, calls):
  real = getattr(harvest, fn_name)
  count = {"n": 0}

  def dying(*args, **kw):
    count["n"] += 1
    if count["n"] == calls:
      if fn_name == "_save_shard":  # die halfway through writing the file
        directory, index = args[0], args[1]
        with open(os.path.join(directory, f"shard_{index:05d}.npy.tmp.npy"), "wb") as fh:
          fh.write(b"\x93NUMPY partial")
      raise KeyboardInterrupt(f"killed in {fn_name}")
    return real(*args, **kw)

  monkeypatch.setattr(harvest, fn_name, dying)
  return real


@pytest.mark.parametrize("fn_name,calls", [("_save_shard", 3), ("_write_manifest", 4)])
def test_killed_harvest_resumes_to_the_same_store(tmp_path, lm, monkeypatch, fn_name, calls):
  c = config()
  harvest.harvest(c, str(tmp_path / "whole"), lm)
  real = _kill_after(monkeypatch, fn_name, calls)
  with pytest.raises(KeyboardInterrupt):
    harvest.harvest(c, str(tmp_path / "killed"), lm)
  monkeypatch.setattr(harvest, fn_name, real)
  harvest.harvest(c, str(tmp_path / "killed"), lm)
  np.testing.assert_array_equal(_read_store(tmp_path / "killed"), _read_store(tmp_path / "whole"))
  assert sorted(os.listdir(tmp_path / "killed")) == sorted(os.listdir(tmp_path / "whole"))
  whole = json.load(open(tmp_path / "whole" / "manifest.json"))
  assert json.load(open(tmp_path / "killed" / "manifest.json")) == whole


def test_truncated_shard_is_named_and_repaired_by_rerun(tmp_path, lm, caplog):
  c = config()
  harvest.harvest(c, str(tmp_path / "whole"), lm)
  harvest.harvest(c, str(tmp_path / "hurt"), lm)
  shard = tmp_path / "hurt" / "shard_00002.npy"
  shard.write_bytes(shard.read_bytes()[:300])
  with pytest.raises(ValueError, match="shard_00002.npy"):
    data.open_npy(str(tmp_path / "hurt"))
  harvest.harvest(c, str(tmp_path / "hurt"), lm)
  assert "shard_00002.npy" in caplog.text
  np.testing.assert_array_equal(_read_store(tmp_path / "hurt"), _read_store(tmp_path / "whole"))


def test_manifest_that_disagrees_with_a_shard_is_named(tmp_path, lm):
  harvest.harvest(config(), str(tmp_path), lm)
  manifest = json.load(open(tmp_path / "manifest.json"))
  manifest["shards"][1]["rows"] = 999
  json.dump(manifest, open(tmp_path / "manifest.json", "w"))
  with pytest.raises(ValueError, match="shard_00001.npy holds 128 rows but its manifest.json "
                                       "says 999"):
    data.open_npy(str(tmp_path))


def test_bfloat16_store(tmp_path, lm):
  harvest.harvest(config(), str(tmp_path / "f32"), lm)
  harvest.harvest(config(**{"harvest.dtype": "bfloat16"}), str(tmp_path / "bf16"), lm)
  s = data.open_npy(str(tmp_path / "bf16"))
  assert s.arrays[0].dtype == ml_dtypes.bfloat16
  assert os.path.getsize(tmp_path / "bf16" / "shard_00000.npy") < \
      0.6 * os.path.getsize(tmp_path / "f32" / "shard_00000.npy")
  f32 = _read_store(tmp_path / "f32")
  np.testing.assert_array_equal(_read_store(tmp_path / "bf16"),
                                f32.astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("overrides,message", [
    ({"lm.site": "resid_post.0"}, "site: store has 'resid_post.1', config wants 'resid_post.0'"),
    ({"harvest.dtype": "bfloat16"}, "dtype: store has 'float32', config wants 'bfloat16'"),
    ({"lm.context_len": 32}, "context_len: store has 16, config wants 32"),
    ({"lm.skip_positions": 1}, "skip_positions: store has 0, config wants 1"),
])
def test_mismatched_store_is_refused(tmp_path, lm, overrides, message):
  harvest.harvest(config(), str(tmp_path / "activations"), lm)
  with pytest.raises(ValueError, match=message):
    harvest.harvest(config(**overrides), str(tmp_path / "activations"), lm)
  if "lm.site" in overrides or "harvest.dtype" in overrides:  # training refuses it too
    with pytest.raises(ValueError, match=message):
      run.make_source(config(**overrides), str(tmp_path))


def test_width_mismatch_is_refused_before_the_lm_runs(tmp_path, lm):
  with pytest.raises(ValueError, match=r"has width 16, but data.d_in=24"):
    harvest.harvest(config(**{"data.d_in": 24}), str(tmp_path), lm)
  assert not os.path.exists(tmp_path / "manifest.json")


def test_skip_positions_drops_the_first_tokens_after_bos(lm):
  _, cfg, _, _ = lm
  tokens = np.array([[1, 5, 6, 7, 2, 8, 9], [1, 5, 2, 7, 8, 9, 10]])
  np.testing.assert_array_equal(lm_act.keep_mask(cfg, tokens), [
      [0, 1, 1, 1, 0, 1, 1], [0, 1, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(lm_act.keep_mask(cfg, tokens, skip_positions=2), [
      [0, 0, 0, 1, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1]])
