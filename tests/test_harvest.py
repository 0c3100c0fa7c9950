"""Harvesting on a tiny random LM: the store's content and row order, the same store from any
process count, exact resume after a kill at any write, repair, refusals, bucket paths."""
import json
import os
import subprocess
import sys

import fsspec
import ml_dtypes
import numpy as np
import pytest

from jumprelu import data, harvest, run, storage
from jumprelu.lm import activations as lm_act
from jumprelu.lm import model
from tests.conftest import tiny
from tests.tiny_lm import tiny_lm


@pytest.fixture(scope="module")
def lm():
  return tiny_lm()


@pytest.fixture(scope="module")
def whole(tmp_path_factory, lm):
  """The one-process store of config(), harvested once, uninterrupted."""
  path = tmp_path_factory.mktemp("whole")
  harvest.harvest(config(), str(path), lm)
  return path


def config(**overrides):
  return tiny("harvest", **overrides)


def _read_store(path):
  s = data.open_npy(str(path))
  return np.concatenate([np.asarray(a, np.float32) for a in s.arrays])


def _files(path) -> dict:
  """{name: bytes} of every file in a store (a local directory or a URL)."""
  return {n: storage.read_bytes(storage.join(str(path), n)) for n in storage.listdir(str(path))}


def _assert_same_store(path, reference):
  got, want = _files(path), _files(reference)
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name] == want[name], name


def test_store_holds_the_site_activations_of_ordinary_tokens_in_text_order(whole, lm):
  c = config()
  manifest = json.load(open(whole / "manifest.json"))
  assert manifest["tokens"] == 700 and manifest["complete"]
  assert manifest["spec"]["hook_name"] == "blocks.1.hook_resid_post"
  assert harvest.chunk_contexts(c) == 8  # 128 rows / 15 per context, rounded to batches of 4
  stored = _read_store(whole)
  assert len(stored) == 700

  params, cfg, tok, _ = lm
  stream = lm_act.contexts(c, cfg, tok)
  ctx = np.stack([next(stream) for _ in range(manifest["next_context"] + 1)])
  assert (ctx[:, 0] == cfg.bos_id).all()
  _, acts = model.forward(params, cfg, ctx, site=model.parse_site("resid_post.1"))
  keep = lm_act.keep_mask(cfg, ctx)
  assert not keep[:, 0].any() and not keep[ctx == cfg.eos_id].any()
  kept_rows = np.asarray(acts)[keep]
  assert len(kept_rows) >= 700 > keep[:-1].sum()  # next_context holds the store's last row
  np.testing.assert_allclose(stored, kept_rows[:700], rtol=1e-5, atol=1e-5)
  # Shard k: every kept row of contexts 8k..8k+7; the last one cut at harvest.num_tokens.
  per_chunk = [int(keep[k:k + 8].sum()) for k in range(0, len(ctx), 8)]
  rows = [s["rows"] for s in manifest["shards"]]
  assert rows[:-1] == per_chunk[:len(rows) - 1] and 0 < rows[-1] <= per_chunk[len(rows) - 1]
  assert [s["contexts"] for s in manifest["shards"]] == [[8 * k, 8 * k + 8]
                                                         for k in range(len(rows))]
  assert sorted(os.listdir(whole)) == ["manifest.json"] + [
      f"shard_{k:05d}.npy" for k in range(len(rows))]


@pytest.mark.parametrize("processes", [2, 3])
def test_any_process_count_writes_the_one_process_store(tmp_path, lm, whole, processes):
  c = config()
  for p in reversed(range(processes)):  # process 0 last: it commits once the others are done
    harvest.harvest(c, str(tmp_path), lm, process=(p, processes))
  _assert_same_store(tmp_path, whole)


def test_the_store_is_committed_only_once_every_process_is_done(tmp_path, lm, whole):
  c = config()
  harvest.harvest(c, str(tmp_path), lm, process=(1, 2))
  assert "manifest.p00001.json" in os.listdir(tmp_path)
  with pytest.raises(ValueError, match=r"shard_00002.npy is not recorded as complete: process 2 "
                                       "of 3 stopped"):  # another process count, to boot
    harvest.harvest(c, str(tmp_path), lm, process=(0, 3))
  with pytest.raises(ValueError, match="lists no shards; rerun the harvest"):
    data.open_npy(str(tmp_path))  # not trained on with shards missing
  harvest.harvest(c, str(tmp_path), lm, process=(2, 3))
  harvest.harvest(c, str(tmp_path), lm, process=(1, 3))  # process 1 of 2 did most of its part
  harvest.harvest(c, str(tmp_path), lm, process=(0, 3))
  _assert_same_store(tmp_path, whole)


