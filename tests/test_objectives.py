"""The sparsity objectives of objectives.py against hand-computed values and finite differences of
the smoothed objective (jitted and not), in a vmapped ensemble, and trained end to end."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jumprelu import baselines, objectives, ops, run, sae, sweep, validate
from tests.conftest import tiny

EPS = 0.1  # bandwidth: wide enough that many z fall in the window
B, F = 256, 8


def _clear_of_kinks(z, theta):
  """z moved off the rectangle kernel's edges and off θ itself, where a finite difference
  straddles a corner."""
  u = (z - theta) / EPS
  near = np.min(np.abs(u[..., None] - np.array([-0.5, 0.0, 0.5])), axis=-1) < 0.02
  return np.where(near, z + 0.05 * EPS, z).astype(np.float32)


@pytest.fixture
def z_theta_scale():
  rng = np.random.default_rng(0)
  theta = rng.uniform(0.2, 0.6, size=(F,)).astype(np.float32)
  z = _clear_of_kinks(rng.uniform(-0.2, 1.0, size=(B, F)), theta)
  scale = rng.uniform(1.0, 4.0, size=(F,)).astype(np.float32)
  return z, theta, scale


def _rect(u):
  return ((u > -0.5) & (u < 0.5)).astype(np.float64)


def _maybe_jit(fn, jit):
  return jax.jit(fn) if jit else fn


# ----------------------------------------------------------------------------- tanh estimator

def _smoothed_tanh(z, theta, scale):
  """Σ_b ∫_θ^∞ tanh(s·t)·K((z_b − t)/ε)/ε dt for the rectangle K, in closed form: the KDE
  estimate of E[tanh(s·z)·H(z − θ)], whose θ-derivative is −tanh(s·θ)·Σ K((z − θ)/ε)/ε."""
  lo, hi = np.maximum(theta, z - EPS / 2), z + EPS / 2
  log_cosh = lambda t: np.log(np.cosh(scale * t)) / (scale * EPS)  # ∫ tanh(s·t)/ε dt
  return np.sum(np.where(lo < hi, log_cosh(hi) - log_cosh(lo), 0.0), axis=0)


@pytest.mark.parametrize("jit", [False, True])
def test_tanh_penalty_value_and_estimator_match_hand_computed(z_theta_scale, jit):
  z, theta, scale = z_theta_scale
  fn = lambda zz, t, s: jnp.sum(objectives.tanh_jumprelu(zz, t, s, EPS))
  np.testing.assert_allclose(_maybe_jit(fn, jit)(z, theta, scale),
                             np.sum(np.tanh(scale * z * (z > theta))), rtol=1e-5)
  g_z, g_t, g_s = _maybe_jit(jax.grad(fn, argnums=(0, 1, 2)), jit)(z, theta, scale)
  z64 = z.astype(np.float64)
  on = z64 > theta
  sech2 = 1 - np.tanh(scale * z64) ** 2
  k = _rect((z64 - theta) / EPS)
  np.testing.assert_allclose(g_t, -(np.tanh(scale * theta) / EPS) * k.sum(0), rtol=1e-4)
  np.testing.assert_allclose(g_z, on * scale * sech2, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_s, np.sum(on * z64 * sech2, 0), rtol=1e-4)


@pytest.mark.parametrize("jit", [False, True])
def test_tanh_estimator_matches_finite_difference_of_smoothed_objective(z_theta_scale, jit):
  z, theta, scale = z_theta_scale
  z64, h = z.astype(np.float64), 1e-4
  g_t = _maybe_jit(jax.grad(lambda t: jnp.sum(objectives.tanh_jumprelu(z, t, scale, EPS))),
                   jit)(theta)
  fd = (_smoothed_tanh(z64, theta + h, scale) - _smoothed_tanh(z64, theta - h, scale)) / (2 * h)
  np.testing.assert_allclose(g_t, fd, rtol=1e-3, atol=1e-2)
  assert np.all(np.abs(fd) > 1.0)  # every feature has pre-activations in its window
  # Toward z and s there is no jump to smooth: the true derivative of tanh(s·z·H(z − θ)).
  exact = lambda zz, s: np.sum(np.tanh(s * zz * (zz > theta)))
  g_z, g_s = _maybe_jit(jax.grad(
      lambda zz, s: jnp.sum(objectives.tanh_jumprelu(zz, theta, s, EPS)), argnums=(0, 1)),
      jit)(z, scale)
  dz = np.zeros_like(z64)
  dz[3, 2] = h
  np.testing.assert_allclose(g_z[3, 2], (exact(z64 + dz, scale) - exact(z64 - dz, scale))
                             / (2 * h), rtol=1e-3, atol=1e-6)
  ds = np.zeros(F)
  ds[5] = h
  np.testing.assert_allclose(g_s[5], (exact(z64, scale + ds) - exact(z64, scale - ds)) / (2 * h),
                             rtol=1e-3)


def test_tanh_estimator_differs_from_the_chain_rule_through_eq11_only_at_second_order():
  """SAELens / Anthropic reach θ through Eq. 11, i.e. jump height s·θ·(1 − tanh²(s·f)); ours is
  tanh(s·θ). Both agree as s·θ → 0."""
  theta = jnp.full((F,), 0.01)
  z = jnp.asarray(np.random.default_rng(1).uniform(0.0, 0.02, (B, F)), jnp.float32)
  ours = jax.grad(lambda t: jnp.sum(objectives.tanh_jumprelu(z, t, jnp.ones(F), 0.01)))(theta)
  chain = jax.grad(lambda t: jnp.sum(jnp.tanh(ops.jumprelu(z, t, 0.01))))(theta)
  np.testing.assert_allclose(ours, chain, rtol=1e-3)


# ----------------------------------------------------------------------------- target L0

def _l0_bar(z, theta):
  return np.mean(np.sum(z > theta, axis=1))


def _smoothed_l0_bar(z, theta):
  return np.mean(np.sum(np.clip((z - theta) / EPS + 0.5, 0.0, 1.0), axis=1))


@pytest.mark.parametrize("jit", [False, True])
def test_target_l0_penalty_value_gradient_and_smoothed_fd(z_theta_scale, jit):
  z, theta, _ = z_theta_scale
  lam, target = 0.7, 2.5

  def penalty(t, target):
    l0 = jnp.mean(jnp.sum(ops.step(z, t, EPS), axis=-1))
    return lam * objectives.target_l0_penalty(l0, target)

  l0 = _l0_bar(z, theta)
  assert abs(l0 - target) > 1.0  # the penalty bites
  np.testing.assert_allclose(_maybe_jit(penalty, jit)(theta, target),
                             lam * (l0 / target - 1) ** 2, rtol=1e-5)
  g = _maybe_jit(jax.grad(penalty), jit)(theta, target)
  k = _rect((z.astype(np.float64) - theta) / EPS)
  hand = lam * 2 * (l0 / target - 1) / target * -(k.sum(0) / (B * EPS))
  np.testing.assert_allclose(g, hand, rtol=1e-4)
  # The smoothed objective λ·(L̄_s/L0* − 1)² replaces H by the kernel's CDF; the estimator takes
  # its outer derivative at the hard L̄ instead of L̄_s, a relative difference of
  # |L̄ − L̄_s| / |L̄ − L0*| (< 1% here).
  h, z64 = 1e-4, z.astype(np.float64)
  smoothed = lambda t: lam * (_smoothed_l0_bar(z64, t) / target - 1) ** 2
  fd = np.array([(smoothed(theta + h * e) - smoothed(theta - h * e)) / (2 * h)
                 for e in np.eye(F)])
  gap = abs(l0 - _smoothed_l0_bar(z64, theta)) / abs(l0 - target)
  assert gap < 0.01
  np.testing.assert_allclose(g, fd, rtol=2 * gap + 1e-3)


# ----------------------------------------------------------------------------- frequency penalty

@pytest.fixture
def z_theta_rates():
  """Features firing on 5% … 75% of rows, none within 4 rows of τ·B (τ = 0.3)."""
  rng = np.random.default_rng(2)
  rates = np.array([0.05, 0.15, 0.22, 0.38, 0.45, 0.55, 0.65, 0.75])
  theta = np.full((F,), 0.5, np.float32)
  z = np.where(rng.random((B, F)) < rates, rng.uniform(0.5, 0.7, (B, F)),
               rng.uniform(0.3, 0.5, (B, F)))
  return _clear_of_kinks(z, theta), theta


@pytest.mark.parametrize("jit", [False, True])
def test_frequency_penalty_value_gradient_and_smoothed_fd(z_theta_rates, jit):
  z, theta = z_theta_rates
  mu, tau = 0.4, 0.3
  penalty = lambda t: mu * objectives.frequency_penalty(ops.step(z, t, EPS), tau)
  p = np.mean(z > theta, axis=0)
  assert np.all(np.abs(p - tau) > 4 / B) and np.any(p > tau) and np.any(p < tau)
  np.testing.assert_allclose(_maybe_jit(penalty, jit)(theta), mu * np.sum(np.maximum(p - tau, 0)),
                             rtol=1e-5)
  g = _maybe_jit(jax.grad(penalty), jit)(theta)
  k = _rect((z.astype(np.float64) - theta) / EPS)
  np.testing.assert_allclose(g, mu * (p > tau) * -(k.sum(0) / (B * EPS)), rtol=1e-4, atol=1e-7)
  assert not np.any(np.asarray(g)[p < tau])  # features below τ pay nothing
  # Smoothed: H → the kernel's CDF; the hinge is linear on each side, so the match is exact.
  h, z64 = 1e-4, z.astype(np.float64)
  smoothed = lambda t: mu * np.sum(np.maximum(
      np.mean(np.clip((z64 - t) / EPS + 0.5, 0, 1), axis=0) - tau, 0))
  fd = np.array([(smoothed(theta + h * e) - smoothed(theta - h * e)) / (2 * h)
                 for e in np.eye(F)])
  np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- pre-activation loss

@pytest.mark.parametrize("jit", [False, True])
def test_pre_act_penalty_value_and_gradient(z_theta_scale, jit):
  z, theta, norms = z_theta_scale
  fn = lambda zz, t, n: jnp.mean(objectives.pre_act_penalty_B(zz, t, n))
  z64 = z.astype(np.float64)
  below = z64 < theta
  np.testing.assert_allclose(_maybe_jit(fn, jit)(z, theta, norms),
                             np.mean(np.maximum(theta - z64, 0) @ norms), rtol=1e-5)
  g_z, g_t, g_n = _maybe_jit(jax.grad(fn, argnums=(0, 1, 2)), jit)(z, theta, norms)
  np.testing.assert_allclose(g_z, -(below * norms) / B, rtol=1e-5)
  np.testing.assert_allclose(g_t, np.sum(below, 0) * norms / B, rtol=1e-5)
  np.testing.assert_allclose(g_n, np.mean(np.maximum(theta - z64, 0), 0), rtol=1e-5)


# ----------------------------------------------------------------------------- the whole loss

D = 6


def _params(threshold_param="log", seed=0):
  p = sae.init(jax.random.key(seed), D, F, threshold_init=0.3, threshold_param=threshold_param)
  rng = np.random.default_rng(seed)
  p["b_enc"] = jnp.asarray(rng.normal(0, 0.3, F), jnp.float32)
  p["b_dec"] = jnp.asarray(rng.normal(0, 0.1, D), jnp.float32)
  p["W_dec"] = p["W_dec"] * jnp.linspace(0.5, 1.5, F)[:, None]  # the norm weighting shows
  return p


def _x(seed=1, n=64):
  return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


@pytest.mark.parametrize("threshold_param", ["log", "raw"])
def test_l0_objective_is_the_papers_loss(threshold_param):
  """objectives.jumprelu_loss("l0") by autodiff = sae.loss with its hand-written backward."""
  p, x = _params(threshold_param), _x()
  kw = {"sparsity_coefficient": 0.3, "bandwidth": 0.2}
  (la, aux_a), ga = jax.value_and_grad(lambda q: objectives.jumprelu_loss(q, x, **kw),
                                       has_aux=True)(p)
  (lb, aux_b), gb = jax.value_and_grad(lambda q: sae.loss(q, x, **kw), has_aux=True)(p)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  for key in ("recon_B", "l0_B", "f_BxF"):
    np.testing.assert_allclose(aux_a[key], aux_b[key], rtol=1e-6, atol=1e-7)
  for key in gb:
    np.testing.assert_allclose(ga[key], gb[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("sparsity_loss", objectives.SPARSITY_LOSSES)
def test_jumprelu_loss_matches_numpy(sparsity_loss):
  p, x = _params(), _x()
  lam, target, c_tanh, lam_p, mu, tau = 0.3, 2.0, 4.0, 0.05, 0.2, 0.3
  loss, aux = objectives.jumprelu_loss(
      p, x, sparsity_coefficient=lam, bandwidth=0.01, sparsity_loss=sparsity_loss,
      target_l0=target, tanh_scale=c_tanh, pre_act_coefficient=lam_p,
      frequency_coefficient=mu, frequency_max=tau)
  pn = {k: np.asarray(v, np.float64) for k, v in p.items()}
  theta = np.exp(pn["log_threshold"])
  zz = x @ pn["W_enc"] + pn["b_enc"]
  pre = np.maximum(zz, 0)
  on = pre > theta
  f = pre * on
  recon = np.sum((x - f @ pn["W_dec"] - pn["b_dec"]) ** 2, 1)
  norms = np.linalg.norm(pn["W_dec"], axis=1)
  l0 = np.mean(on.sum(1))
  sparsity = {"l0": lam * l0, "target_l0": lam * (l0 / target - 1) ** 2,
              "tanh": lam * np.mean(np.sum(np.tanh(c_tanh * f * norms), 1))}[sparsity_loss]
  freq = np.mean(on, 0)
  assert np.any(freq > tau) and np.any(zz < theta)  # every term is exercised
  expected = (np.mean(recon) + sparsity + lam_p * np.mean(np.maximum(theta - zz, 0) @ norms)
              + mu * np.sum(np.maximum(freq - tau, 0)))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(aux["sparsity"], sparsity, rtol=1e-5)
  np.testing.assert_array_equal(aux["l0_B"], on.sum(1))


@pytest.mark.parametrize("sparsity_loss", ["target_l0", "tanh"])
def test_ensemble_gradients_equal_each_member_alone(sparsity_loss):
  """vmapped over (λ, ε, target L0), as sweep.py trains a grid, every member's gradient is its
  own; jitted once."""
  p, x = _params(), _x()
  grad = lambda lam, eps, target: jax.grad(lambda q: objectives.jumprelu_loss(
      q, x, sparsity_coefficient=lam, bandwidth=eps, sparsity_loss=sparsity_loss,
      target_l0=target, frequency_coefficient=0.1)[0])(p)
  lam_S, eps_S, target_S = (jnp.asarray(v, jnp.float32) for v in
                            ((0.1, 0.3, 0.3), (0.2, 0.2, 0.5), (2.0, 4.0, 1.0)))
  stacked = jax.jit(jax.vmap(grad))(lam_S, eps_S, target_S)
  for i in range(3):
    one = grad(float(lam_S[i]), float(eps_S[i]), float(target_S[i]))
    for key in one:
      np.testing.assert_allclose(stacked[key][i], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert np.any(stacked["log_threshold"][0] != stacked["log_threshold"][1])


# ----------------------------------------------------------------------------- Matryoshka

def _relu_matryoshka_ref(p, x, lam, prefixes):
  f = np.maximum(x @ p["W_enc"] + p["b_enc"], 0)
  recons = []
  for m in [*prefixes, F]:
    x_hat = f[:, :m] @ p["W_dec"][:m] + p["b_dec"]
    recons.append(np.sum((x - x_hat) ** 2, 1))
  return np.mean(np.mean(recons, 0) + lam * f @ np.linalg.norm(p["W_dec"], axis=1)), recons


@pytest.mark.parametrize("jit", [False, True])
def test_matryoshka_loss_and_gradient_match_numpy(jit):
  """With a ReLU SAE (smooth away from its kink) the Matryoshka loss and its gradient are
  checked against numpy and central differences."""
  prefixes, lam = (2, 5), 0.1
  p = baselines.relu_init(jax.random.key(3), D, F)
  p["b_enc"] = p["b_enc"] + 0.2
  p["W_dec"] = p["W_dec"] * jnp.linspace(0.5, 1.5, F)[:, None]
  x = _x(n=16)
  fn = lambda q: objectives.with_matryoshka(
      lambda r: baselines.relu_loss(r, x, sparsity_coefficient=lam), q, x, prefixes)
  (loss, aux), g = _maybe_jit(jax.value_and_grad(fn, has_aux=True), jit)(p)
  pn = {k: np.asarray(v, np.float64) for k, v in p.items()}
  expected, recons = _relu_matryoshka_ref(pn, x, lam, prefixes)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(aux["matryoshka_B"], np.mean(recons, 0), rtol=1e-5)
  np.testing.assert_allclose(aux["recon_B"], recons[-1], rtol=1e-5)  # the whole dictionary's
  assert recons[0].mean() > recons[1].mean() > recons[2].mean()
  h = 1e-5
  for name in ("W_dec", "b_enc"):
    fd = np.zeros_like(pn[name])
    for i in np.ndindex(fd.shape):
      hi, lo = dict(pn), dict(pn)
      hi[name], lo[name] = pn[name].copy(), pn[name].copy()
      hi[name][i] += h
      lo[name][i] -= h
      fd[i] = (_relu_matryoshka_ref(hi, x, lam, prefixes)[0]
               - _relu_matryoshka_ref(lo, x, lam, prefixes)[0]) / (2 * h)
    np.testing.assert_allclose(g[name], fd, rtol=1e-3, atol=2e-4, err_msg=name)


# ----------------------------------------------------------------------------- end to end

def _config(**kw):
  return tiny(**{"train.num_steps": 20, "optim.sparsity_warmup_steps": 10,
                 "optim.lr_warmup_steps": 5, "optim.learning_rate": 3e-3,
                 "log.tensorboard": False, **kw})


@pytest.mark.parametrize("overrides", [
    {"sae.sparsity_loss": "target_l0", "sae.sparsity_coefficient": 1.0,
     "sweep.target_l0": (2.0, 8.0)},
    {"sae.sparsity_loss": "tanh", "sae.pre_act_coefficient": 1e-3,
     "sae.frequency_coefficient": 0.1, "sae.matryoshka_prefixes": (16,),
     "sweep.sparsity_coefficient": (1e-3, 3e-2)},
], ids=["target_l0", "tanh"])
def test_ensemble_member_equals_training_it_alone(tmp_path, overrides):
  from jumprelu import export
  c = _config(**overrides)
  summary = run.train_and_evaluate(c, str(tmp_path / "sweep"))
  finals = []
  for name, hp in sweep.grid(c):
    alone = run.train_and_evaluate(sweep.member_config(c, hp), str(tmp_path / name))
    ours = export.load(str(tmp_path / "sweep" / "members" / name / "export" / "params.npz"))
    ref = export.load(str(tmp_path / name / "export" / "params.npz"))
    for key in ref:
      np.testing.assert_allclose(ours[key], ref[key], rtol=0, atol=1e-5, err_msg=key)
    assert summary["members"][name]["final"]["l0"] == pytest.approx(alone["final"]["l0"],
                                                                   abs=1e-3)
    finals.append(ref["threshold"])
  assert np.max(np.abs(finals[0] - finals[1])) > 1e-4  # the members trained differently


def test_target_l0_steers_l0_to_the_target(tmp_path):
  """Trained with the quadratic penalty, L0 ends near each target (raw θ, as short runs need)."""
  c = _config(**{"sae.sparsity_loss": "target_l0", "sae.sparsity_coefficient": 1.0,
                 "sweep.target_l0": (3.0, 12.0), "sae.threshold_param": "raw",
                 "train.num_steps": 600, "train.log_every": 100, "train.checkpoint_every": 600,
                 "optim.sparsity_warmup_steps": 100, "optim.learning_rate": 3e-3,
                 "data.synthetic.n_rows": 16384, "train.batch_size": 256})
  summary = run.train_and_evaluate(c, str(tmp_path))
  for name, hp in sweep.grid(c):
    l0 = summary["members"][name]["final"]["l0"]
    assert l0 == pytest.approx(hp["target_l0"], rel=0.25), (name, l0)


@pytest.mark.parametrize("overrides, message", [
    ({"sae.sparsity_loss": "tanh", "train.step_impl": "sparse"},
     "train.step_impl must be 'dense' with sae.sparsity_loss other than 'l0'"),
    ({"sae.matryoshka_prefixes": (8,), "train.step_impl": "sparse"},
     "train.step_impl must be 'dense' with"),
    ({"sae.arch": "topk", "sae.sparsity_loss": "tanh"},
     "sae.sparsity_loss must be 'l0' when sae.arch='topk'"),
    ({"sae.arch": "gated", "sae.frequency_coefficient": 0.1},
     "sae.frequency_coefficient must be 0 when sae.arch='gated'"),
    ({"sweep.target_l0": (4.0, 8.0)},
     "sweep.target_l0 must be empty unless sae.sparsity_loss='target_l0'"),
    ({"sae.sparsity_loss": "target_l0", "sweep.target_l0": (4.0, -1.0)},
     "sweep.target_l0 must be a tuple of distinct values > 0"),
    ({"sae.matryoshka_prefixes": (32, 16)}, "sae.matryoshka_prefixes must be a tuple of "
                                            "increasing ints in \\[1, sae.width=64\\)"),
    ({"sae.matryoshka_prefixes": (8, 64)}, "sae.matryoshka_prefixes must be"),
    ({"sae.sparsity_loss": "l1"}, "sae.sparsity_loss must be one of"),
    ({"sae.frequency_max": 1.0}, "sae.frequency_max must be in \\(0, 1\\)"),
])
def test_bad_objective_configs_are_refused(overrides, message):
  with pytest.raises(ValueError, match=message):
    validate.check_config(tiny(**overrides))


# ----------------------------------------------------------------------------- JumpReLU's AuxK

@pytest.mark.parametrize("jit", [False, True])
def test_jumprelu_auxk_is_topks_auxiliary_loss_on_its_dead_latents(jit):
  """sae.jumprelu_auxk = α: the paper's loss + α·AuxK (numpy), 0 with nothing dead, and its
  gradient reaches only the dead latents' encoder columns and decoder rows."""
  from jumprelu import arch
  alpha, k_aux = 0.5, 2
  p, x = _params("raw"), _x()
  dead = np.arange(F) % 3 == 0  # latents 0, 3, 6
  c = tiny(**{"sae.width": F, "sae.jumprelu_auxk": alpha, "sae.k_aux": k_aux,
              "sae.bandwidth": EPS, "train.step_impl": "dense"})
  hp = {"sparsity_coefficient": jnp.float32(0.1), "bandwidth": jnp.float32(EPS), "k": 0,
        "target_l0": jnp.float32(1.0), "warmup": jnp.float32(1.0)}
  vg = _maybe_jit(lambda q, d: arch.value_and_grad(c, q, x, hp, d), jit)
  (loss, aux), g = vg(p, jnp.asarray(dead))
  (paper, _), g_paper = jax.value_and_grad(lambda q: sae.loss(
      q, x, sparsity_coefficient=0.1, bandwidth=EPS), has_aux=True)(p)
  pn = {k: np.asarray(v, np.float64) for k, v in p.items()}
  pre = np.maximum(x @ pn["W_enc"] + pn["b_enc"], 0)
  e = x - np.asarray(aux["x_hat_BxD"], np.float64)
  ranked = np.where(dead, pre, -1.0)
  top = np.argsort(-ranked, axis=1)[:, :k_aux]
  z = np.zeros_like(pre)
  np.put_along_axis(z, top, np.take_along_axis(pre, top, 1), 1)
  z = np.where(dead, z, 0)
  auxk = np.sum((e - z @ pn["W_dec"]) ** 2) / np.sum((e - e.mean(0)) ** 2)
  assert auxk > 0.1 and np.any(z)
  np.testing.assert_allclose(aux["auxk"], auxk, rtol=1e-5)
  np.testing.assert_allclose(loss, paper + alpha * auxk, rtol=1e-5)
  g_aux = {k: np.asarray(g[k]) - np.asarray(g_paper[k]) for k in g}
  assert np.abs(g_aux["W_enc"][:, dead]).max() > 1e-4
  np.testing.assert_allclose(g_aux["W_enc"][:, ~dead], 0, atol=1e-6)
  np.testing.assert_allclose(g_aux["W_dec"][~dead], 0, atol=1e-6)
  np.testing.assert_allclose(g_aux["b_dec"], 0, atol=1e-6)  # the bias is the main loss's
  (loss0, aux0), _ = vg(p, jnp.zeros(F, bool))
  assert aux0["auxk"] == 0 and np.isclose(loss0, paper, rtol=1e-6)


