"""The SAE spliced into the LM: per-token sums over a batch of contexts, and what they add up to.

Per token: next-token cross-entropy clean, with the SAE's reconstruction replacing the site's
activation, and with the site zero-ablated; delta LM loss = CE_sae − CE_clean; loss recovered =
(CE_zero − CE_sae) / (CE_zero − CE_clean); KL(clean ‖ sae). On the same tokens: L0, FVU,
shrinkage γ = E[x̂·x̂] / E[x̂·x], and per-feature firing frequency. BOS, EOS and padding are
never replaced (nor the first lm.skip_positions tokens), and a position counts only if its
token and the next one are such ordinary tokens. For JumpReLU SAEs also the threshold
distribution and the fraction of pre-activations inside the STE window |π − θ| < ε/2.
Any architecture (arch.py) evaluates; several SAEs at one site share the clean runs.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jumprelu import arch as arch_lib
from jumprelu import logs, sae, sharding
from jumprelu.lm import activations as lm_act
from jumprelu.lm import model


def _ce_BxL(logits_BxLxV, tokens_BxL):
  """Cross-entropy of predicting token t+1 at position t (the last position gets 0)."""
  logp = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(ce, ((0, 0), (0, 1))), jnp.pad(logp, ((0, 0), (0, 1), (0, 0)))


@functools.partial(jax.jit, static_argnames=("cfg", "site", "skip_positions"))
def _clean(lm_params, tokens_BxL, *, cfg, site, skip_positions):
  """What every SAE's sums share: the clean and zero-ablated runs and the site's activations."""
  keep_BxL = lm_act.keep_mask(cfg, tokens_BxL, skip_positions)
  count_BxL = keep_BxL & jnp.pad(keep_BxL[:, 1:], ((0, 0), (0, 1)))  # this and next ordinary
  ablate = lambda a: jnp.where(keep_BxL[..., None], 0.0, a)
  clean_logits, x_BxLxW = model.forward(lm_params, cfg, tokens_BxL, site=site)
  if site.kind == "resid_post":  # resume after the site from the ablated residual
    zero_logits, _ = model.forward(lm_params, cfg, tokens_BxL, site=site,
                                   resid_BxLxD=ablate(x_BxLxW))
  else:
    zero_logits, _ = model.forward(lm_params, cfg, tokens_BxL, site=site, replace_fn=ablate)
  ce_clean, logp_clean = _ce_BxL(clean_logits, tokens_BxL)
  ce_zero, _ = _ce_BxL(zero_logits, tokens_BxL)
  return {"keep": keep_BxL, "count": count_BxL, "ce_clean": ce_clean, "ce_zero": ce_zero,
          "logp_clean": logp_clean, "x": x_BxLxW.astype(jnp.float32)}


@functools.partial(jax.jit, static_argnames=("cfg", "site", "arch", "k"))
def _sae_sums(lm_params, sae_params, tokens_BxL, clean, half_window, *, cfg, site, arch, k):
  """One SAE's sums over a batch: its spliced run against the shared clean one, and its features
  on the site's activations. half_window > 0: also count JumpReLU pre-activations within it of θ."""
  keep_BxL = clean["keep"]
  reconstruct = lambda a: sae.decode(sae_params, arch_lib.features(
      sae_params, a.astype(jnp.float32), arch=arch, k=k))
  splice = lambda a: jnp.where(keep_BxL[..., None], reconstruct(a).astype(a.dtype), a)
  if site.kind == "resid_post":  # resume after the site from the spliced clean residual
    sae_logits, _ = model.forward(lm_params, cfg, tokens_BxL, site=site,
                                  # x back in the LM's dtype: exact, it came from there
                                  resid_BxLxD=splice(clean["x"].astype(jnp.dtype(cfg.dtype))))
  else:
    sae_logits, _ = model.forward(lm_params, cfg, tokens_BxL, site=site, replace_fn=splice)
  ce_sae, logp_sae = _ce_BxL(sae_logits, tokens_BxL)
  logp_clean = clean["logp_clean"]
  kl_BxL = jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp_sae), axis=-1)

  w = clean["count"].astype(jnp.float32)
  kk = keep_BxL.astype(jnp.float32)[..., None]
  x = clean["x"]
  f = arch_lib.features(sae_params, x, arch=arch, k=k)
  x_hat = sae.decode(sae_params, f)
  sums = {
      "ce_tokens": jnp.sum(w), "ce_clean": jnp.sum(clean["ce_clean"] * w),
      "ce_sae": jnp.sum(ce_sae * w), "ce_zero": jnp.sum(clean["ce_zero"] * w),
      "kl": jnp.sum(kl_BxL * w),
      "act_tokens": jnp.sum(kk), "l0": jnp.sum((f != 0) * kk),
      "sq_err": jnp.sum((x - x_hat) ** 2 * kk), "sq_x": jnp.sum(x**2 * kk),
      "sum_x": jnp.sum(x * kk, axis=(0, 1)),
      "xhat_xhat": jnp.sum(x_hat * x_hat * kk), "xhat_x": jnp.sum(x_hat * x * kk),
      "fires": jnp.sum((f != 0) * kk, axis=(0, 1)),
      # [B] per context, for intervals over contexts (concatenated across batches, not summed)
      "context_tokens": jnp.sum(w, axis=1),
      "context_delta": jnp.sum((ce_sae - clean["ce_clean"]) * w, axis=1),
  }
  if arch == "jumprelu":
    pre = sae.pre_activations(sae_params, x)
    near = jnp.abs(pre - sae_params["threshold"]) < half_window
    sums["in_window"] = jnp.sum(near * kk)
  return sums