def _dies_at(monkeypatch, fn_name, call):
  """Makes harvest.fn_name die (a simulated kill) at its `call`-th call; a dying _save_shard
  leaves half a temporary file behind, as a killed write does."""
  real = getattr(harvest, fn_name)
  count = {"n": 0}

  def dying(directory, *args):
    count["n"] += 1
    if count["n"] == call:
      if fn_name == "_save_shard":
        with open(os.path.join(directory, args[0] + ".tmp.npy"), "wb") as fh:
          fh.write(b"\x93NUMPY partial")
      raise KeyboardInterrupt(f"killed in {fn_name}")
    return real(directory, *args)

  monkeypatch.setattr(harvest, fn_name, dying)
  return real


@pytest.mark.parametrize("fn_name", ["_save_shard", "_write_part", "_write_manifest"])
def test_a_kill_at_any_write_resumes_to_the_same_store(tmp_path, lm, whole, monkeypatch,
                                                       fn_name):
  c = config()
  writes = len(json.load(open(whole / "manifest.json"))["shards"])
  for call in range(1, (writes if fn_name != "_write_manifest" else 2) + 1):  # 2: the commit
    store = tmp_path / str(call)
    real = _dies_at(monkeypatch, fn_name, call)
    with pytest.raises(KeyboardInterrupt):
      harvest.harvest(c, str(store), lm)
    monkeypatch.setattr(harvest, fn_name, real)
    harvest.harvest(c, str(store), lm)
    _assert_same_store(store, whole)


def test_a_killed_process_of_two_resumes_to_the_same_store(tmp_path, lm, whole, monkeypatch):
  c = config()
  real = _dies_at(monkeypatch, "_write_part", 2)  # process 1's second shard is not recorded
  with pytest.raises(KeyboardInterrupt):
    harvest.harvest(c, str(tmp_path), lm, process=(1, 2))
  monkeypatch.setattr(harvest, "_write_part", real)
  with pytest.raises(ValueError, match="shard_00003.npy is not recorded as complete"):
    harvest.harvest(c, str(tmp_path), lm, process=(0, 2))  # process 0 finishes, cannot commit
  harvest.harvest(c, str(tmp_path), lm, process=(1, 2))  # the rerun
  harvest.harvest(c, str(tmp_path), lm, process=(0, 2))
  _assert_same_store(tmp_path, whole)


@pytest.mark.parametrize("damage", ["truncate", "delete", "resize"])
def test_damaged_shard_is_named_and_repaired_by_rerun(tmp_path, lm, whole, caplog, damage):
  c = config()
  harvest.harvest(c, str(tmp_path), lm)
  shard = tmp_path / "shard_00002.npy"
  if damage == "truncate":
    shard.write_bytes(shard.read_bytes()[:300])
  elif damage == "delete":
    shard.unlink()
  else:
    np.save(shard, np.zeros((5, 16), np.float32))
  with pytest.raises(ValueError, match="shard_00002.npy"):
    data.open_npy(str(tmp_path))
  harvest.harvest(c, str(tmp_path), lm)
  assert "shard_00002.npy" in caplog.text
  _assert_same_store(tmp_path, whole)


def test_partial_store_with_a_damaged_shard_is_repaired(tmp_path, lm, whole, monkeypatch):
  c = config()
  real = _dies_at(monkeypatch, "_save_shard", 5)
  with pytest.raises(KeyboardInterrupt):
    harvest.harvest(c, str(tmp_path), lm)
  monkeypatch.setattr(harvest, "_save_shard", real)
  (tmp_path / "shard_00001.npy").write_bytes(b"")
  harvest.harvest(c, str(tmp_path), lm)
  _assert_same_store(tmp_path, whole)


def test_more_or_fewer_tokens_on_a_finished_store(tmp_path, lm):
  for tokens in (700, 1000, 300):  # each time equal to a store harvested afresh with that many
    harvest.harvest(config(**{"harvest.num_tokens": tokens}), str(tmp_path / "grown"), lm)
    harvest.harvest(config(**{"harvest.num_tokens": tokens}), str(tmp_path / str(tokens)), lm)
    _assert_same_store(tmp_path / "grown", tmp_path / str(tokens))
  assert json.load(open(tmp_path / "grown" / "manifest.json"))["tokens"] == 300