def test_jumprelu_auxk_is_refused_where_it_would_be_ignored():
  for overrides, wanted in (({"sae.arch": "topk"}, "sae.jumprelu_auxk must be 0 when"),
                            ({"train.step_impl": "sparse"}, "train.step_impl must be 'dense'"),
                            ({"sae.jumprelu_auxk": -1.0}, "sae.jumprelu_auxk must be >= 0")):
    c = tiny(**{"sae.jumprelu_auxk": 0.03, **overrides})
    with pytest.raises(ValueError, match=wanted):
      validate.check_config(c)


def test_topk_start_trains_as_topk_then_as_the_jumprelu_objective():
  # sae.topk_start_steps = N: steps before N are TopK's (same update of the weights as a TopK
  # SAE with those weights), each sets every θ to the mean per-row smallest kept activation;
  # from N on the step is the configured JumpReLU's. Jitted and not, and in an ensemble.
  from jumprelu import train
  n, k = 3, 4
  kw = {"sae.threshold_param": "raw", "sae.k": k, "sae.k_aux": 16, "optim.grad_clip": 1.0,
        "train.step_impl": "dense", "sae.bandwidth": 0.5}
  c = tiny(**kw, **{"sae.topk_start_steps": n})
  step = lambda cfg: jax.jit(functools.partial(train.train_step, cfg))
  x = jax.random.normal(jax.random.key(1), (64, 16)) * 2.0
  state = train.init_state(c, jax.random.key(0), 2.0)
  weights = ("W_enc", "b_enc", "W_dec", "b_dec")
  as_topk = tiny(**{**kw, "sae.arch": "topk"})
  twin = train.init_state(as_topk, jax.random.key(0), 2.0)
  twin = twin.replace(params={w: state.params[w] for w in weights},
                      opt_state=train.optimizer(as_topk).init({w: state.params[w] for w in weights}))
  alone = jax.jit(lambda s, hp: train.train_step(c, s, x, hp))
  got, metrics = alone(state, train.config_hparams(c))
  want, want_metrics = step(as_topk)(twin, x)
  for w in weights:
    np.testing.assert_allclose(got.params[w], want.params[w], rtol=0, atol=1e-6, err_msg=w)
  assert metrics["loss"] == pytest.approx(float(want_metrics["loss"]), rel=1e-6)
  f = np.asarray(baselines.topk_encode(state.params, x / 2.0, k=k)[0])
  kept = np.where(f > 0, f, np.inf).min(axis=1)
  theta = np.mean(kept[np.isfinite(kept)])
  np.testing.assert_allclose(sae.threshold(got.params), theta, rtol=1e-5)
  # Not jitted: the same loss and gradients.
  from jumprelu import arch
  hp = {**train.config_hparams(c), "warmup": 0.0}
  args = (c, state.params, x / 2.0, hp, jnp.zeros(64, bool))
  (l1, _), g1 = arch.topk_start_value_and_grad(*args, jnp.int32(0))
  (l2, _), g2 = jax.jit(lambda: arch.topk_start_value_and_grad(*args, jnp.int32(0)))()
  assert float(l1) == pytest.approx(float(l2), rel=1e-6)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), g1, g2)
  # log θ is set to the log of the same threshold.
  c_log = tiny(**{**kw, "sae.threshold_param": "log", "sae.topk_start_steps": n})
  got_log, _ = step(c_log)(train.init_state(c_log, jax.random.key(0), 2.0), x)
  np.testing.assert_allclose(sae.threshold(got_log.params), theta, rtol=1e-5)
  # From step N on: the plain JumpReLU step, θ trained by its gradient, one per feature again.
  late = got.replace(step=jnp.asarray(n, jnp.int32))
  a, _ = alone(late, train.config_hparams(c))
  b, _ = step(tiny(**kw))(late, x)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=0, atol=1e-7), a.params,
               b.params)
  assert np.ptp(np.asarray(sae.threshold(a.params))) > 0
  # In an ensemble over λ, each member's step is its own alone, before and after N.
  members = sweep.grid(tiny(**kw, **{"sae.topk_start_steps": n,
                                     "sweep.sparsity_coefficient": (1e-3, 3e-2)}))
  hp_S = sweep.stacked_hparams(members)
  ensemble = jax.jit(lambda s: train.ensemble_step(c, s, x, hp_S))
  for start in (state, late):
    stacked = start.replace(params=sweep.stack(start.params, 2),
                            opt_state=sweep.stack(start.opt_state, 2),
                            tokens_since_fired=sweep.stack(start.tokens_since_fired, 2),
                            bandwidth_stats=sweep.stack(start.bandwidth_stats, 2))
    together, _ = ensemble(stacked)
    for i, (_, hp) in enumerate(members):
      jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=0, atol=1e-6),
                   sweep.take(together.params, i), alone(start, hp)[0].params)


