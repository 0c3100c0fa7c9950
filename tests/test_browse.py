"""Features on a prompt and the feature browser, on the tiny LM with a planted feature.

The tiny LM's embedding of "the" gets a large component along the first axis, so at the
site x·e₀ > 30 on every "the" and < 12 elsewhere: an SAE feature with encoder e₀ and θ = 20 fires on
"the" and nowhere else (checked below against the LM's own activations).
"""
import itertools
import json
import os
import re
import shutil
import subprocess

import jax
import numpy as np
import pytest

from jumprelu import browse, export, feature_acts, feature_examples, files
from jumprelu import workdir as workdir_lib
from jumprelu.lm import activations as lm_act
from jumprelu.lm import model
from tests.conftest import tiny
from tests.tiny_lm import tiny_lm

PLANTED, DEAD, F = 5, 2, 12
BEFORE, AFTER = 6, 3


@pytest.fixture(scope="module")
def planted_lm():
  params, cfg, tok, _ = tiny_lm()
  embed = np.array(params["embed_VxD"])
  embed[tok.token_to_id("the"), 0] += 40.0
  return {**params, "embed_VxD": embed}, cfg, tok, "tiny-planted"


def planted_sae(width: int = F, d: int = 16) -> dict:
  """Raw JumpReLU params: feature PLANTED reads x·e₀ (θ = 20), DEAD never fires, the others
  are random directions with thresholds that let them fire now and then."""
  rng = np.random.default_rng(0)
  W_enc = rng.normal(size=(d, width)).astype(np.float32)
  W_enc[:, PLANTED] = np.eye(d, dtype=np.float32)[0]
  theta = np.full(width, 6.0, np.float32)
  theta[PLANTED], theta[DEAD] = 20.0, 1e9
  return {"W_enc": W_enc, "b_enc": np.zeros(width, np.float32),
          "W_dec": rng.normal(size=(width, d)).astype(np.float32) / 4,
          "b_dec": np.zeros(d, np.float32), "threshold": theta}


def the_id(lm) -> int:
  return lm[2].token_to_id("the")


# ----------------------------------------------------------------------------- features_on

def test_planted_direction_separates_the(planted_lm):
  c = tiny("harvest")
  ctx = np.stack(list(itertools.islice(lm_act.contexts(c, planted_lm[1], planted_lm[2]), 60)))
  x = np.asarray(lm_act.site_fn(planted_lm[1], model.parse_site(c.lm.site))(planted_lm[0], ctx))
  keep = lm_act.keep_mask(planted_lm[1], ctx, 0)
  proj, is_the = x[keep][:, 0], ctx[keep] == the_id(planted_lm)
  assert is_the.sum() > 20 and proj[is_the].min() > 30 and proj[~is_the].max() < 12


@pytest.mark.parametrize("form", ["params.npz", "saelens-relu"])
def test_features_on_fires_on_the_planted_token(planted_lm, tmp_path, form):
  c = tiny("harvest", **{"lm.skip_positions": 1})
  raw = planted_sae()
  if form == "params.npz":
    path = str(tmp_path / "params.npz")
    files.save_npz(path, raw)
  else:  # a SAELens "standard" folder: ReLU(x·W_enc + b_enc) with b_enc = −θ fires alike
    relu = {**{k: raw[k] for k in ("W_enc", "W_dec", "b_dec")}, "b_enc": -raw["threshold"],
            "architecture": np.asarray("relu")}
    path = str(tmp_path / "saelens")
    export.save_saelens(path, relu, model_name="tiny", hook_name="blocks.1.hook_resid_post",
                        context_size=16, dataset_path="stdlib")
  rows = feature_acts.features_on(c, path, "the value of the list is the", lm=planted_lm)
  assert [r["token"] for r in rows] == ["<s>", "the", "value", "of", "the", "list", "is", "the"]
  assert [r["kept"] for r in rows] == [False, False] + [True] * 6  # BOS, lm.skip_positions=1
  assert rows[0]["features"] == [] and rows[1]["features"] == []
  fires = [PLANTED in r["features"] for r in rows]
  assert fires == [False, False, False, False, True, False, False, True]
  for r in rows:
    assert r["values"] == sorted(r["values"], reverse=True) and DEAD not in r["features"]
  text = feature_acts.describe(rows)
  assert "(skipped, as in training)" in text and f"{PLANTED}: " in text


def test_features_on_refuses_an_sae_of_another_width(planted_lm):
  bad = {k: v for k, v in planted_sae(d=16).items()}
  bad["W_enc"] = np.zeros((8, F), np.float32)
  with pytest.raises(ValueError, match="width 8.*lm.site='resid_post.1'.*width 16"):
    feature_acts.features_on(tiny("harvest"), bad, "the list", lm=planted_lm)


# ----------------------------------------------------------------------------- running top-k

