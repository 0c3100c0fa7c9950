"""Writes the feature browser: a static site that opens from the file system, no server.

  OUT/index.html           the page (browser_page.PAGE): the table of all features, a search
                           box, and each feature at index.html#f=ID
  OUT/data/meta.js         window.BROWSER: what the run was, and per feature its density, max
                           and mean activation, top token and first promoted tokens
  OUT/data/vocab.js        window.VOCAB: every token id's text
  OUT/data/f/NNNNN.js      BROWSER_CHUNK(N, [...]): features N·chunk .. (N+1)·chunk − 1, each
                           null (never fired) or {top, smp, hist, up, down, nbr}
An example is {v: value, c: context, p: position, o: the example token's index in t, t: token
ids around it, a: the feature's activation on each, in thousandths of the feature's max}.
Loaded lazily one chunk at a time, a 1M-feature SAE stays as quick to open as a small one.
"""
import json
import os

import numpy as np

from jumprelu import browser_page, feature_examples, files

CHUNK_FEATURES = 128
TABLE_UP = 3  # promoted tokens shown per feature in the table


def _g(x, digits: int = 4) -> float:
  """x rounded to `digits` significant digits (short in JSON)."""
  return float(f"{float(x):.{digits}g}")


def _js(name: str, obj) -> str:
  return f"{name} = {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)};\n"


def summary(stats: dict, contexts_NxL: np.ndarray) -> dict:
  """Per feature: density, max and mean activation, and the token of its top example."""
  tokens = max(int(stats["tokens"]), 1)
  fires_F = stats["fires_F"].astype(np.float64)
  top = stats["top"]
  max_F = np.maximum(top["val"][:, 0], 0.0)
  c0, p0 = top["ctx"][:, 0], top["pos"][:, 0]
  top_token_F = np.where(c0 >= 0, contexts_NxL[np.maximum(c0, 0), p0], -1)
  return {"density_F": fires_F / tokens, "max_F": max_F,
          "mean_F": np.where(fires_F > 0, stats["sum_F"] / np.maximum(fires_F, 1), 0.0),
          "top_token_F": top_token_F, "live_F": fires_F > 0}


def _examples(slots: dict, f: int, contexts_NxL, before: int, after: int, max_act: float,
              quantiles: bool) -> list[dict]:
  out = []
  L = contexts_NxL.shape[1]
  valid = np.flatnonzero(slots["ctx"][f] >= 0)
  for rank, j in enumerate(valid):
    ctx, pos = int(slots["ctx"][f, j]), int(slots["pos"][f, j])
    lo, hi = max(pos - before, 0), min(pos + after + 1, L)
    acts = slots["win"][f, j, lo - (pos - before):hi - (pos - before)]
    ex = {"v": _g(slots["val"][f, j]), "c": ctx, "p": pos, "o": pos - lo,
          "t": contexts_NxL[ctx, lo:hi].tolist(),
          "a": np.rint(1000.0 * np.maximum(acts, 0.0) / max_act).astype(int).tolist()}
    if quantiles:  # a uniform sample, sorted descending: rank i is near quantile 1 − (i+½)/n
      ex["q"] = _g(1.0 - (rank + 0.5) / len(valid), 3)
    out.append(ex)
  return out


def feature_record(f: int, stats: dict, summ: dict, lens: dict, nbr, contexts_NxL,
                   before: int, after: int) -> dict | None:
  """One feature's page data (None if it never fired)."""
  if not summ["live_F"][f]:
    return None
  max_act = float(summ["max_F"][f]) or 1.0
  hist = stats["hist_FxH"][f]
  nz = np.flatnonzero(hist)
  ids, cos = nbr
  return {
      "top": _examples(stats["top"], f, contexts_NxL, before, after, max_act, False),
      "smp": _examples(stats["smp"], f, contexts_NxL, before, after, max_act, True),
      "hist": [int(nz[0])] + hist[nz[0]:nz[-1] + 1].tolist(),
      "up": [[int(t), _g(v)] for t, v in zip(lens["up_FxK"][f], lens["up_val_FxK"][f])],
      "down": [[int(t), _g(v)] for t, v in zip(lens["down_FxK"][f], lens["down_val_FxK"][f])],
      "nbr": [[int(j), _g(c, 3)] for j, c in zip(ids[f], cos[f])],
  }


def write(out_dir: str, *, meta: dict, stats: dict, lens: dict, nbr, contexts_NxL: np.ndarray,
          vocab: list[str], specials: list[int], before: int, after: int,
          chunk: int = CHUNK_FEATURES) -> dict:
  """Writes the site into out_dir (see the module docstring); returns summary(...)."""
  summ = summary(stats, contexts_NxL)
  n = len(summ["density_F"])
  data = os.path.join(out_dir, "data")
  for lo in range(0, n, chunk):
    records = [feature_record(f, stats, summ, lens, nbr, contexts_NxL, before, after)
               for f in range(lo, min(lo + chunk, n))]
    files.save_text(os.path.join(data, "f", f"{lo // chunk:05d}.js"),
                    f"BROWSER_CHUNK({lo // chunk}, "
                    f"{json.dumps(records, separators=(',', ':'))});\n")
  browser = {
      "meta": {**meta, "live": int(np.sum(summ["live_F"])), "tokens": int(stats["tokens"])},
      "n_features": n, "chunk": chunk, "specials": sorted(set(specials)),
      "hist": {"log10_min": feature_examples.HIST_LOG10_MIN,
               "per_decade": feature_examples.HIST_PER_DECADE},
      "features": {
          "density": [_g(x) for x in summ["density_F"]],
          "max": [_g(x) for x in summ["max_F"]], "mean": [_g(x) for x in summ["mean_F"]],
          "top_token": summ["top_token_F"].astype(int).tolist(),
          "up": lens["up_FxK"][:, :TABLE_UP].astype(int).tolist()},
  }
  files.save_text(os.path.join(data, "meta.js"), _js("window.BROWSER", browser))
  files.save_text(os.path.join(data, "vocab.js"), _js("window.VOCAB", vocab))
  files.save_text(os.path.join(out_dir, "index.html"), browser_page.PAGE)
  return summ
