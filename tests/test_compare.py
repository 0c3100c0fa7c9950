"""scripts/compare.py (the reproduction's seeded tables) and scripts/corpus.py, on made-up runs."""
import json
import math
import os

import numpy as np
import pytest

from scripts import compare, corpus

CONTEXTS = 64


def _sae(path, l0, delta_C, fvu=0.2, arch="jumprelu"):
  """An eval.json scoring CONTEXTS contexts of 100 tokens with per-context losses delta_C."""
  os.makedirs(path, exist_ok=True)
  ntok = [100] * CONTEXTS
  with open(os.path.join(path, "eval.json"), "w") as fh:
    json.dump({"site": "resid_post.14", "arch": arch, "l0": l0, "fvu": fvu,
               "delta_lm_loss": float(np.sum(delta_C) / np.sum(ntok)), "ce_clean": 3.0,
               "ce_zero_ablation": 12.0, "frac_features_dead_on_eval": 0.1,
               "frac_features_over_10pct": 0.02, "context_tokens": ntok,
               "context_delta_lm_loss": list(map(float, delta_C))}, fh)


def _runs(tmp_path, gap=0.05, seeds=3, topk_l0=(16.0, 32.0)):
  """JumpReLU with per-token loss linear in ln L0 (so interpolation is exact) + seed noise at L0
  10..100; TopK at topk_l0 on JumpReLU's curve minus `gap` nats per token, with per-context
  and per-seed noise."""
  rng = np.random.default_rng(0)
  base_C = rng.normal(0, 5.0, CONTEXTS)  # context difficulty: shared by every SAE
  loss = lambda l0: 1.0 - 0.2 * math.log(l0)
  for s in range(seeds):
    seed_shift = rng.normal(0, 0.002)
    for l0 in (10.0, 30.0, 100.0):
      _sae(tmp_path / f"jumprelu_s{s}" / "members" / f"lam={l0:g}", l0,
           100 * (loss(l0) + seed_shift) + base_C)
    for l0 in topk_l0:
      _sae(tmp_path / f"topk_s{s}" / "members" / f"k={l0:g}", l0,
           100 * (loss(l0) + seed_shift - gap) + base_C + rng.normal(0, 1.0, CONTEXTS),
           arch="topk")
  return compare.load(str(tmp_path))


def test_jumprelu_is_interpolated_in_log_l0_per_seed(tmp_path):
  records = _runs(tmp_path)
  curve = [r for r in records if r["run"] == "jumprelu" and r["seed"] == 0]
  ctx, fvu = compare.jumprelu_at(curve, math.sqrt(10 * 30))  # halfway in log L0
  lo, hi = (next(r for r in curve if r["l0"] == v) for v in (10.0, 30.0))
  np.testing.assert_allclose(ctx, 0.5 * (lo["ctx"] + hi["ctx"]))
  assert compare.jumprelu_at(curve, 9.0) is None and compare.jumprelu_at(curve, 101.0) is None
  # Two members of equal L0 bracket nothing; the next pair does (no division by zero).
  rows = [{"l0": 4.0, "v": 1.0}, {"l0": 4.0, "v": 2.0}, {"l0": 8.0, "v": 3.0}]
  assert compare.at_l0(rows, 4.0, ("v",))["v"] in (1.0, 2.0)
  assert compare.at_l0(rows, math.sqrt(32.0), ("v",))["v"] == pytest.approx(2.5)


def test_a_real_gap_is_found_inside_its_interval_and_a_tie_is_called_a_tie(tmp_path):
  rows, _ = compare.equal_l0(_runs(tmp_path / "gap", gap=0.05))
  for r in rows:  # JumpReLU is 0.05 nats/token worse than TopK
    assert abs(r["mean"] - 0.05) < r["half"] < 0.05, r
    assert compare.verdict(r["mean"], r["half"]) == "JumpReLU worse"
  tie, _ = compare.equal_l0(_runs(tmp_path / "tie", gap=0.0))
  assert all(compare.verdict(r["mean"], r["half"]) == "tie (within the interval)" for r in tie)
  assert "| topk | k=16 | 16.0 | 3 |" in compare.equal_l0_table(rows)