def evaluate_lm(c, lm, sae_params_raw: dict, contexts_NxL: np.ndarray, batch: int = 8,
                half_window: float = 0.0) -> dict:
  """Delta LM loss and the SAE statistics of an SAE acting on raw activations at lm.site."""
  return evaluate_many(c, lm, [sae_params_raw], contexts_NxL, batch, [half_window])[0]


def process_share(n: int, process: int | None = None, processes: int | None = None
                  ) -> tuple[int, int]:
  """The [lo, hi) of n evaluation contexts that this process scores: contiguous equal shares in
  process order (the last ones may be shorter or empty)."""
  process = jax.process_index() if process is None else process
  processes = jax.process_count() if processes is None else processes
  per = -(-n // processes)
  return min(n, process * per), min(n, (process + 1) * per)


def evaluate_many(c, lm, saes_raw: list[dict], contexts_NxL: np.ndarray, batch: int = 8,
                  half_windows: list[float] | None = None) -> list[dict]:
  """evaluate_lm for several SAEs (export.raw_params exports, any architecture) at lm.site: the
  clean and zero-ablated runs are made once per batch and shared.

  Every process runs the LM on its share of the contexts (process_share), `batch` contexts per
  forward, and the sums are added across processes: every process returns the same results.
  half_windows[i] > 0 (raw units, ε·C/2 for a JumpReLU SAE trained with bandwidth ε on x / C)
  adds the fraction of pre-activations within it of θ: the STE's window."""
  lm_params, cfg = lm[0], lm[1]
  site = model.parse_site(c.lm.site)
  half_windows = half_windows or [0.0] * len(saes_raw)
  saes = [arch_lib.split_raw(p) for p in saes_raw]
  saes = [(name, k, _place(lm_params, arrays)) for name, k, arrays in saes]
  lo, hi = process_share(len(contexts_NxL))
  mine = contexts_NxL[lo:hi]
  n = len(mine)
  pad = (-n) % batch if n else batch  # padding contexts made of padding tokens count nowhere
  tokens = np.concatenate([mine, np.full((pad, contexts_NxL.shape[1]), cfg.pad_id,
                                         np.int32)]) if pad else mine
  totals, contexts = [None] * len(saes), [None] * len(saes)
  bar = logs.progress(n, "evaluate", "ctx", every_s=10.0)
  for start in range(0, len(tokens), batch):
    tokens_BxL = _lm_batch(lm_params, tokens[start:start + batch])
    clean = _clean(lm_params, tokens_BxL, cfg=cfg, site=site, skip_positions=c.lm.skip_positions)
    for i, (name, k, params) in enumerate(saes):
      sums = jax.device_get(_sae_sums(lm_params, params, tokens_BxL, clean,
                                      jnp.float32(half_windows[i]), cfg=cfg, site=site,
                                      arch=name, k=k))
      per = {key: sums.pop(key) for key in _PER_CONTEXT}
      totals[i] = sums if totals[i] is None else jax.tree.map(np.add, totals[i], sums)
      contexts[i] = per if contexts[i] is None else jax.tree.map(
          lambda a, b: np.concatenate([a, b]), contexts[i], per)
    bar.update(min(start + batch, n) - bar.n)
  bar.close()
  if jax.process_count() > 1:  # [processes, ...] in process order, summed
    sharding.wait_for_all("jumprelu_evaluate_sums")
    totals = [jax.tree.map(lambda a: np.sum(a, axis=0), multihost_utils.process_allgather(t))
              for t in totals]
  contexts = [jax.tree.map(lambda a: a[:n], t) for t in contexts]  # padding contexts dropped
  if jax.process_count() > 1:  # each share padded to one length, gathered in process order
    share = -(-len(contexts_NxL) // jax.process_count())
    counts = [len(range(*process_share(len(contexts_NxL), p))) for p in range(jax.process_count())]
    contexts = [jax.tree.map(lambda a: np.concatenate([g[:c] for g, c in zip(
        multihost_utils.process_allgather(np.pad(a, (0, share - len(a)))), counts)]), t)
        for t in contexts]
  results = []
  for (name, k, params), t, hw, per in zip(saes, totals, half_windows, contexts):
    r = {"arch": name, **summarize(t),
         # per held-out context, in order: scored tokens and Σ (CE with the SAE − CE clean)
         "context_tokens": per["context_tokens"].astype(int).tolist(),
         "context_delta_lm_loss": per["context_delta"].astype(float).tolist()}
    if name == "topk":
      r["k"] = k
    if name == "jumprelu":
      theta_F = np.asarray(params["threshold"], np.float64)
      r["threshold_quantiles"] = {str(q): float(np.percentile(theta_F, q))
                                  for q in THRESHOLD_QUANTILES}
      r["threshold_mean"] = float(np.mean(theta_F))
      r["frac_preacts_in_window"] = float(t["in_window"]) / (
          float(t["act_tokens"]) * theta_F.size) if hw > 0 else None
    results.append(r)
  return results


THRESHOLD_QUANTILES = (0, 5, 25, 50, 75, 95, 100)
_PER_CONTEXT = ("context_tokens", "context_delta")


def _place(lm_params, arrays: dict) -> dict:
  """An SAE's arrays on the mesh of the LM's params, features split over "model"
  (sharding.sae_shardings): a 1M-wide SAE is not copied whole onto every device. Once, not per
  batch."""
  mesh = lm_act.mesh_of(lm_params)
  if mesh is None:
    return jax.tree.map(jnp.asarray, arrays)
  arrays = {n: np.asarray(a, np.float32) for n, a in arrays.items()}
  shardings = sharding.sae_shardings(mesh, arrays)
  return {n: jax.make_array_from_callback(a.shape, shardings[n], lambda idx, a=a: a[idx])
          for n, a in arrays.items()}


def _lm_batch(lm_params, tokens_BxL: np.ndarray):
  """The tokens laid out as the LM's batch: split over "data" of the mesh load_lm put its params
  on (each process its own LM), else as they are."""
  mesh = lm_act.mesh_of(lm_params)
  return tokens_BxL if mesh is None else lm_act.tokens_on_mesh(mesh, tokens_BxL)


def summarize(t: dict) -> dict:
  n_ce, n = float(t["ce_tokens"]), float(t["act_tokens"])
  ce_clean, ce_sae, ce_zero = (float(t[k]) / n_ce for k in ("ce_clean", "ce_sae", "ce_zero"))
  mean_x = np.asarray(t["sum_x"], np.float64) / n
  centred = float(t["sq_x"]) - n * float(mean_x @ mean_x)
  freq = np.asarray(t["fires"], np.float64) / n
  return {
      "tokens": int(n), "ce_clean": ce_clean, "ce_sae": ce_sae, "ce_zero_ablation": ce_zero,
      "delta_lm_loss": ce_sae - ce_clean,
      "loss_recovered": (ce_zero - ce_sae) / (ce_zero - ce_clean),
      "kl_clean_sae": float(t["kl"]) / n_ce,
      "l0": float(t["l0"]) / n, "fvu": float(t["sq_err"]) / centred,
      # γ < 1: shrunk reconstructions; undefined (NaN) when x̂ is orthogonal to x or zero.
      "shrinkage_gamma": float(t["xhat_xhat"]) / float(t["xhat_x"]) if float(t["xhat_x"]) else
                         float("nan"),
      "frac_features_over_10pct": float(np.mean(freq > 0.1)),
      "frac_features_over_1pct": float(np.mean(freq > 0.01)),
      "frac_features_dead_on_eval": float(np.mean(freq == 0)),
      "firing_frequency": freq.tolist(),
  }


# eval.json key -> (the table's label with its unit, the factor shown: fractions as percent).
TABLE_ROWS = {
    "arch": ("architecture", None),
    "tokens": ("eval tokens [tokens]", None),
    "ce_clean": ("CE clean [nats/token]", 1),
    "ce_sae": ("CE with SAE spliced in [nats/token]", 1),
    "ce_zero_ablation": ("CE with site zero-ablated [nats/token]", 1),
    "delta_lm_loss": ("delta LM loss [nats/token]", 1),
    "loss_recovered": ("loss recovered [%]", 100),
    "kl_clean_sae": ("KL(clean || SAE) [nats/token]", 1),
    "l0": ("L0 [features/token]", 1),
    "fvu": ("FVU [fraction of variance]", 1),
    "shrinkage_gamma": ("shrinkage gamma [ratio; < 1: shrunk]", 1),
    "frac_features_over_10pct": ("features firing on > 10% of tokens [% of features]", 100),
    "frac_features_over_1pct": ("features firing on > 1% of tokens [% of features]", 100),
    "frac_features_dead_on_eval": ("dead on eval: never fired on these tokens [% of features]",
                                   100),
    "threshold_mean": ("threshold mean [raw activation units]", 1),
    "frac_preacts_in_window": ("pre-activations within eps/2 of theta [%]", 100),
}


def table(result: dict) -> str:
  """A two-column text table of the scalar results, each labelled with its unit."""
  rows = []
  for key, (label, factor) in TABLE_ROWS.items():
    v = result.get(key)
    if key in result:
      rows.append((label, "n/a" if v is None else f"{v * factor:.4g}" if factor else str(v)))
  width = max(len(label) for label, _ in rows)
  return "\n".join(f"{label:<{width}}  {v}" for label, v in rows)
