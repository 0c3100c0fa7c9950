"""The per-feature adaptive bandwidth (bandwidth.py): the rule against hand-computed values, the
STE with one ε per feature against the scalar-ε STE and the smoothed objective (jitted and not,
vmapped), and training with it in an ensemble and across a resume."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jumprelu import bandwidth, data, ops, run, sae, sharding, sweep, train
from tests.conftest import tiny
from tests.test_ops import _cdf, _first_moment

# Silverman's 1.06 times the canonical-bandwidth ratio (R(K)/μ₂(K)²)^(1/5) / (R(φ)/1)^(1/5),
# written out: rectangle R = 1, μ₂ = 1/12; triangle R = 2/3, μ₂ = 1/6; Gaussian R = 1/(2√π).
_GAUSS = (1 / (2 * math.sqrt(math.pi))) ** 0.2
C_RECT = 1.06 * 144 ** 0.2 / _GAUSS  # 3.6889
C_TRI = 1.06 * 24 ** 0.2 / _GAUSS  # 2.5779


def test_silverman_constants():
  assert bandwidth.SILVERMAN["gaussian"] == 1.06
  assert bandwidth.SILVERMAN["rectangle"] == pytest.approx(C_RECT, rel=1e-12)
  assert bandwidth.SILVERMAN["triangle"] == pytest.approx(C_TRI, rel=1e-12)
  assert C_RECT == pytest.approx(3.6889, abs=1e-4)


def _batch():
  """Pre-activations [4, 3] at θ = (1, 0.5, 2) and what falls in each window |π − θ| < θ."""
  theta = jnp.array([1.0, 0.5, 2.0])
  pre = jnp.array([[0.5, 0.2, 0.0],
                   [1.5, 0.4, 4.5],
                   [3.0, 0.9, 0.0],
                   [0.0, 5.0, 6.0]])
  # feature 0: 0.5, 1.5 (offsets −0.5, 0.5): n 2, σ 0.5;  feature 1: 0.2, 0.4, 0.9 (offsets
  # −0.3, −0.1, 0.4): n 3, σ² = 0.26/3;  feature 2: none (0 is not a pre-activation, 4.5 > 4)
  return pre, theta


def test_rule_matches_hand_computed_values():
  pre, theta = _batch()
  stats = bandwidth.update({k: jnp.zeros(3) for k in bandwidth.STAT_KEYS}, pre, theta,
                           window=1.0, decay=0.0)
  np.testing.assert_allclose(stats["bw_count"], [2, 3, 0])
  np.testing.assert_allclose(stats["bw_sum"], [0.0, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(stats["bw_sumsq"], [0.5, 0.26, 0.0], rtol=1e-6)
  eps = bandwidth.epsilon(stats, theta, 1, 0.001, kernel="rectangle", scale=0.25, window=1.0,
                          decay=0.0, min_count=1.0)
  expected = [0.25 * C_RECT * 0.5 * 2 ** -0.2,  # 0.4014, under the cap θ = 1
              min(0.25 * C_RECT * math.sqrt(0.26 / 3) * 3 ** -0.2, 0.5),  # 0.2187
              0.001]  # no samples: the fixed ε
  np.testing.assert_allclose(eps, expected, rtol=1e-5)
  # At scale 1 feature 0's rule (1.606) is capped at window·θ = 1; min_count 2.5 leaves only
  # feature 1 on the rule.
  eps = bandwidth.epsilon(stats, theta, 1, 0.001, kernel="rectangle", scale=1.0, window=1.0,
                          decay=0.0, min_count=2.5)
  np.testing.assert_allclose(eps, [0.001, min(C_RECT * math.sqrt(0.26 / 3) * 3 ** -0.2, 0.5),
                                   0.001], rtol=1e-5)


def test_moving_average_is_bias_corrected():
  """Two batches at decay 0.5: count EMA 0.25·n₁ + 0.5·n₂ over 1 − 0.5² gives the mean count."""
  pre, theta = _batch()
  zeros = {k: jnp.zeros(3) for k in bandwidth.STAT_KEYS}
  s1 = bandwidth.update(zeros, pre, theta, window=1.0, decay=0.5)
  s2 = bandwidth.update(s1, pre * jnp.array([1.0, 1.0, 0.0]), theta, window=1.0, decay=0.5)
  np.testing.assert_allclose(s2["bw_count"], [0.25 * 2 + 0.5 * 2, 0.25 * 3 + 0.5 * 3, 0.0])
  eps = bandwidth.epsilon(s2, theta, 2, 0.001, kernel="gaussian", scale=1.0, window=1.0,
                          decay=0.5, min_count=1.0)
  # n = (0.25·2 + 0.5·2)/0.75 = 2 exactly; σ unchanged (the same offsets twice)
  np.testing.assert_allclose(eps[0], 1.06 * 0.5 * 2 ** -0.2, rtol=1e-5)
  # Before any batch (step 0) every feature uses the fixed ε.
  np.testing.assert_allclose(bandwidth.epsilon(zeros, theta, 0, 0.003, kernel="gaussian",
                                               scale=1.0, window=1.0, decay=0.5, min_count=0.0),
                             [0.003] * 3)


# ----------------------------------------------------------------------------- the STE with ε [F]

@pytest.fixture
def z_theta_eps():
  rng = np.random.default_rng(0)
  z = rng.uniform(-0.2, 1.0, size=(256, 6))
  theta = rng.uniform(0.2, 0.6, size=(6,)).astype(np.float32)
  eps = np.array([0.02, 0.05, 0.1, 0.15, 0.2, 0.3], np.float32)
  u = (z - theta) / eps  # keep z off the kernels' kinks, where a difference quotient means nothing
  near_kink = np.min(np.abs(u[..., None] - np.array([-1, -0.5, 0, 0.5, 1])), axis=-1) < 0.02
  z = np.where(near_kink, z + 0.05 * eps, z).astype(np.float32)
  return z, theta, eps


def _theta_grads(fn, z, theta, eps, kernel):
  return jax.grad(lambda t: jnp.sum(fn(z, t, eps, kernel)))(theta)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kernel", ops.KERNELS)
def test_per_feature_eps_is_the_scalar_ste_feature_by_feature(z_theta_eps, kernel, jit):
  z, theta, eps = z_theta_eps
  grads = jax.jit(_theta_grads, static_argnums=(0, 4)) if jit else _theta_grads
  for fn in (ops.jumprelu, ops.step):
    per_feature = grads(fn, z, theta, jnp.asarray(eps), kernel)
    for i, e in enumerate(eps):
      scalar = grads(fn, z, theta, float(e), kernel)
      np.testing.assert_allclose(per_feature[i], scalar[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kernel", ops.KERNELS)
def test_per_feature_eps_matches_finite_difference_of_smoothed_objective(z_theta_eps, kernel,
                                                                        jit):
  """The smoothed objectives of tests/test_ops.py with ε_i per column: Σ CDF((z − θ)/ε) for the
  step, Σ [z·CDF(a) − ε·M₁(a)] for the JumpReLU; their θ-derivatives are Eq. 11–12 exactly."""
  z, theta, eps = z_theta_eps
  z64, e64, h = z.astype(np.float64), eps.astype(np.float64), 1e-4
  smoothed_step = lambda t: np.sum(_cdf(kernel, (z64 - t) / e64), axis=0)
  smoothed_jr = lambda t: np.sum(z64 * _cdf(kernel, (z64 - t) / e64)
                                 - e64 * _first_moment(kernel, (z64 - t) / e64), axis=0)
  grads = jax.jit(_theta_grads, static_argnums=(0, 4)) if jit else _theta_grads
  for fn, smoothed in ((ops.jumprelu, smoothed_jr), (ops.step, smoothed_step)):
    fd = (smoothed(theta + h) - smoothed(theta - h)) / (2 * h)
    np.testing.assert_allclose(grads(fn, z, theta, jnp.asarray(eps), kernel), fd, rtol=1e-3,
                               atol=2e-2)


def _sae_case():
  key = jax.random.key(0)
  params = sae.init(key, 8, 16, threshold_init=0.3)
  params["b_enc"] = jnp.full((16,), 0.1)
  x = jax.random.normal(jax.random.key(1), (128, 8))
  eps_F = jnp.linspace(0.05, 0.4, 16)
  return params, x, eps_F


@pytest.mark.parametrize("jit", [False, True])
def test_sae_loss_backward_with_per_feature_eps(jit):
  """sae.loss's hand-written backward pass with ε [F]: θ's gradient is the scalar-ε one feature by
  feature, and every other gradient does not depend on ε."""
  params, x, eps_F = _sae_case()
  g = lambda e: jax.grad(lambda p: sae.loss(p, x, sparsity_coefficient=0.1, bandwidth=e)[0])(
      params)
  g = jax.jit(g) if jit else g
  per_feature = g(eps_F)
  for i in (0, 15):
    scalar = g(eps_F[i])
    np.testing.assert_allclose(per_feature["log_threshold"][i], scalar["log_threshold"][i],
                               rtol=1e-5, atol=1e-7)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
      np.testing.assert_allclose(per_feature[name], scalar[name], rtol=1e-6, atol=1e-7)
  assert np.count_nonzero(np.asarray(per_feature["log_threshold"])) > 8  # the test sees signal


def test_vmapped_per_feature_eps_is_each_members_own():
  """An ensemble's [S, F] bandwidths, vmapped, give each member its own unvmapped gradient."""
  params, x, eps_F = _sae_case()
  eps_SxF = jnp.stack([eps_F, eps_F[::-1], 0.5 * eps_F])
  g = lambda e: jax.grad(lambda p: sae.loss(p, x, sparsity_coefficient=0.1, bandwidth=e)[0])(
      params)["log_threshold"]
  batched = jax.jit(jax.vmap(g))(eps_SxF)
  for s in range(3):
    np.testing.assert_allclose(batched[s], g(eps_SxF[s]), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- training with it

def _adaptive(**overrides):
  return tiny(**{"sae.bandwidth_rule": "adaptive", "train.prefetch": 0, **overrides})


def test_train_step_uses_the_rule_and_carries_its_statistics():
  c = _adaptive()
  source, _ = run.make_source(c)
  state = train.init_state(c, jax.random.key(0), 1.0)
  theta = sae.threshold(state.params)
  x0 = jnp.asarray(source.batch(0, c.train.batch_size))
  pre = sae.pre_activations(state.params, x0)
  step = jax.jit(lambda s, x: train.train_step(c, s, x))
  state, m0 = step(state, x0)
  assert float(m0["bandwidth_mean"]) == pytest.approx(c.sae.bandwidth)  # step 0: fixed ε
  expected = bandwidth.config_update(c, bandwidth.init(c), pre, theta)
  for k in bandwidth.STAT_KEYS:
    np.testing.assert_allclose(state.bandwidth_stats[k], expected[k], rtol=1e-5, atol=1e-7)
  eps_F = bandwidth.config_epsilon(c, state.bandwidth_stats, sae.threshold(state.params), 1,
                                   c.sae.bandwidth)
  state, m1 = step(state, jnp.asarray(source.batch(1, c.train.batch_size)))
  assert float(m1["bandwidth_mean"]) == pytest.approx(float(jnp.mean(eps_F)), rel=1e-5)
  assert float(m1["bandwidth_mean"]) > 10 * c.sae.bandwidth  # the rule, not the fixed ε


def test_fixed_rule_keeps_the_train_state_layout():
  """With the fixed rule the state holds no bandwidth leaves (old checkpoints still restore)."""
  state = jax.eval_shape(lambda: train.init_state(tiny(), jax.random.key(0), 1.0))
  assert state.bandwidth_stats == {}
  adaptive = jax.eval_shape(lambda: train.init_state(_adaptive(), jax.random.key(0), 1.0, 3))
  assert {k: v.shape for k, v in adaptive.bandwidth_stats.items()} == {
      k: (3, 64) for k in bandwidth.STAT_KEYS}
  mesh = sharding.make_mesh(2, 4)
  specs = sharding.tree_shardings(mesh, adaptive)
  assert all(s.spec == jax.sharding.PartitionSpec(None, "model")
             for s in specs.bandwidth_stats.values())


def test_ensemble_member_is_the_run_of_that_member_alone():
  c = _adaptive(**{"sweep.sparsity_coefficient": (0.01, 0.05)})
  source, _ = run.make_source(c)
  members = sweep.grid(c)
  hp_S = sweep.stacked_hparams(members)
  ens = train.init_state(c, jax.random.key(0), 1.0, len(members))
  ens_step = jax.jit(lambda s, x: train.ensemble_step(c, s, x, hp_S))
  singles = [train.init_state(sweep.member_config(c, hp), jax.random.key(0), 1.0)
             for _, hp in members]
  single_steps = [jax.jit(lambda s, x, mc=sweep.member_config(c, hp): train.train_step(mc, s, x))
                  for _, hp in members]
  for t in range(4):
    x = jnp.asarray(source.batch(t, c.train.batch_size))
    ens, _ = ens_step(ens, x)
    singles = [f(s, x)[0] for f, s in zip(single_steps, singles)]
  for i, single in enumerate(singles):
    mine = train.member_state(ens, i)
    for k in bandwidth.STAT_KEYS:
      np.testing.assert_allclose(mine.bandwidth_stats[k], single.bandwidth_stats[k], rtol=1e-4,
                                 atol=1e-5)
    np.testing.assert_allclose(sae.threshold(mine.params), sae.threshold(single.params),
                               rtol=1e-4, atol=1e-5)


def test_interrupted_then_resumed_ensemble_ends_bit_identical(tmp_path, monkeypatch):
  """A run stopped after its step-5 checkpoint and rerun ends with the same state, bandwidth
  statistics included, as one that was never stopped."""
  c = _adaptive(**{"sweep.sparsity_coefficient": (0.01, 0.05), "train.num_steps": 8})
  mesh = sharding.make_mesh(1, 1)
  ref, _ = train.fit(c, str(tmp_path / "ref"), run.make_source(c)[0], mesh)

  real_batch = data.ActivationSource.batch

  def fail_at_8(self, step, *a, **k):
    if step == 7:
      raise RuntimeError("simulated crash at step 7")
    return real_batch(self, step, *a, **k)

  monkeypatch.setattr(data.ActivationSource, "batch", fail_at_8)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.fit(c, str(tmp_path / "run"), run.make_source(c)[0], mesh)
  monkeypatch.setattr(data.ActivationSource, "batch", real_batch)
  resumed, _ = train.fit(c, str(tmp_path / "run"), run.make_source(c)[0], mesh)
  assert int(resumed.step) == int(ref.step) == c.train.num_steps
  assert set(resumed.bandwidth_stats) == set(bandwidth.STAT_KEYS)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_bad_bandwidth_keys_are_refused_before_compute():
  from jumprelu import validate
  with pytest.raises(ValueError, match="sae.bandwidth_rule must be one of"):
    validate.check_config(tiny(**{"sae.bandwidth_rule": "silverman"}))
  with pytest.raises(ValueError, match="sae.bandwidth_decay must be in"):
    validate.check_config(_adaptive(**{"sae.bandwidth_decay": 1.0}))
  with pytest.raises(ValueError, match="train.step_impl must be 'dense' or 'auto' with"):
    validate.check_config(_adaptive(**{"train.step_impl": "sparse"}))