def test_text_that_runs_out_ends_the_store(tmp_path, lm, caplog):
  (tmp_path / "doc.txt").write_text(" ".join(["the value of a module is"] * 50))  # 20 contexts
  c = config(**{"text.source": "files", "text.path": str(tmp_path / "doc.txt"),
                "harvest.num_tokens": 10_000})
  manifest = harvest.harvest(c, str(tmp_path / "one"), lm)
  assert "ran out after" in caplog.text and manifest["complete"]
  assert manifest["tokens"] == 20 * 15 and manifest["next_context"] == 20  # its EOS is cut off
  assert [s["contexts"] for s in manifest["shards"]] == [[0, 8], [8, 16], [16, 20]]
  harvest.harvest(c, str(tmp_path / "two"), lm, process=(1, 2))
  harvest.harvest(c, str(tmp_path / "two"), lm, process=(0, 2))
  _assert_same_store(tmp_path / "two", tmp_path / "one")


def test_manifest_that_disagrees_with_a_shard_is_named(tmp_path, lm):
  harvest.harvest(config(), str(tmp_path), lm)
  manifest = json.load(open(tmp_path / "manifest.json"))
  held = manifest["shards"][1]["rows"]
  manifest["shards"][1]["rows"] = 999
  json.dump(manifest, open(tmp_path / "manifest.json", "w"))
  with pytest.raises(ValueError, match=f"shard_00001.npy holds {held} rows but its manifest.json "
                                       "says 999"):
    data.open_npy(str(tmp_path))


def test_bfloat16_store(tmp_path, lm, whole):
  harvest.harvest(config(**{"harvest.dtype": "bfloat16"}), str(tmp_path), lm)
  s = data.open_npy(str(tmp_path))
  assert s.arrays[0].dtype == ml_dtypes.bfloat16
  assert os.path.getsize(tmp_path / "shard_00000.npy") < \
      0.6 * os.path.getsize(whole / "shard_00000.npy")
  np.testing.assert_array_equal(_read_store(tmp_path),
                                _read_store(whole).astype(ml_dtypes.bfloat16).astype(np.float32))


def test_store_in_a_bucket_equals_the_local_store(lm, whole):
  url = "memory://jumprelu-test/store"
  try:
    harvest.harvest(config(), url, lm, process=(1, 2))
    harvest.harvest(config(), url, lm, process=(0, 2))
    _assert_same_store(url, whole)
  finally:
    fsspec.filesystem("memory").rm("/jumprelu-test", recursive=True)


def test_dry_run_size_is_the_stores_size(whole):
  c = config()
  report = harvest.size_report(c)
  assert report.startswith("activation store: 700 rows × 16 × float32 = 43.8 KiB on disk, in at "
                           "least 6 shards of 8 contexts (≤ 120 rows, ≤ 7.5 KiB each")
  data_bytes = sum(np.load(whole / f, mmap_mode="r").nbytes for f in os.listdir(whole)
                   if f.endswith(".npy"))
  assert data_bytes == 700 * 16 * 4 == round(43.75 * 1024)
  assert len(os.listdir(whole)) - 1 >= 6


