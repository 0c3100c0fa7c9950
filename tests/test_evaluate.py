"""Evaluation with the SAE spliced in, on a tiny LM with SAEs whose answers are known."""
import numpy as np
import pytest

from jumprelu import evaluate, spliced
from jumprelu.lm import activations as lm_act
from jumprelu.lm import model
from tests.conftest import tiny
from tests.tiny_lm import tiny_lm


@pytest.fixture(scope="module")
def setup():
  lm = tiny_lm()
  c = tiny("harvest", **{"lm.site": "resid_post.0", "eval.num_contexts": 10,
                         "eval.skip_contexts": 40})
  return c, lm, evaluate.held_out_contexts(c, lm[1], lm[2])


def _perfect_sae(d):
  """f = [relu(x), relu(−x)], x̂ = f·[I; −I] = x: reconstructs exactly."""
  eye = np.eye(d, dtype=np.float32)
  return {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d, np.float32),
          "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(d, np.float32),
          "threshold": np.full(2 * d, 1e-9, np.float32)}


def test_perfect_sae_recovers_all_the_loss(setup):
  c, lm, contexts = setup
  r = spliced.evaluate_lm(c, lm, _perfect_sae(16), contexts)
  assert r["tokens"] > 100
  assert abs(r["delta_lm_loss"]) < 1e-4 and abs(r["kl_clean_sae"]) < 1e-5
  assert r["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
  assert r["fvu"] < 1e-8 and r["shrinkage_gamma"] == pytest.approx(1.0, abs=1e-6)
  assert r["ce_zero_ablation"] > r["ce_clean"]  # ablating the residual stream hurts
  assert 8 <= r["l0"] <= 16  # each coordinate is either positive or negative


def test_zero_sae_is_zero_ablation(setup):
  c, lm, contexts = setup
  zero = {k: np.zeros_like(v) for k, v in _perfect_sae(16).items()}
  zero["threshold"] += 1.0
  r = spliced.evaluate_lm(c, lm, zero, contexts)
  assert r["ce_sae"] == pytest.approx(r["ce_zero_ablation"], rel=1e-6)
  assert r["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
  assert r["l0"] == 0 and r["frac_features_dead_on_eval"] == 1.0
  assert r["fvu"] >= 1.0  # x̂ = 0: Σ‖x‖² over Σ‖x − mean‖²


def test_summary_arithmetic():
  t = {"ce_tokens": 4.0, "ce_clean": 8.0, "ce_sae": 10.0, "ce_zero": 16.0, "kl": 2.0,
       "act_tokens": 2.0, "l0": 6.0, "sq_err": 1.0, "sq_x": 10.0,
       "sum_x": np.array([2.0, 0.0]), "xhat_xhat": 4.0, "xhat_x": 5.0,
       "fires": np.array([2.0, 1.0, 0.0, 0.0])}
  r = spliced.summarize(t)
  assert r["ce_clean"] == 2.0 and r["ce_sae"] == 2.5 and r["ce_zero_ablation"] == 4.0
  assert r["delta_lm_loss"] == 0.5 and r["loss_recovered"] == 0.75 and r["kl_clean_sae"] == 0.5
  assert r["l0"] == 3.0 and r["fvu"] == 1.0 / (10.0 - 2.0 * 1.0) and r["shrinkage_gamma"] == 0.8
  assert r["frac_features_over_10pct"] == 0.5 and r["frac_features_dead_on_eval"] == 0.5


def test_eval_contexts_must_be_held_out(setup):
  c, lm, _ = setup
  with pytest.raises(ValueError, match="eval.skip_contexts=40 overlaps the 50 contexts"):
    evaluate.held_out_contexts(c, lm[1], lm[2], harvested_contexts=50)


def test_too_short_text_is_named_with_its_true_length(setup):
  c, lm, _ = setup
  c = c.copy_and_resolve_references()
  c.eval.skip_contexts = 20000  # past the end of the text: it has 12,200 contexts of 16 tokens
  with pytest.raises(ValueError, match=r"^text.source 'stdlib' yields 12200 contexts of 16 "
                     r"tokens, but eval needs contexts 20000..20009 \(eval.skip_contexts=20000, "
                     r"eval.num_contexts=10\); lower eval.skip_contexts to at most 12190$"):
    evaluate.held_out_contexts(c, lm[1], lm[2])


def _perfect(arch, d=16):
  """_perfect_sae in each architecture's raw-unit layout (arch.raw_params)."""
  p = _perfect_sae(d)
  if arch == "jumprelu":
    return p
  base = {k: p[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
  if arch == "relu":
    return {**base, "architecture": np.asarray("relu")}
  if arch == "topk":  # exactly one of each ±x_i pair is positive: the top d are all of them
    return {**base, "architecture": np.asarray("topk"), "k": np.asarray(d, np.int32)}
  zeros = np.zeros(2 * d, np.float32)  # gate = magnitude = ReLU(x·[I, −I])
  return {"W_gate": p["W_enc"], "b_gate": zeros, "r_mag": zeros, "b_mag": zeros,
          "W_dec": p["W_dec"], "b_dec": p["b_dec"], "architecture": np.asarray("gated")}


def test_every_architecture_evaluates_and_shared_clean_runs_change_nothing(setup):
  c, lm, contexts = setup
  archs = ("jumprelu", "relu", "gated", "topk")
  lossy = _perfect("topk")
  lossy["k"] = np.asarray(4, np.int32)  # keeps 4 of the 16 active latents: a real loss
  together = spliced.evaluate_many(c, lm, [_perfect(a) for a in archs] + [lossy], contexts)
  for a, r in zip(archs, together):
    assert r["arch"] == a
    assert abs(r["delta_lm_loss"]) < 1e-4 and r["fvu"] < 1e-8, a
    assert 8 <= r["l0"] <= 16
  alone = spliced.evaluate_lm(c, lm, lossy, contexts)
  assert together[-1]["l0"] == alone["l0"] == 4.0 and together[-1]["k"] == 4
  assert together[-1]["delta_lm_loss"] > 0.01
  for key in ("ce_sae", "kl_clean_sae", "fvu", "delta_lm_loss"):
    assert together[-1][key] == pytest.approx(alone[key], rel=1e-6), key
  # Per held-out context, in order (intervals over contexts): they add up to the totals, and
  # context i's entry is what scoring context i alone gives.
  tokens, delta = np.asarray(alone["context_tokens"]), np.asarray(alone["context_delta_lm_loss"])
  assert len(tokens) == len(contexts) and tokens.min() > 0
  assert delta.sum() / tokens.sum() == pytest.approx(alone["delta_lm_loss"], rel=1e-4)  # f32 sums
  third = spliced.evaluate_lm(c, lm, lossy, contexts[2:3])
  assert third["context_tokens"] == [tokens[2]]
  assert third["context_delta_lm_loss"][0] == pytest.approx(delta[2], rel=1e-5, abs=1e-6)


def test_jumprelu_threshold_distribution_and_ste_window(setup):
  c, lm, contexts = setup
  p = _perfect_sae(16)
  p["threshold"] = np.linspace(0.05, 0.5, 32, dtype=np.float32)
  half_window = 0.04
  r = spliced.evaluate_lm(c, lm, p, contexts, half_window=half_window)
  assert r["threshold_quantiles"]["50"] == pytest.approx(np.median(p["threshold"]), rel=1e-6)
  assert r["threshold_quantiles"]["0"] == pytest.approx(0.05) and r["threshold_mean"] == (
      pytest.approx(0.275))
  # The same fraction from the site's activations, computed here with numpy.
  forward = lm_act.site_fn(lm[1], model.parse_site(c.lm.site))
  x = np.concatenate(lm_act.context_rows(c, forward, lm[0], lm[1], list(contexts)))
  pre = np.maximum(x @ p["W_enc"] + p["b_enc"], 0)
  expected = np.mean(np.abs(pre - p["threshold"]) < half_window)
  assert len(x) == r["tokens"]
  assert r["frac_preacts_in_window"] == pytest.approx(expected, rel=1e-5)
  assert 0.001 < expected < 0.5  # the window holds some pre-activations, not all
  assert spliced.evaluate_lm(c, lm, p, contexts)["frac_preacts_in_window"] is None