def test_points_outside_the_curve_and_other_contexts_are_named(tmp_path):
  rows, _ = compare.equal_l0(_runs(tmp_path / "a", topk_l0=(8.0, 32.0)))
  assert rows[0]["outside"] and not rows[1].get("outside")
  assert "outside JumpReLU's L0 range" in compare.equal_l0_table(rows)
  _runs(tmp_path / "b", seeds=1)
  with open(tmp_path / "b" / "topk_s0" / "members" / "k=16" / "eval.json") as fh:
    r = json.load(fh)
  r["context_tokens"] = r["context_tokens"][:-1]
  r["context_delta_lm_loss"] = r["context_delta_lm_loss"][:-1]
  with open(tmp_path / "b" / "topk_s0" / "members" / "k=16" / "eval.json", "w") as fh:
    json.dump(r, fh)
  with pytest.raises(SystemExit, match="scored on different held-out contexts"):
    compare.load(str(tmp_path / "b"))


def test_variants_are_paired_with_the_same_seed_and_the_report_is_written(tmp_path):
  _runs(tmp_path)
  for s in range(2):  # a variant 0.1 nats/token better than JumpReLU at L0 20
    curve = [r for r in compare.load(str(tmp_path)) if r["run"] == "jumprelu" and r["seed"] == s]
    ref = compare.jumprelu_at(curve, 20.0)[0]
    _sae(tmp_path / f"no_clip_s{s}", 20.0, ref - 10.0)
  out = tmp_path / "results.md"
  compare.main(["--runs", str(tmp_path), "--out", str(out)])
  text = out.read_text()
  row = next(line for line in text.splitlines() if line.startswith("| no_clip |"))
  assert "| 2 | 20.0 ± 0.0 |" in row and "-0.1000 ± 0.0000" in row and "variant better" in row


def test_corpus_cuts_files_into_documents_at_blank_lines(tmp_path):
  (tmp_path / "lib").mkdir()
  (tmp_path / "lib" / "a.rst.txt").write_text("one\n\ntwo two\n\nthree three three")
  (tmp_path / "b.rst.txt").write_text("four")
  assert corpus.documents(str(tmp_path), doc_chars=7) == [
      "four", "one\n\ntwo two", "three three three"]
  with pytest.raises(SystemExit, match="apt-get install python3.11-doc"):
    corpus.documents(str(tmp_path / "nothing"), 100)


def test_firings_split_an_saes_l0_by_where_it_goes():
  """scripts/ablate.firings on a hand-made case: 2 true features, 3 latents (the third between
  them, aligned with neither), 4 rows."""
  from scripts import ablate
  true_GxD = np.eye(2, dtype=np.float32)
  W_dec_FxD = np.asarray([[1, 0], [0, 2], [1, 1]], np.float32)
  active_NxG = np.asarray([[1, 0], [0, 1], [0, 0], [1, 0]], bool)
  fires_NxF = np.asarray([[1, 0, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0]], bool)
  got = ablate.firings(fires_NxF, W_dec_FxD, true_GxD, active_NxG)
  # 4 firings: latent 0 in row 0 and latent 1 in row 1 are owned; latent 0 in row 1 fires with
  # its feature off; latent 2 is unaligned. Of the 3 true activations, 2 see their latent fire.
  assert got == {"owned": 0.5, "spurious": 0.25, "unaligned": 0.25, "recall": pytest.approx(2 / 3),
                 "cos_rare": 1.0, "cos_frequent": 1.0, "dead": 0.0}
  got = ablate.firings(fires_NxF * [1, 1, 0], W_dec_FxD * [[1], [1], [1]], true_GxD,
                       active_NxG * [1, 0])  # latent 2 silenced; feature 1 never active
  assert got["dead"] == pytest.approx(1 / 3)
