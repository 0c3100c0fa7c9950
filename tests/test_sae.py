"""The SAE's pure functions against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jumprelu import export, sae


def _params(threshold_param="log", d=6, f=10, seed=0):
  p = sae.init(jax.random.key(seed), d, f, threshold_init=0.05, threshold_param=threshold_param)
  rng = np.random.default_rng(seed)
  p["b_enc"] = jnp.asarray(rng.normal(0, 0.1, f), jnp.float32)
  p["b_dec"] = jnp.asarray(rng.normal(0, 0.1, d), jnp.float32)
  return p


def test_init_follows_recipe():
  p = sae.init(jax.random.key(0), 16, 64)
  np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
  assert not np.any(p["b_enc"]) and not np.any(p["b_dec"])
  np.testing.assert_allclose(sae.threshold(p), 0.001, rtol=1e-6)
  assert set(p) == {"W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"}
  raw = sae.init(jax.random.key(0), 16, 64, threshold_param="raw")
  assert "threshold" in raw and "log_threshold" not in raw
  with pytest.raises(ValueError, match="threshold_param"):
    sae.init(jax.random.key(0), 16, 64, threshold_param="softplus")


@pytest.mark.parametrize("threshold_param", ["log", "raw"])
def test_loss_matches_numpy(threshold_param):
  p = _params(threshold_param)
  x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
  lam = 0.3
  loss, aux = sae.loss(p, x, sparsity_coefficient=lam, bandwidth=0.01)
  pn = {k: np.asarray(v, np.float64) for k, v in p.items()}
  theta = np.exp(pn["log_threshold"]) if threshold_param == "log" else pn["threshold"]
  pre = np.maximum(x @ pn["W_enc"] + pn["b_enc"], 0)
  f = pre * (pre > theta)
  x_hat = f @ pn["W_dec"] + pn["b_dec"]
  expected = np.mean(np.sum((x - x_hat) ** 2, 1) + lam * np.sum(pre > theta, 1))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(aux["l0_B"], np.sum(pre > theta, 1))


def test_encoder_learns_only_through_reconstruction():
  """The L0 term reaches θ alone: its gradient toward W_enc and b_enc is zero."""
  p = _params()
  x = np.random.default_rng(2).normal(size=(8, 6)).astype(np.float32)
  sparsity_only = lambda q: sae.loss(q, x, sparsity_coefficient=1.0, bandwidth=0.5)[0] - \
      jnp.mean(sae.loss(q, x, sparsity_coefficient=0.0, bandwidth=0.5)[1]["recon_B"])
  g = jax.grad(sparsity_only)(p)
  assert not np.any(g["W_enc"]) and not np.any(g["b_enc"])
  assert np.any(g["log_threshold"])


def test_remove_parallel_grad_is_orthogonal():
  rng = np.random.default_rng(3)
  w = sae.normalize_decoder(jnp.asarray(rng.normal(size=(10, 6)), jnp.float32))
  g = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
  g_perp = sae.remove_parallel_grad(w, g)
  np.testing.assert_allclose(np.sum(g_perp * w, axis=1), 0, atol=1e-6)
  np.testing.assert_allclose(g_perp + np.sum(g * w, 1, keepdims=True) * w, g, atol=1e-6)


def test_fold_normalization_acts_on_raw_activations():
  p = _params()
  x = np.random.default_rng(4).normal(size=(7, 6)).astype(np.float32) * 9.0
  scale = 9.0 * np.sqrt(6)
  f_norm, _ = sae.encode(p, x / scale, bandwidth=0.001)
  raw = export.raw_params("jumprelu", p, scale)
  f_raw, _ = sae.encode(raw, x, bandwidth=0.001)
  np.testing.assert_allclose(f_raw, scale * f_norm, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae.decode(raw, f_raw), scale * sae.decode(p, f_norm),
                             rtol=1e-5, atol=1e-4)
