"""The baseline SAEs (ReLU, Gated, TopK) against numpy references and hand-derived gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jumprelu import baselines

D, F, B = 4, 6, 3
LAM = 0.3


# One jitted value-and-grad per architecture, shared by its tests: compiles dominate the runtime.
_relu_vg = jax.jit(jax.value_and_grad(
    lambda p, x: baselines.relu_loss(p, x, sparsity_coefficient=LAM), has_aux=True))


def _gated_parts(p, x):
  """[total, mean recon, mean L1, mean aux recon] and aux, for jacrev."""
  loss, aux = baselines.gated_loss(p, x, sparsity_coefficient=LAM)
  parts = [jnp.mean(aux[name]) for name in ("recon_B", "sparsity_B", "aux_recon_B")]
  return jnp.stack([loss, *parts]), aux


_gated_jac = jax.jit(jax.jacrev(_gated_parts, has_aux=True))
_gated_loss = jax.jit(lambda p, x: baselines.gated_loss(p, x, sparsity_coefficient=LAM))


def _x(seed=1):
  return np.random.default_rng(seed).normal(size=(B, D)).astype(np.float32)


def _np(params):
  return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _perturbed(init, seed=0):
  """An init with small random biases (and r_mag) so every term is exercised."""
  p = init(jax.random.key(seed), D, F)
  rng = np.random.default_rng(seed + 10)
  return {k: (v + jnp.asarray(rng.normal(0, 0.2, v.shape), jnp.float32)
              if v.ndim == 1 else v) for k, v in p.items()}


def _finite_diff(fn, params, eps=1e-5):
  """Central differences of a float64 numpy loss over every param entry."""
  grads = {}
  for name, v in params.items():
    g = np.zeros_like(v)
    for i in np.ndindex(v.shape):
      hi, lo = dict(params), dict(params)
      hi[name], lo[name] = v.copy(), v.copy()
      hi[name][i] += eps
      lo[name][i] -= eps
      g[i] = (fn(hi) - fn(lo)) / (2 * eps)
    grads[name] = g
  return grads


def _assert_grads_close(g, expected, atol=2e-4):
  assert set(g) == set(expected)
  for name in g:
    np.testing.assert_allclose(g[name], expected[name], rtol=1e-3, atol=atol, err_msg=name)


# ----------------------------------------------------------------------------- init

def test_inits_follow_recipe():
  key = jax.random.key(0)
  for init in (baselines.relu_init, baselines.topk_init):
    p = init(key, 16, 64)
    assert set(p) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
    assert not np.any(p["b_enc"]) and not np.any(p["b_dec"])
  g = baselines.gated_init(key, 16, 64)
  assert set(g) == {"W_gate", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}
  assert g["W_gate"].shape == (16, 64) and g["r_mag"].shape == (64,)
  np.testing.assert_allclose(np.linalg.norm(g["W_dec"], axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(g["W_gate"], g["W_dec"].T)
  for name in ("b_gate", "r_mag", "b_mag", "b_dec"):
    assert not np.any(g[name]), name


# ----------------------------------------------------------------------------- ReLU

def _relu_ref(p, x, lam):
  f = np.maximum(x @ p["W_enc"] + p["b_enc"], 0)
  x_hat = f @ p["W_dec"] + p["b_dec"]
  recon = np.sum((x - x_hat) ** 2, 1)
  return np.mean(recon + lam * f @ np.linalg.norm(p["W_dec"], axis=1)), f, x_hat, recon


def _relu_params():
  p = _perturbed(baselines.relu_init)
  p["W_dec"] = p["W_dec"] * jnp.linspace(0.5, 2.0, F)[:, None]  # non-unit norms: weighting shows
  return p


def test_relu_loss_matches_numpy():
  p, x = _relu_params(), _x()
  (loss, aux), _ = _relu_vg(p, x)
  expected, f, x_hat, recon = _relu_ref(_np(p), x, LAM)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(aux["f_BxF"], f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["x_hat_BxD"], x_hat, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["recon_B"], recon, rtol=1e-5)
  np.testing.assert_array_equal(aux["l0_B"], np.sum(f > 0, 1))
  assert 0 < np.sum(f > 0) < B * F  # both sides of the ReLU are exercised


def test_relu_grad_matches_formula_and_finite_differences():
  p, x = _relu_params(), _x()
  _, g = _relu_vg(p, x)
  pn = _np(p)
  z = x @ pn["W_enc"] + pn["b_enc"]
  assert np.min(np.abs(z)) > 1e-3  # away from the ReLU's kink, so the loss is smooth here
  f = np.maximum(z, 0)
  r = f @ pn["W_dec"] + pn["b_dec"] - x
  norms = np.linalg.norm(pn["W_dec"], axis=1)
  g_xhat = 2 * r / B
  g_z = (g_xhat @ pn["W_dec"].T + LAM * norms / B) * (z > 0)
  formula = {"W_enc": x.T @ g_z, "b_enc": g_z.sum(0), "b_dec": g_xhat.sum(0),
             "W_dec": f.T @ g_xhat + LAM * f.sum(0)[:, None] / B * pn["W_dec"] / norms[:, None]}
  _assert_grads_close(g, formula)
  _assert_grads_close(g, _finite_diff(lambda q: _relu_ref(q, x, LAM)[0], pn))


# ----------------------------------------------------------------------------- Gated

def _gated_ref(p, x, lam, frozen=None):
  """The Gated loss in numpy; `frozen` (W_dec, b_dec) feeds the L1 weights and the aux decoder."""
  frozen = frozen or p
  z = (x - p["b_dec"]) @ p["W_gate"]
  pi_gate = z + p["b_gate"]
  pi_mag = (x - p["b_dec"]) @ (np.exp(p["r_mag"]) * p["W_gate"]) + p["b_mag"]
  f = (pi_gate > 0) * np.maximum(pi_mag, 0)
  x_hat = f @ p["W_dec"] + p["b_dec"]
  recon = np.sum((x - x_hat) ** 2, 1)
  gate = np.maximum(pi_gate, 0)
  aux_recon = np.sum((x - gate @ frozen["W_dec"] - frozen["b_dec"]) ** 2, 1)
  sparsity = gate @ np.linalg.norm(frozen["W_dec"], axis=1)
  return np.mean(recon + lam * sparsity + aux_recon), f, x_hat, pi_gate, pi_mag


def _gated_params():
  p = _perturbed(baselines.gated_init, seed=3)
  p["W_dec"] = p["W_dec"] * jnp.linspace(0.5, 2.0, F)[:, None]
  return p


def test_gated_loss_matches_numpy():
  p, x = _gated_params(), _x()
  loss, aux = _gated_loss(p, x)
  expected, f, x_hat, pi_gate, pi_mag = _gated_ref(_np(p), x, LAM)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(aux["f_BxF"], f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["x_hat_BxD"], x_hat, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["pre_BxF"], np.maximum(pi_gate, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(aux["l0_B"], np.sum(f > 0, 1))
  # The gate both opens and closes, and some open gates meet a non-positive magnitude.
  assert np.any(pi_gate > 0) and np.any(pi_gate < 0) and np.any((pi_gate > 0) & (pi_mag < 0))


def test_gated_grads():
  p, x = _gated_params(), _x()
  pn = _np(p)
  _, _, _, pi_gate, pi_mag = _gated_ref(pn, x, LAM)
  assert min(np.min(np.abs(pi_gate)), np.min(np.abs(pi_mag))) > 1e-3  # away from every kink

  jac, _ = _gated_jac(p, x)
  g, g_rec, g_l1, g_aux = ({k: v[i] for k, v in jac.items()} for i in range(4))

  # With the decoder frozen in the L1 weights and the aux term, the gradient is that of the
  # numpy loss: H is locally constant, so finite differences see no gate gradient either.
  frozen = {"W_dec": pn["W_dec"], "b_dec": pn["b_dec"]}
  _assert_grads_close(g, _finite_diff(lambda q: _gated_ref(q, x, LAM, frozen)[0], pn))
  # Unfrozen, the decoder's gradient would differ: the freezing is what the check above sees.
  g_unfrozen = _finite_diff(lambda q: _gated_ref({**pn, **q}, x, LAM)[0], frozen)
  for name in frozen:
    assert np.max(np.abs(g_unfrozen[name] - np.asarray(g[name]))) > 1e-2, name

  assert not np.any(g_aux["W_dec"]) and not np.any(g_l1["W_dec"])
  assert np.any(g_aux["W_gate"]) and np.any(g_aux["b_gate"]) and np.any(g_l1["b_gate"])
  # Reconstruction sees the gate through H only: nothing for b_gate; r_mag, b_mag learn there.
  assert not np.any(g_rec["b_gate"]) and np.any(g_rec["r_mag"]) and np.any(g_rec["b_mag"])
  assert not np.any(g_aux["r_mag"]) and not np.any(g_aux["b_mag"])


# ----------------------------------------------------------------------------- TopK

K, K_AUX = 2, 2
DEAD = np.array([False, True, False, True, True, False])


def _topk_params():
  p = _perturbed(baselines.topk_init, seed=5)
  p["b_enc"] = p["b_enc"] + 0.5  # more than k positive pre-activations per row
  return p


def _keep_top(v, k):
  """v with all but each row's k largest entries zeroed (numpy, no ties in test data)."""
  keep = np.zeros(v.shape, bool)
  np.put_along_axis(keep, np.argsort(-v, axis=1)[:, :k], True, axis=1)
  return np.where(keep, v, 0), keep