def _random_features(rng, n_batches, B, L, width):
  f = rng.exponential(size=(n_batches, B, L, width)).astype(np.float32)
  f *= rng.random(f.shape) < 0.15  # sparse
  keep = rng.random((n_batches, B, L)) < 0.9
  keep[-1, -1] = False  # a padding context at the end
  return f * keep[..., None], keep


def test_running_top_k_equals_numpy_top_k():
  rng = np.random.default_rng(1)
  n_batches, B, L, width, K, S = 5, 4, 16, 10, 3, 400  # S above every count: all firings
  f, keep = _random_features(rng, n_batches, B, L, width)
  update = jax.jit(feature_examples.update, static_argnames=("before", "after"))
  state = feature_examples.init(width, K, S, BEFORE, AFTER)
  for i in range(n_batches):
    state = update(state, f[i], keep[i], np.int32(i * B), jax.random.key(i), before=BEFORE,
                   after=AFTER)
  s = feature_examples.to_numpy(state)
  f_NxLxF = f.reshape(n_batches * B, L, width)
  m_NxF, p_NxF = f_NxLxF.max(axis=1), f_NxLxF.argmax(axis=1)
  for j in range(width):
    order = np.argsort(-m_NxF[:, j])[:K]
    order = order[m_NxF[order, j] > 0]
    np.testing.assert_array_equal(s["top"]["ctx"][j, :len(order)], order)
    np.testing.assert_array_equal(s["top"]["pos"][j, :len(order)], p_NxF[order, j])
    np.testing.assert_allclose(s["top"]["val"][j, :len(order)], m_NxF[order, j])
    for slot, (n, p) in enumerate(zip(order, p_NxF[order, j])):  # the window around it
      want = [f_NxLxF[n, q, j] if 0 <= q < L else 0.0 for q in range(p - BEFORE, p + AFTER + 1)]
      np.testing.assert_allclose(s["top"]["win"][j, slot], want)
    fired = np.argwhere(f_NxLxF[:, :, j] > 0)  # every firing is in the sample, by value
    got = s["smp"]["ctx"][j] >= 0
    assert got.sum() == len(fired)
    assert set(zip(s["smp"]["ctx"][j, got], s["smp"]["pos"][j, got])) == set(map(tuple, fired))
    values = f_NxLxF[:, :, j][f_NxLxF[:, :, j] > 0]
    np.testing.assert_allclose(s["smp"]["val"][j, got], np.sort(values)[::-1])
  np.testing.assert_array_equal(s["fires_F"], (f > 0).sum(axis=(0, 1, 2)))
  np.testing.assert_allclose(s["sum_F"], f.sum(axis=(0, 1, 2)), rtol=1e-5)
  assert int(s["tokens"]) == keep.sum()
  nz = f[f > 0].reshape(-1)  # histogram: the nonzero activations binned on the log grid
  edges = feature_examples.HIST_EDGES
  assert s["hist_FxH"].sum() == len(nz)
  want = np.histogram(np.clip(f[..., 0][f[..., 0] > 0], edges[0], edges[-1] * 0.999), edges)[0]
  np.testing.assert_array_equal(s["hist_FxH"][0], want)


def test_samples_are_uniform_over_firing_tokens():
  """With fewer slots than firings, each firing is kept about equally often over seeds."""
  width, K, S = 1, 1, 4
  f = np.zeros((1, 2, 8, width), np.float32)
  f[0, :, :, 0] = np.arange(1, 17).reshape(2, 8)  # 16 firing tokens of distinct values
  keep = np.ones((1, 2, 8), bool)
  update = jax.jit(feature_examples.update, static_argnames=("before", "after"))
  counts = np.zeros(16)
  for seed in range(300):
    state = update(feature_examples.init(width, K, S, 1, 1), f[0], keep[0], np.int32(0),
                   jax.random.key(seed), before=1, after=1)
    vals = np.asarray(state["smp"]["val"][0])
    counts[vals.astype(int) - 1] += 1
  assert counts.sum() == 300 * S
  assert counts.min() > 0.5 * 300 * S / 16 and counts.max() < 1.5 * 300 * S / 16


# ----------------------------------------------------------------------------- the browser

def _chunk(path):
  text = open(path).read()
  m = re.fullmatch(r"BROWSER_CHUNK\((\d+), (.*)\);\n", text, re.S)
  return int(m.group(1)), json.loads(m.group(2))


