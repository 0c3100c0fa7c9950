"""The straight-through estimators against the paper's formulas and the smoothed objective."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jumprelu import ops

EPS = 0.1  # bandwidth: wide enough that many z fall in the window


def _cdf(kernel, a):
  """∫_{-∞}^a K(u) du, in float64, written out per kernel (independent of ops.kernel_fn)."""
  if kernel == "rectangle":
    return np.clip(a + 0.5, 0.0, 1.0)
  if kernel == "triangle":
    return np.where(a < -1, 0.0, np.where(a < 0, (1 + a) ** 2 / 2,
                                          np.where(a < 1, 1 - (1 - a) ** 2 / 2, 1.0)))
  return 0.5 * (1 + np.vectorize(math.erf)(a / math.sqrt(2)))


def _first_moment(kernel, a):
  """∫_{-∞}^a u·K(u) du."""
  if kernel == "rectangle":
    return (np.clip(a, -0.5, 0.5) ** 2 - 0.25) / 2
  if kernel == "triangle":
    a = np.clip(a, -1.0, 1.0)
    return np.where(a < 0, a**2 / 2 + a**3 / 3 - 1 / 6, -1 / 6 + a**2 / 2 - a**3 / 3)
  return -np.exp(-a * a / 2) / math.sqrt(2 * math.pi)


def _smoothed_step(kernel, z, theta):
  """Σ H(z − θ) with the step smoothed by K: its θ-derivative is exactly Eq. 12's estimator."""
  return np.sum(_cdf(kernel, (z - theta) / EPS), axis=0)


def _smoothed_jumprelu(kernel, z, theta):
  """Σ ∫_θ^∞ t·K((z − t)/ε)/ε dt: the KDE estimate of E[z·H(z − θ)] whose θ-derivative is
  −(θ/ε)·Σ K((z − θ)/ε), exactly Eq. 11's estimator."""
  a = (z - theta) / EPS
  return np.sum(z * _cdf(kernel, a) - EPS * _first_moment(kernel, a), axis=0)


def _kernel_np(kernel, u):
  if kernel == "rectangle":
    return ((u > -0.5) & (u < 0.5)).astype(np.float64)
  if kernel == "triangle":
    return np.maximum(0.0, 1 - np.abs(u))
  return np.exp(-u * u / 2) / math.sqrt(2 * math.pi)


@pytest.fixture
def z_and_theta():
  rng = np.random.default_rng(0)
  z = rng.uniform(-0.2, 1.0, size=(256, 8))
  theta = rng.uniform(0.2, 0.6, size=(8,)).astype(np.float32)
  # Keep every z clear of the kernels' kinks (u = 0, ±1/2, ±1), where a finite difference
  # straddles a corner and means nothing.
  u = (z - theta) / EPS
  near_kink = np.min(np.abs(u[..., None] - np.array([-1, -0.5, 0, 0.5, 1])), axis=-1) < 0.02
  z = np.where(near_kink, z + 0.05 * EPS, z).astype(np.float32)
  return z, theta


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kernel", ops.KERNELS)
class TestThresholdGradient:

  def test_matches_analytic_formula(self, z_and_theta, kernel, jit):
    z, theta = z_and_theta
    grad_jr = jax.grad(lambda t: jnp.sum(ops.jumprelu(z, t, EPS, kernel)))
    grad_st = jax.grad(lambda t: jnp.sum(ops.step(z, t, EPS, kernel)))
    if jit:
      grad_jr, grad_st = jax.jit(grad_jr), jax.jit(grad_st)
    k = _kernel_np(kernel, (z.astype(np.float64) - theta) / EPS)
    np.testing.assert_allclose(grad_jr(theta), -(theta / EPS) * k.sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grad_st(theta), -(1 / EPS) * k.sum(0), rtol=1e-4, atol=1e-4)

  def test_matches_finite_difference_of_smoothed_objective(self, z_and_theta, kernel, jit):
    z, theta = z_and_theta
    z64, h = z.astype(np.float64), 1e-4
    for fn, smoothed in ((ops.jumprelu, _smoothed_jumprelu), (ops.step, _smoothed_step)):
      grad = jax.grad(lambda t: jnp.sum(fn(z, t, EPS, kernel)))
      grad = jax.jit(grad) if jit else grad
      fd = (smoothed(kernel, z64, theta + h) - smoothed(kernel, z64, theta - h)) / (2 * h)
      # float32 sums of ~256 terms vs float64 central differences (O(h²) exact for these kernels
      # away from kinks): 1e-3 relative is far below the gradient's own size.
      np.testing.assert_allclose(grad(theta), fd, rtol=1e-3, atol=1e-2)


def test_custom_backward_ran_in_window_only():
  theta = jnp.array([0.5, 0.5, 0.5, 0.5])
  z = jnp.array([[0.5 + 0.3 * EPS, 0.5 - 0.3 * EPS, 0.5 + 0.7 * EPS, 0.1]])
  g = jax.grad(lambda t: jnp.sum(ops.step(z, t, EPS)))(theta)
  np.testing.assert_array_equal(np.asarray(g) != 0, [True, True, False, False])
  np.testing.assert_allclose(g[:2], -1 / EPS)  # autodiff of a step would give exactly 0


def test_gradient_toward_z():
  theta = jnp.array([0.5, 0.5, 0.5])
  z = jnp.array([0.9, 0.2, 0.5])  # above, below, exactly at θ (H(0) = 0)
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(ops.jumprelu(x, theta, EPS)))(z),
                                [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(ops.step(x, theta, EPS)))(z),
                                [0.0, 0.0, 0.0])


def test_forward_values():
  theta = jnp.array([0.5, 0.5, 0.5])
  z = jnp.array([0.9, 0.2, 0.5])
  np.testing.assert_allclose(ops.jumprelu(z, theta, EPS), [0.9, 0.0, 0.0], rtol=1e-7)
  np.testing.assert_array_equal(ops.step(z, theta, EPS), [1.0, 0.0, 0.0])


def test_threshold_gradient_sums_over_leading_axes(z_and_theta):
  z, theta = z_and_theta
  z3 = z.reshape(4, 64, 8)
  g2 = jax.grad(lambda t: jnp.sum(ops.step(z, t, EPS)))(theta)
  g3 = jax.grad(lambda t: jnp.sum(ops.step(z3, t, EPS)))(theta)
  assert g3.shape == theta.shape
  np.testing.assert_allclose(g2, g3, rtol=1e-6)


def test_vmap_over_bandwidth(z_and_theta):
  z, theta = z_and_theta
  eps = jnp.array([0.05, 0.1, 0.2])
  per_eps = jax.vmap(lambda e: jax.grad(lambda t: jnp.sum(ops.step(z, t, e)))(theta))(eps)
  for i, e in enumerate(eps):
    one = jax.grad(lambda t: jnp.sum(ops.step(z, t, float(e))))(theta)
    np.testing.assert_allclose(per_eps[i], one, rtol=1e-6)


def test_kernels_integrate_to_one():
  u = jnp.linspace(-8, 8, 160001)
  for name in ops.KERNELS:
    area = jnp.trapezoid(ops.kernel_fn(name, u), u)
    assert abs(float(area) - 1.0) < 1e-3, name


def test_unknown_kernel_is_refused():
  with pytest.raises(ValueError, match="sae.kernel must be one of .* got 'box'"):
    ops.step(jnp.ones(3), jnp.ones(3), 0.1, kernel="box")