def _topk_ref(p, x, dead, alpha):
  pre = np.maximum(x @ p["W_enc"] + p["b_enc"], 0)
  f, keep = _keep_top(pre, K)
  x_hat = f @ p["W_dec"] + p["b_dec"]
  recon = np.sum((x - x_hat) ** 2, 1)
  z, keep_aux = _keep_top(np.where(dead, pre, -1.0), K_AUX)
  z = np.where(dead, z, 0)
  e = x - x_hat
  e_hat = z @ p["W_dec"]
  auxk = np.sum((e - e_hat) ** 2) / np.sum((e - e.mean(0)) ** 2)
  return np.mean(recon) + alpha * auxk, f, keep, x_hat, z, keep_aux & dead, auxk


_topk_vg = jax.jit(jax.value_and_grad(
    lambda p, x, alpha, dead: baselines.topk_loss(p, x, k=K, k_aux=K_AUX, aux_coefficient=alpha,
                                                  dead_F=dead), has_aux=True))
_topk_encode = jax.jit(baselines.topk_encode, static_argnames="k")


def _topk_loss(p, x, alpha=0.5, dead=DEAD):
  """(loss, aux), grads; alpha and dead are traced, so every call shares one compile."""
  return _topk_vg(p, x, jnp.float32(alpha), jnp.asarray(dead))