@pytest.mark.parametrize("overrides, message", [
    ({"sae.topk_start_steps": 12}, r"sae.topk_start_steps must be in \[0, train.num_steps=12\)"),
    ({"sae.topk_start_steps": 2, "sae.arch": "topk"}, r"sae.topk_start_steps must be 0 when"),
    ({"sae.topk_start_steps": 2, "train.step_impl": "sparse"},
     r"train.step_impl must be 'dense' or 'auto' with sae.topk_start_steps"),
    ({"sae.topk_start_steps": 2, "sae.k": 8, "sae.k_aux": 512},  # tiny's width is 64
     r"sae.k_aux must be an int in \[1, sae.width=64\], got 512"),
])
def test_topk_start_is_refused_where_it_cannot_run(overrides, message):
  with pytest.raises(ValueError, match=message):
    validate.check_config(tiny(**overrides))


def test_raw_threshold_is_kept_non_negative_after_the_relu():
  # Below 0 a θ after the ReLU would make the L0 term count the ReLU's zeros on every token with
  # no gradient to bring it back; the step projects θ onto θ ≥ 0. Without the ReLU (an
  # ablation) a negative θ means something and is kept.
  from jumprelu import train
  x = jax.random.normal(jax.random.key(1), (64, 16))
  for pre_relu in (True, False):
    c = tiny(**{"sae.threshold_param": "raw", "sae.pre_relu": pre_relu,
                "train.step_impl": "dense"})
    state = train.init_state(c, jax.random.key(0), 1.0)
    theta = np.full(64, 0.2, np.float32)
    theta[:8] = -0.5
    state = state.replace(params={**state.params, "threshold": jnp.asarray(theta)})
    new, _ = jax.jit(functools.partial(train.train_step, c))(state, x)
    got = np.asarray(new.params["threshold"])
    assert np.all(got[8:] > 0.1)  # the others trained as usual
    if pre_relu:
      assert np.all(got[:8] == 0.0)
    else:
      assert np.all(got[:8] < -0.4)
