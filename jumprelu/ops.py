"""JumpReLU and the Heaviside step with the paper's straight-through pseudo-derivatives.

Shapes: z [..., F] (pre-activations), threshold [F] (broadcast over the leading axes).
Both functions are pure and work under jit, vmap and grad. `bandwidth` (ε) may be a traced
value, so a sweep can vmap over it, and a scalar or one ε per feature [F] (broadcast like θ;
bandwidth.py's adaptive rule); `kernel` is static.
"""
import functools
import math

import jax
import jax.numpy as jnp

KERNELS = ("rectangle", "triangle", "gaussian")


def kernel_fn(name: str, u: jax.Array) -> jax.Array:
  """The KDE kernel K(u); each integrates to 1 over the real line."""
  if name == "rectangle":  # the paper's default: 1 on (-1/2, 1/2)
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)
  if name == "triangle":  # 1 - |u| on (-1, 1)
    return jnp.maximum(0.0, 1.0 - jnp.abs(u)).astype(u.dtype)
  if name == "gaussian":
    return (jnp.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)).astype(u.dtype)
  raise ValueError(f"sae.kernel must be one of {KERNELS}, got {name!r}")


def check_kernel(name: str) -> None:
  if name not in KERNELS:
    raise ValueError(f"sae.kernel must be one of {KERNELS}, got {name!r}")


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums the broadcast leading axes of x away so the result has `shape`."""
  lead = x.ndim - len(shape)
  x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
  keep = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
  return jnp.sum(x, axis=keep, keepdims=True) if keep else x


def heaviside(x: jax.Array) -> jax.Array:
  """H(x) with H(0) = 0, as in the paper's pseudo-code (`x > threshold`)."""
  return (x > 0).astype(x.dtype)


# JumpReLU_θ(z) = z·H(z − θ). Straight-through estimator of Eq. 11:
#   ∂/∂θ := −(θ/ε)·K((z − θ)/ε);  ∂/∂z := H(z − θ) (the true derivative away from the jump).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _jumprelu(z, threshold, bandwidth, kernel):
  del bandwidth, kernel
  return z * heaviside(z - threshold)


def _jumprelu_fwd(z, threshold, bandwidth, kernel):
  return _jumprelu(z, threshold, bandwidth, kernel), (z, threshold, bandwidth)


def _jumprelu_bwd(kernel, res, g):
  z, threshold, bandwidth = res
  k = kernel_fn(kernel, (z - threshold) / bandwidth)
  z_bar = heaviside(z - threshold) * g
  threshold_bar = _sum_to(-(threshold / bandwidth) * k * g, threshold.shape)
  return z_bar, threshold_bar, jnp.zeros_like(bandwidth)


_jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


# H(z − θ). Straight-through estimator of Eq. 12:
#   ∂/∂θ := −(1/ε)·K((z − θ)/ε);  ∂/∂z := 0 (only θ learns through the sparsity penalty).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _step(z, threshold, bandwidth, kernel):
  del bandwidth, kernel
  return heaviside(z - threshold)


def _step_fwd(z, threshold, bandwidth, kernel):
  return _step(z, threshold, bandwidth, kernel), (z, threshold, bandwidth)


def _step_bwd(kernel, res, g):
  z, threshold, bandwidth = res
  k = kernel_fn(kernel, (z - threshold) / bandwidth)
  threshold_bar = _sum_to(-(1.0 / bandwidth) * k * g, threshold.shape)
  return jnp.zeros_like(z), threshold_bar, jnp.zeros_like(bandwidth)


_step.defvjp(_step_fwd, _step_bwd)


def _as_float(bandwidth, like):
  return jnp.asarray(bandwidth, dtype=like.dtype)


def jumprelu(z, threshold, bandwidth, kernel: str = "rectangle"):
  """z·H(z − θ), with the Eq. 11 pseudo-derivative toward θ."""
  check_kernel(kernel)
  return _jumprelu(z, threshold, _as_float(bandwidth, z), kernel)


def step(z, threshold, bandwidth, kernel: str = "rectangle"):
  """H(z − θ), with the Eq. 12 pseudo-derivative toward θ and none toward z."""
  check_kernel(kernel)
  return _step(z, threshold, _as_float(bandwidth, z), kernel)