def test_harvest_py_dry_run_prints_the_size_and_computes_nothing(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, os.path.join(repo, "experiments", "harvest.py"),
                        f"--config={repo}/configs/tiny.py:harvest", "--dry_run"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout == harvest.size_report(config()) + "\n" and os.listdir(tmp_path) == []


def test_store_of_an_earlier_harvest_py(tmp_path, lm, whole):
  manifest = json.load(open(whole / "manifest.json"))
  old = {k: manifest[k] for k in ("spec", "tokens", "complete")}
  old["shards"] = [{"file": s["file"], "rows": s["rows"]} for s in manifest["shards"]]
  for s in old["shards"]:
    (tmp_path / s["file"]).write_bytes((whole / s["file"]).read_bytes())
  json.dump(old, open(tmp_path / "manifest.json", "w"))
  assert harvest.harvest(config(), str(tmp_path), lm) == old  # finished: trained on as it is
  json.dump({**old, "complete": False, "tokens": 100}, open(tmp_path / "manifest.json", "w"))
  with pytest.raises(ValueError, match="partial store of an earlier harvest.py"):
    harvest.harvest(config(), str(tmp_path), lm)


@pytest.mark.parametrize("overrides,message", [
    ({"lm.site": "resid_post.0"}, "site: store has 'resid_post.1', config wants 'resid_post.0'"),
    ({"harvest.dtype": "bfloat16"}, "dtype: store has 'float32', config wants 'bfloat16'"),
    ({"lm.context_len": 32}, "context_len: store has 16, config wants 32"),
    ({"lm.skip_positions": 1}, "skip_positions: store has 0, config wants 1"),
    ({"harvest.shard_tokens": 480}, "cut in chunks of 8 contexts, the config in chunks of 32"),
])
def test_mismatched_store_is_refused(tmp_path, lm, overrides, message):
  harvest.harvest(config(), str(tmp_path / "activations"), lm)
  with pytest.raises(ValueError, match=message):
    harvest.harvest(config(**overrides), str(tmp_path / "activations"), lm)
  if "lm.site" in overrides or "harvest.dtype" in overrides:  # training refuses it too
    with pytest.raises(ValueError, match=message):
      run.make_source(config(**overrides), str(tmp_path))


def test_part_of_another_config_is_refused(tmp_path, lm):
  harvest.harvest(config(), str(tmp_path), lm, process=(1, 2))
  with pytest.raises(ValueError, match=r"manifest.p00001.json does not match the config \(dtype"):
    harvest.harvest(config(**{"harvest.dtype": "bfloat16"}), str(tmp_path), lm, process=(0, 2))


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


def test_batches_needed_stops_at_the_batch_holding_the_last_row():
  kept_C = np.array([3, 0, 4, 5, 2, 2, 1, 6])  # rows per context; batches of 4 contexts
  assert harvest.batches_needed(kept_C, 1, 4) == 1
  assert harvest.batches_needed(kept_C, 12, 4) == 1  # ends in context 3, batch 0
  assert harvest.batches_needed(kept_C, 13, 4) == 2
  assert harvest.batches_needed(kept_C, int(kept_C.sum()), 4) == 2
  assert harvest.batches_needed(kept_C, 7, 2) == 2


def _counting_forwards(monkeypatch):
  """Counts the lockstep LM forwards of each harvesting process (by its index)."""
  counts, current = {}, [None]
  real_round, real_rows = harvest._Harvester._round, harvest._local_rows

  def round_(self, todo):
    current[0] = self.p
    return real_round(self, todo)

  def rows(acts):
    counts[current[0]] = counts.get(current[0], 0) + 1
    return real_rows(acts)

  monkeypatch.setattr(harvest._Harvester, "_round", round_)
  monkeypatch.setattr(harvest, "_local_rows", rows)
  return counts


@pytest.mark.parametrize("processes", [1, 3])
def test_lockstep_harvest_writes_the_one_process_store(tmp_path, lm, whole, monkeypatch,
                                                       processes):
  """harvest.mesh=global, its processes played in turn in one: every process runs the same
  forwards (stand-ins where its chunk is done or past the end), and the store is the local one."""
  c = config(**{"harvest.mesh": "global"})
  counts = _counting_forwards(monkeypatch)
  for p in reversed(range(processes)):
    harvest.harvest(c, str(tmp_path), lm, process=(p, processes))
  _assert_same_store(tmp_path, whole)
  shards = json.load(open(whole / "manifest.json"))["shards"]
  batches = harvest.chunk_contexts(c) // c.lm.batch_contexts
  rounds = -(-len(shards) // processes)  # the last round stops at the store's last row
  assert len(set(counts.values())) == 1 and len(counts) == processes
  assert (rounds - 1) * batches < counts[0] <= rounds * batches

  # A deleted shard: the rerun harvests only its round; the other rounds are skipped by all.
  # (Process 0, which owns it and commits, runs last: in a job all see the store as at the start.)
  counts.clear()
  for p in reversed(range(processes)):  # process 0 rewrites it, and commits, last
    if (tmp_path / "shard_00000.npy").exists():
      os.remove(tmp_path / "shard_00000.npy")
    harvest.harvest(c, str(tmp_path), lm, process=(p, processes))
  _assert_same_store(tmp_path, whole)
  assert counts == {p: batches for p in range(processes)}


def test_lockstep_harvest_resumes_after_a_kill(tmp_path, lm, whole, monkeypatch):
  c = config(**{"harvest.mesh": "global"})
  real = _dies_at(monkeypatch, "_write_part", 2)
  with pytest.raises(KeyboardInterrupt):
    harvest.harvest(c, str(tmp_path), lm)
  monkeypatch.setattr(harvest, "_write_part", real)
  harvest.harvest(c, str(tmp_path), lm)
  _assert_same_store(tmp_path, whole)


def test_harvest_mesh_is_checked():
  from jumprelu import validate
  with pytest.raises(ValueError, match="harvest.mesh"):
    validate.check_config(config(**{"harvest.mesh": "pod"}))
  assert harvest.mesh_mode(config()) == "local"  # auto, one CPU process