def test_topk_forward_and_loss_match_numpy():
  p, x = _topk_params(), _x()
  f, pre = _topk_encode(p, x, k=K)
  expected, f_np, keep, x_hat, z, _, auxk = _topk_ref(_np(p), x, DEAD, 0.5)
  assert np.all(np.sort(np.asarray(pre), 1)[:, -K - 1] > 0)  # > k positive: top-k bites
  np.testing.assert_allclose(f, f_np, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.sum(np.asarray(f) > 0, 1), K)
  assert np.any(z) and np.any(DEAD & ~keep.any(0))  # AuxK has dead latents outside the top-k
  (loss, aux), _ = _topk_loss(p, x)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(aux["auxk"], auxk, rtol=1e-5)
  np.testing.assert_allclose(aux["x_hat_BxD"], x_hat, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(aux["l0_B"], K)
  # Fewer dead latents than k_aux: only the dead one reconstructs the residual.
  one_dead = np.arange(F) == 2
  (_, aux1), _ = _topk_loss(p, x, dead=one_dead)
  np.testing.assert_allclose(aux1["auxk"], _topk_ref(_np(p), x, one_dead, 0.5)[-1], rtol=1e-5)
  # No dead latents: nothing to revive, AuxK is 0.
  (loss0, aux0), g0 = _topk_loss(p, x, dead=np.zeros(F, bool))
  assert aux0["auxk"] == 0 and np.isclose(loss0, np.mean(aux0["recon_B"]))
  assert all(np.all(np.isfinite(v)) for v in g0.values())
  with pytest.raises(ValueError, match="k must be"):
    baselines.topk_encode(p, x, k=F + 1)


def test_topk_grads_flow_only_through_selected_latents():
  p, x = _topk_params(), _x()
  pn = _np(p)
  _, f, keep, x_hat, z, keep_aux, _ = _topk_ref(pn, x, DEAD, 0.5)
  _, g = _topk_loss(p, x, alpha=0.0)
  # Hand-derived: ∂/∂π = keep ⊙ (2(x̂ − x)/B)·W_decᵀ; ∂/∂W_dec = fᵀ·2(x̂ − x)/B.
  g_xhat = 2 * (x_hat - x) / B
  pos = x @ pn["W_enc"] + pn["b_enc"] > 0
  g_pi = keep * pos * (g_xhat @ pn["W_dec"].T)
  _assert_grads_close(g, {"W_enc": x.T @ g_pi, "b_enc": g_pi.sum(0), "b_dec": g_xhat.sum(0),
                          "W_dec": f.T @ g_xhat})
  never = ~keep.any(0)
  assert never.any() and not np.any(np.asarray(g["b_enc"])[never])

  # AuxK alone: only the dead latents it picked learn, against a fixed residual e = x − x̂.
  alpha = 0.5
  _, g_both = _topk_loss(p, x, alpha=alpha)
  g_aux = jax.tree.map(lambda a, b: a - b, g_both, g)
  e = x - x_hat
  den = np.sum((e - e.mean(0)) ** 2)
  g_ehat = alpha * 2 * (z @ pn["W_dec"] - e) / den
  g_pi_aux = keep_aux * pos * (g_ehat @ pn["W_dec"].T)
  _assert_grads_close(g_aux, {"W_enc": x.T @ g_pi_aux, "b_enc": g_pi_aux.sum(0),
                              "b_dec": np.zeros(D), "W_dec": z.T @ g_ehat})
  assert not np.any(np.asarray(g_aux["b_enc"])[~DEAD])
  assert not np.any(np.asarray(g_aux["W_dec"])[~DEAD])


# ----------------------------------------------------------------------------- BatchTopK

def _batchtopk_ref(p, x, k):
  """The batch's B·k largest ReLU'd pre-activations kept (numpy, no ties in test data)."""
  pre = np.maximum(x @ p["W_enc"] + p["b_enc"], 0)
  flat = pre.reshape(-1)
  keep = np.zeros(flat.shape, bool)
  keep[np.argsort(-flat)[:len(x) * k]] = True
  keep = keep.reshape(pre.shape) & (pre > 0)
  return np.where(keep, pre, 0), keep, pre[keep].min()


_batchtopk_vg = jax.jit(jax.value_and_grad(
    lambda p, x, dead: baselines.batchtopk_loss(p, x, k=K, k_aux=K_AUX, aux_coefficient=0.5,
                                                dead_F=dead), has_aux=True))


def _batchtopk_params():
  p = _perturbed(baselines.batchtopk_init, seed=7)
  p["b_enc"] = p["b_enc"] + 0.5
  return p


def test_batchtopk_keeps_the_batch_top_and_matches_numpy():
  p, x = _batchtopk_params(), _x()
  f, pre, min_kept = baselines.batchtopk_encode(p, x, k=K)
  f_np, keep, min_np = _batchtopk_ref(_np(p), x, K)
  np.testing.assert_allclose(f, f_np, rtol=1e-5, atol=1e-6)
  assert np.sum(keep) == B * K and len(set(keep.sum(1))) > 1  # k on average, not per row
  np.testing.assert_allclose(min_kept, min_np, rtol=1e-6)
  (loss, aux), _ = _batchtopk_vg(p, x, jnp.asarray(DEAD))
  pn = _np(p)
  x_hat = f_np @ pn["W_dec"] + pn["b_dec"]
  # The loss is TopK's with the batch's selection: recon + α·AuxK on the same residual.
  dead_pre = np.where(DEAD, np.maximum(x @ pn["W_enc"] + pn["b_enc"], 0), -1.0)
  z, _ = _keep_top(dead_pre, K_AUX)
  z = np.where(DEAD, z, 0)
  e = x - x_hat
  auxk = np.sum((e - z @ pn["W_dec"]) ** 2) / np.sum((e - e.mean(0)) ** 2)
  np.testing.assert_allclose(loss, np.mean(np.sum(e**2, 1)) + 0.5 * auxk, rtol=1e-5)
  np.testing.assert_allclose(aux["min_kept"], min_np, rtol=1e-6)
  np.testing.assert_allclose(np.mean(aux["l0_B"]), K)


def test_batchtopk_grads_flow_only_through_kept_entries_and_not_to_threshold():
  p, x = _batchtopk_params(), _x()
  _, g = _batchtopk_vg(p, x, jnp.zeros(F, bool))
  pn = _np(p)
  f, keep, _ = _batchtopk_ref(pn, x, K)
  g_xhat = 2 * (f @ pn["W_dec"] + pn["b_dec"] - x) / B
  g_pi = keep * (g_xhat @ pn["W_dec"].T)
  _assert_grads_close(g, {"W_enc": x.T @ g_pi, "b_enc": g_pi.sum(0), "b_dec": g_xhat.sum(0),
                          "W_dec": f.T @ g_xhat, "threshold": np.zeros(F)})


def test_batchtopk_traced_k_matches_static_k():
  p, x = _batchtopk_params(), _x()
  traced = jax.jit(lambda k: baselines.batchtopk_encode(p, x, k=k)[::2])
  static = jax.jit(lambda k: baselines.batchtopk_encode(p, x, k=k)[::2], static_argnums=0)
  for k in (1, 2, 4):
    for a, b in zip(traced(jnp.int32(k)), static(k)):
      np.testing.assert_array_equal(a, b)


def test_batchtopk_threshold_is_a_running_mean_of_the_smallest_kept():
  theta = jnp.zeros(F)
  theta = baselines.batchtopk_threshold(theta, 0.8, 0.9, True)  # the first step: taken as is
  np.testing.assert_allclose(theta, 0.8)
  theta = baselines.batchtopk_threshold(theta, 0.3, 0.9, False)
  np.testing.assert_allclose(theta, 0.9 * 0.8 + 0.1 * 0.3, rtol=1e-6)


def test_kth_largest_is_exact_with_ties_zeros_and_traced_n():
  rng = np.random.default_rng(8)
  v = np.maximum(rng.normal(size=(7, 13)), 0).astype(np.float32)  # many exact zeros
  v[2, :4] = v[0, 0]  # ties
  ranked = np.sort(v.reshape(-1))[::-1]
  kth = jax.jit(baselines._kth_largest)
  for n in (1, 5, 20, int(np.sum(v > 0)), v.size):
    assert kth(v, jnp.int32(n)) == ranked[n - 1], n
