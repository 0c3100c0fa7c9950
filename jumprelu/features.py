"""Per-feature statistics of an SAE on a batch of activations: firing density, and the arrays
worth a histogram during training (log10 density, θ)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu import arch as arch_lib
from jumprelu import export, sae, sharding


@functools.partial(jax.jit, static_argnames=("arch", "k"))
def firing_density(params: dict, x_BxD: jax.Array, scale=1.0, *, arch: str = "jumprelu",
                   k: int | None = None) -> jax.Array:
  """Fraction of the rows of x / scale on which each feature of an `arch` SAE fires [F]."""
  f_BxF = arch_lib.features(params, x_BxD / scale, arch=arch, k=k)
  return jnp.mean(f_BxF != 0, axis=0)


def mean_firing_density(params: dict, batches, scale=1.0, *, arch: str = "jumprelu",
                        k: int | None = None) -> np.ndarray:
  """firing_density averaged over equal-sized batches, as float64 numpy [F] on every process."""
  total_F, n = None, 0
  for x_BxD in batches:
    d_F = firing_density(params, x_BxD, scale, arch=arch, k=k)
    total_F = d_F if total_F is None else total_F + d_F
    n += 1
  if n == 0:
    raise ValueError("no batches to estimate the firing density from; set "
                     "export.density_batches >= 1")
  return np.asarray(sharding.to_host(total_F), np.float64) / n


def feature_histograms(params: dict, x_BxD: jax.Array, scale=1.0, *, arch: str = "jumprelu",
                       k: int | None = None) -> dict:
  """Per-feature arrays worth a histogram: log10 firing density on this batch, and θ."""
  density_F = sharding.to_host(firing_density(params, x_BxD, scale, arch=arch, k=k))
  out = {"log10_firing_density": export.log10_density(density_F)}
  if arch == "jumprelu":
    out["threshold"] = np.asarray(sharding.to_host(sae.threshold(params)), np.float32)
  return out
