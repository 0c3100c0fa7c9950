"""Evaluation with the SAE spliced into the LM, on held-out contexts.

Per token: next-token cross-entropy clean, with the SAE's reconstruction replacing the site's
activation, and with the site zero-ablated; delta LM loss = CE_sae − CE_clean; loss recovered =
(CE_zero − CE_sae) / (CE_zero − CE_clean); KL(clean ‖ sae). On the same tokens: L0, FVU,
shrinkage γ = E[x̂·x̂] / E[x̂·x], and per-feature firing frequency. BOS, EOS and padding are
never replaced (nor the first lm.skip_positions tokens), and a position counts only if its
token and the next one are such ordinary tokens.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu import harvest, logs, sae
from jumprelu.lm import model


def held_out_contexts(c, cfg, tokenizer, harvested_contexts: int | None = None) -> np.ndarray:
  """eval.num_contexts contexts from eval.skip_contexts on, in the packed text stream."""
  if harvested_contexts is not None and c.eval.skip_contexts < harvested_contexts:
    raise ValueError(f"eval.skip_contexts={c.eval.skip_contexts} overlaps the "
                     f"{harvested_contexts} contexts harvested for training; set it to at "
                     f"least {harvested_contexts}")
  stream = harvest.contexts(c, cfg, tokenizer)
  out = list(itertools.islice(stream, c.eval.skip_contexts, c.eval.skip_contexts +
                              c.eval.num_contexts))
  if len(out) < c.eval.num_contexts:
    raise ValueError(f"text.source {c.text.source!r} has only "
                     f"{c.eval.skip_contexts + len(out)} contexts of {c.lm.context_len} tokens; "
                     f"lower eval.skip_contexts ({c.eval.skip_contexts}) or eval.num_contexts "
                     f"({c.eval.num_contexts})")
  return np.stack(out)


def _ce_BxL(logits_BxLxV, tokens_BxL):
  """Cross-entropy of predicting token t+1 at position t (the last position gets 0)."""
  logp = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(ce, ((0, 0), (0, 1))), jnp.pad(logp, ((0, 0), (0, 1), (0, 0)))


@functools.partial(jax.jit, static_argnames=("cfg", "site", "skip_positions"))
def _batch_sums(lm_params, sae_params, tokens_BxL, *, cfg, site, skip_positions):
  keep_BxL = harvest.keep_mask(cfg, tokens_BxL, skip_positions)
  count_BxL = keep_BxL & jnp.pad(keep_BxL[:, 1:], ((0, 0), (0, 1)))  # this and next ordinary

  def reconstruct(a):
    f, _ = sae.encode(sae_params, a.astype(jnp.float32), bandwidth=1.0)
    return sae.decode(sae_params, f)

  splice = lambda a: jnp.where(keep_BxL[..., None], reconstruct(a), a)
  ablate = lambda a: jnp.where(keep_BxL[..., None], 0.0, a)
  clean_logits, x_BxLxW = model.forward(lm_params, cfg, tokens_BxL, site=site)
  sae_logits, _ = model.forward(lm_params, cfg, tokens_BxL, site=site, replace_fn=splice)
  zero_logits, _ = model.forward(lm_params, cfg, tokens_BxL, site=site, replace_fn=ablate)
  ce_clean, logp_clean = _ce_BxL(clean_logits, tokens_BxL)
  ce_sae, logp_sae = _ce_BxL(sae_logits, tokens_BxL)
  ce_zero, _ = _ce_BxL(zero_logits, tokens_BxL)
  kl_BxL = jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp_sae), axis=-1)

  w = count_BxL.astype(jnp.float32)
  k = keep_BxL.astype(jnp.float32)[..., None]
  x = x_BxLxW.astype(jnp.float32)
  f, _ = sae.encode(sae_params, x, bandwidth=1.0)
  x_hat = sae.decode(sae_params, f)
  return {
      "ce_tokens": jnp.sum(w), "ce_clean": jnp.sum(ce_clean * w), "ce_sae": jnp.sum(ce_sae * w),
      "ce_zero": jnp.sum(ce_zero * w), "kl": jnp.sum(kl_BxL * w),
      "act_tokens": jnp.sum(k), "l0": jnp.sum((f != 0) * k),
      "sq_err": jnp.sum((x - x_hat) ** 2 * k), "sq_x": jnp.sum(x**2 * k),
      "sum_x": jnp.sum(x * k, axis=(0, 1)),
      "xhat_xhat": jnp.sum(x_hat * x_hat * k), "xhat_x": jnp.sum(x_hat * x * k),
      "fires": jnp.sum((f != 0) * k, axis=(0, 1)),
  }


def evaluate_lm(c, lm, sae_params_raw: dict, contexts_NxL: np.ndarray, batch: int = 8) -> dict:
  """Delta LM loss and the SAE statistics of an SAE acting on raw activations at lm.site."""
  lm_params, cfg = lm[0], lm[1]
  site = model.parse_site(c.lm.site)
  sae_params = jax.tree.map(jnp.asarray, sae_params_raw)
  n = len(contexts_NxL)
  pad = (-n) % batch  # padding contexts made of padding tokens count nowhere
  tokens = np.concatenate([contexts_NxL, np.full((pad, contexts_NxL.shape[1]), cfg.pad_id,
                                                 np.int32)]) if pad else contexts_NxL
  totals = None
  bar = logs.progress(n, "evaluate", "ctx", every_s=10.0)
  for lo in range(0, len(tokens), batch):
    sums = jax.device_get(_batch_sums(lm_params, sae_params, tokens[lo:lo + batch], cfg=cfg,
                                      site=site, skip_positions=c.lm.skip_positions))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    bar.update(min(lo + batch, n) - bar.n)
  bar.close()
  return summarize(totals)


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


TABLE_KEYS = ("tokens", "ce_clean", "ce_sae", "ce_zero_ablation", "delta_lm_loss",
              "loss_recovered", "kl_clean_sae", "l0", "fvu", "shrinkage_gamma",
              "frac_features_over_10pct", "frac_features_over_1pct",
              "frac_features_dead_on_eval")


def table(result: dict) -> str:
  """A two-column text table of the scalar results."""
  rows = [(k, f"{result[k]:.4f}" if isinstance(result[k], float) else str(result[k]))
          for k in TABLE_KEYS if k in result]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
