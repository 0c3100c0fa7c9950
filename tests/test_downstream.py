"""Downstream evaluations (SAEBench's definitions): probe math, absorption and probing metrics
against values worked out by hand on tiny constructed cases, and a run on the tiny LM."""
import json
import math

import numpy as np
import pytest

from jumprelu import absorption, downstream, feature_acts, files, probes, sparse_probing
from tests.conftest import tiny
from tests.test_browse import planted_sae
from tests.tiny_lm import tiny_lm


# ----------------------------------------------------------------------------- probes

def test_logistic_regression_solves_its_first_order_condition():
  # x = ±1, y = 0/1, C = 1: by symmetry b = 0 and Σ loss + w²/2 is stationary where
  # w = 2σ(−w); solved here by bisection.
  lo, hi = 0.0, 2.0
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if mid < 2 / (1 + math.exp(mid)) else (lo, mid)
  w, b = probes.fit_logistic(np.array([[-1.0], [1.0]]), np.array([False, True]))
  assert w[0] == pytest.approx(lo, abs=1e-8) and b == pytest.approx(0.0, abs=1e-10)


def test_mean_difference_selection_and_f1_by_hand():
  X = np.array([[1, 0, 5], [3, 0, 5], [0, 2, 5], [0, 4, 5]], float)
  y = np.array([True, True, False, False])  # means: positives (2, 0, 5), negatives (0, 3, 5)
  assert probes.mean_diff_top_k(X, y, 2).tolist() == [1, 0]
  assert probes.f1([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5  # precision ½, recall ½
  assert probes.f1([0, 0], [1, 0]) == 0.0
  r = probes.k_sparse_probe(X, y, X, y, 1)
  assert r["features"] == [1] and r["accuracy"] == 1.0


def test_balanced_split_has_equal_classes():
  y = np.array([True] * 10 + [False] * 90)
  train, test = probes.balanced_split(y, np.random.default_rng(0))
  assert y[train].sum() == 8 and (~y[train]).sum() == 8
  assert y[test].sum() == 2 and (~y[test]).sum() == 2
  assert not set(train) & set(test)


# ----------------------------------------------------------------------------- absorption

@pytest.mark.parametrize("f, cos, main, want", [
    # the main feature carries all of x·u = 1: no absorption
    ([1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.5, 0.5], [0], (0.0, False)),
    # main silent, feature 2 carries 1.6 × 0.5 = 0.8 ≥ 40%: full absorption
    ([0.0, 0.0, 1.6, 0.0], [1.0, 0.0, 0.5, 0.5], [0], (1.0, True)),
    # main carries 0.3; feature 2 carries 2 × 0.2 = 0.4 (feature 3's cos 0.05 < 0.1 does not
    # count): fraction 0.4 / (0.4 + 0.3); the main feature fires, so not full
    ([0.3, 0.0, 2.0, 1.0], [1.0, 0.0, 0.2, 0.05], [0], (0.4 / 0.7, False)),
    # main silent, the others carry 0.3 < 40%: nothing
    ([0.0, 0.0, 0.6, 0.0], [1.0, 0.0, 0.5, 0.5], [0], (0.0, False)),
    # main silent, four features of 0.15 each: the top 3 carry 0.45 (fraction 1), but no
    # single one carries 40% (not full)
    ([0.0, 0.3, 0.3, 0.3, 0.3], [1.0, 0.5, 0.5, 0.5, 0.5], [0], (1.0, False)),
])
def test_word_absorption_by_hand(f, cos, main, want):
  fraction, full = absorption.word_absorption(1.0, f, cos, main)
  assert fraction == pytest.approx(want[0]) and full == want[1]


def test_absorption_scores_by_hand():
  # D = 2; letter a's probe is e₀, feature 0 = e₀ (its main feature), feature 1 has cos 0.6.
  W = np.zeros((26, 2))
  W[0] = [1.0, 0.0]
  W[1] = [0.0, 1.0]
  b = np.zeros(26)
  b[1] = -10.0  # letter b's probe never fires: no true positives, not scored
  W_dec = np.array([[1.0, 0.0], [0.6, 0.8]])
  x = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
  f = np.array([[1.0, 0.0], [0.0, 1.5], [0.0, 0.0], [0.0, 1.0]])
  letter = np.array([0, 0, 0, 1])
  r = absorption.absorption_scores(x, f, letter, W, b, W_dec, {0: [0], 1: [1]})
  # word 0: main carries 1.0 → 0; word 1: main silent, feature 1 carries 0.9 → 1, full;
  # word 2: the probe says "not a" → not a true positive
  assert list(r["letters"]) == ["a"]
  assert r["letters"]["a"] == {"absorption_fraction": 0.5, "full_absorption_rate": 0.5,
                               "probe_true_positives": 2, "split_features": 1}
  assert r["mean_absorption_fraction"] == 0.5 and r["mean_full_absorption_rate"] == 0.5


def test_main_features_stop_when_f1_stops_rising():
  rng = np.random.default_rng(0)
  letter = np.repeat(np.arange(26), 8)
  f = rng.random((len(letter), 30)) * 0.01
  f[np.arange(len(letter)), letter] += 1.0  # feature j fires on letter j alone
  main = absorption.main_features(f, letter, f, letter, max_k=4)
  assert all(main[j] == [j] for j in range(26))  # k = 1 is perfect; k = 2 adds nothing


def test_alpha_words():
  vocab = ["cat", " Dog", "x1", " ", "", "é", " the", "a-b"]
  assert absorption.alpha_words(vocab) == [(0, "cat"), (1, " Dog"), (6, " the")]


# ----------------------------------------------------------------------------- sparse probing

def test_token_labels_by_hand():
  pieces = ["<s>", "Use", " f", "(", "x", ")", "\n", ">>>", " 1", "+", "2"]
  labels = sparse_probing.token_labels([pieces])
  on = lambda name: np.flatnonzero(labels[name][0]).tolist()
  assert on("next_is_digit") == [7, 9]
  assert on("in_doctest") == [7, 8, 9, 10]
  assert on("in_parens") == [4, 5]


def test_family_docstrings_are_from_the_family():
  docs = sparse_probing.family_docstrings("json")
  assert len(docs) >= 5 and len(set(docs)) == len(docs)
  assert all(len(d) >= 50 for d in docs)


def test_downstream_runs_on_the_tiny_lm(monkeypatch):
  lm = tiny_lm()
  c = tiny("harvest", **{"lm.skip_positions": 1})
  monkeypatch.setattr(sparse_probing, "FAMILIES", ("json", "email"))
  sae = feature_acts.load_sae(planted_sae())
  a = absorption.evaluate(c, lm, sae, words_per_letter=6, min_probe_f1=0.0)
  assert a["words"] > 26 and a["letters_scored"] >= 1
  assert 0.0 <= a["mean_absorption_fraction"] <= 1.0
  contexts = feature_acts.held_out(c, lm[1], lm[2], 100, 40)
  p = sparse_probing.evaluate(c, lm, sae, contexts, docs_per_family=12)
  for task in ("module_family", "mean"):
    assert set(p[task]) == {"dense", "k=1", "k=2", "k=5", "k=20"}
    assert all(0.0 <= v <= 1.0 for v in p[task].values())
  flat = downstream.scalars({"absorption": a, "sparse_probing": p})
  assert "absorption_fraction" in flat and "sparse_probing_mean_k20" in flat
  assert "k=1" in downstream.table(p) and "module_family" in downstream.table(p)


def test_add_to_eval_json_keeps_what_is_there(tmp_path, monkeypatch):
  lm = tiny_lm()
  c = tiny("harvest")
  monkeypatch.setattr(sparse_probing, "FAMILIES", ("json", "email"))
  (tmp_path / "eval.json").write_text('{"l0": 3.5}')
  flat = downstream.add_to_eval_json(c, str(tmp_path), _planted_path(tmp_path),
                                     tasks=("sparse_probing",), num_contexts=24,
                                     skip_contexts=100, docs_per_family=6, lm=lm)
  record = json.loads((tmp_path / "eval.json").read_text())
  assert record["l0"] == 3.5 and "sparse_probing" in record["downstream"]
  assert record["sparse_probing_mean_k1"] == flat["sparse_probing_mean_k1"]
  assert "absorption_fraction" not in record
  with pytest.raises(ValueError, match="unknown downstream evaluations"):
    downstream.evaluate(c, str(tmp_path), _planted_path(tmp_path), tasks=("probing",), lm=lm)


def _planted_path(tmp_path) -> str:
  path = str(tmp_path / "params.npz")
  files.save_npz(path, planted_sae())
  return path