@pytest.fixture(scope="module")
def site(planted_lm, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  c = tiny("harvest", **{"lm.skip_positions": 1})
  workdir_lib.save_config(c, workdir)
  files.save_npz(os.path.join(workdir, "export", "params.npz"), planted_sae())
  result = browse.build(c, workdir, num_contexts=24, skip_contexts=100, top_k=5, samples=6,
                        before=BEFORE, after=AFTER, lm=planted_lm, bar=False)
  records = {}
  for name in os.listdir(os.path.join(result["out_dir"], "data", "f")):
    n, feats = _chunk(os.path.join(result["out_dir"], "data", "f", name))
    records.update({n * 128 + i: r for i, r in enumerate(feats)})
  meta = open(os.path.join(result["out_dir"], "data", "meta.js")).read()
  meta = json.loads(meta[len("window.BROWSER = "):-2])
  return c, workdir, result, records, meta


def test_browser_writes_every_live_feature(site):
  c, workdir, result, records, meta = site
  assert result["out_dir"] == os.path.join(workdir, "browser")
  assert os.path.exists(os.path.join(workdir, "browser", "index.html"))
  assert sorted(records) == list(range(F)) and meta["n_features"] == F
  live = [f for f in range(F) if meta["features"]["density"][f] > 0]
  assert DEAD not in live and PLANTED in live and len(live) == result["live"] > 2
  assert all(records[f] is not None and records[f]["top"] for f in live)
  assert records[DEAD] is None and meta["features"]["max"][DEAD] == 0


def test_browser_page_of_the_planted_feature_shows_the(site, planted_lm):
  c, _, result, records, meta = site
  the = the_id(planted_lm)
  rec = records[PLANTED]
  assert meta["features"]["top_token"][PLANTED] == the
  assert all(ex["t"][ex["o"]] == the and ex["a"][ex["o"]] == max(ex["a"]) for ex in rec["top"])
  assert all(ex["t"][ex["o"]] == the for ex in rec["smp"])
  # density: the fraction of kept tokens that are "the", counted from the text itself
  ctx = feature_acts.held_out(c, planted_lm[1], planted_lm[2], 100, 24)
  keep = lm_act.keep_mask(planted_lm[1], ctx, c.lm.skip_positions)
  assert meta["features"]["density"][PLANTED] == pytest.approx((ctx[keep] == the).mean(), 1e-3)
  assert meta["meta"]["tokens"] == keep.sum() == result["tokens"]


def test_browser_top_examples_equal_brute_force(site, planted_lm):
  c, _, _, records, _ = site
  ctx = feature_acts.held_out(c, planted_lm[1], planted_lm[2], 100, 24)
  encode = feature_acts.encoder(planted_lm[1], model.parse_site(c.lm.site), c.lm.skip_positions,
                                "jumprelu", None)
  sae = feature_acts.load_sae(planted_sae())[2]
  f_NxLxF = np.asarray(encode(planted_lm[0], sae, ctx)[0])
  m_NxF, p_NxF = f_NxLxF.max(axis=1), f_NxLxF.argmax(axis=1)
  for f, rec in records.items():
    if rec is None:
      continue
    order = np.argsort(-m_NxF[:, f], kind="stable")[:5]
    order = order[m_NxF[order, f] > 0]
    assert [ex["c"] for ex in rec["top"]] == order.tolist()
    assert [ex["p"] for ex in rec["top"]] == p_NxF[order, f].tolist()
    np.testing.assert_allclose([ex["v"] for ex in rec["top"]], m_NxF[order, f], rtol=1e-3)


def test_browser_logit_lens_and_neighbours(site, planted_lm):
  _, _, _, records, _ = site
  W_dec = planted_sae()["W_dec"]
  params = planted_lm[0]
  logits = (W_dec * np.asarray(params["final_norm_D"])) @ np.asarray(params["embed_VxD"]).T
  rec = records[PLANTED]
  assert [t for t, _ in rec["up"]] == np.argsort(-logits[PLANTED])[:10].tolist()
  assert [t for t, _ in rec["down"]] == np.argsort(logits[PLANTED])[:10].tolist()
  unit = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
  cos = unit @ unit.T
  np.fill_diagonal(cos, -np.inf)
  assert [j for j, _ in rec["nbr"]] == np.argsort(-cos[PLANTED])[:8].tolist()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args, url):
  cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         *args, url]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: "
                    "apt-get install -y chromium); the headless-browser test needs it")
def test_browser_renders_in_headless_chromium(site, tmp_path):
  _, _, result, _, _ = site
  index = "file://" + os.path.join(result["out_dir"], "index.html")
  dom = _chromium("--dump-dom", url=index)
  assert '<table id="features">' in dom and dom.count('href="#f=') >= F  # every feature listed
  dom = _chromium("--dump-dom", url=f"{index}#f={PLANTED}")
  assert f"Feature {PLANTED}</h2>" in dom
  centers = re.findall(r'<span class="tok center hot"[^>]*>([^<]*)</span>', dom)
  assert centers and set(centers) == {" the"}  # the word-level tokenizer's words get a space
  assert dom.count('class="tok') > dom.count('class="tok center')  # context around each
  assert "<svg" in dom and "Logit lens" in dom
  shot = tmp_path / "feature.png"
  _chromium(f"--screenshot={shot}", "--window-size=1200,900", url=f"{index}#f={PLANTED}")
  assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
