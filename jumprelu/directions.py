"""What a feature's decoder direction says without any text: the tokens it promotes and
suppresses through the unembedding (logit lens), and its nearest features by decoder cosine.

Logit lens: a direction d at the site is carried to the residual stream (attn_out: through
that layer's W_O; resid_post and mlp_out already live there), scaled by the final RMSNorm's
weight and multiplied by the unembedding: d · diag(g) · W_U [V]. The norm's division by the
residual's RMS and Gemma 2's final soft-cap are left out; they rescale every logit of a token
alike, so the ranking of tokens stays. Both are computed in chunks of features, so a 1M-wide
SAE and a 256k vocabulary never hold an [F, V] matrix at once.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

CHUNK_ELEMENTS = 1 << 26  # [chunk, V] or [chunk, F] floats per step: 256 MiB


def to_logits_WxV(lm_params, cfg, site) -> jax.Array:
  """The linear map from a site direction to the logits [W, V] (see the module docstring)."""
  if cfg.tie_embeddings:
    unembed_DxV = jnp.asarray(lm_params["embed_VxD"], jnp.float32).T
  else:
    unembed_DxV = jnp.asarray(lm_params["unembed_DxV"], jnp.float32)
  g_D = jnp.asarray(lm_params["final_norm_D"], jnp.float32)
  g_D = 1.0 + g_D if cfg.family == "gemma2" else g_D
  out_DxV = g_D[:, None] * unembed_DxV
  if site.kind == "attn_out":  # per-head outputs before o_proj
    o_WxD = jnp.asarray(lm_params["layers"]["o_HDhxD"][site.layer], jnp.float32)
    return o_WxD @ out_DxV
  return out_DxV


@functools.partial(jax.jit, static_argnames=("k",))
def _extremes(d_CxW, to_WxV, *, k: int):
  logits_CxV = d_CxW @ to_WxV
  up_val, up_idx = jax.lax.top_k(logits_CxV, k)
  down_val, down_idx = jax.lax.top_k(-logits_CxV, k)
  return up_idx, up_val, down_idx, -down_val


def logit_lens(W_dec_FxW, lm_params, cfg, site, k: int = 10) -> dict:
  """Per feature the k tokens its decoder direction promotes most and the k it suppresses
  most, with their logit contributions per unit of activation: up_FxK, up_val_FxK, down_FxK,
  down_val_FxK (numpy; down_val is the most negative first)."""
  to_WxV = to_logits_WxV(lm_params, cfg, site)
  W_dec_FxW = jnp.asarray(W_dec_FxW, jnp.float32)
  chunk = max(1, CHUNK_ELEMENTS // to_WxV.shape[1])
  parts = [jax.device_get(_extremes(W_dec_FxW[i:i + chunk], to_WxV, k=k))
           for i in range(0, W_dec_FxW.shape[0], chunk)]
  names = ("up_FxK", "up_val_FxK", "down_FxK", "down_val_FxK")
  return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}


@functools.partial(jax.jit, static_argnames=("k",))
def _nearest(unit_CxW, unit_FxW, lo, *, k: int):
  cos_CxF = unit_CxW @ unit_FxW.T
  rows_C = lo + jnp.arange(unit_CxW.shape[0])
  self_CxF = jnp.arange(unit_FxW.shape[0])[None, :] == rows_C[:, None]
  return jax.lax.top_k(jnp.where(self_CxF, -jnp.inf, cos_CxF), k)


def neighbours(W_dec_FxW, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Per feature the k other features with the most similar decoder directions (cosine):
  (ids [F, k], cosines [F, k]), most similar first."""
  W = jnp.asarray(W_dec_FxW, jnp.float32)
  unit_FxW = W / jnp.maximum(jnp.linalg.norm(W, axis=1, keepdims=True), 1e-12)
  F = unit_FxW.shape[0]
  k = min(k, F - 1)
  if k <= 0:
    return np.zeros((F, 0), np.int32), np.zeros((F, 0), np.float32)
  chunk = max(1, CHUNK_ELEMENTS // F)
  cos, ids = zip(*(jax.device_get(_nearest(unit_FxW[i:i + chunk], unit_FxW, i, k=k))
                   for i in range(0, F, chunk)))
  return np.concatenate(ids).astype(np.int32), np.concatenate(cos)
