"""A per-feature STE bandwidth ε_i that adapts to each feature's pre-activations
(sae.bandwidth_rule="adaptive"; "fixed" keeps one ε = sae.bandwidth for every feature).

The STE of Eq. 11–12 is a kernel density estimate of each feature's pre-activation density at
its threshold, p_i(θ_i), from one batch. The paper uses one ε for all features and names a
per-feature bandwidth as the likely improvement. This rule is Silverman's (normal-reference)
bandwidth, applied to the pre-activations that lie near θ_i:

  ε_i = s · c_K · σ_i · n_i^(−1/5),  capped at w·θ_i,

  n_i  feature i's pre-activations per batch with 0 < π < ∞ and |π − θ_i| < w·θ_i (the window)
  σ_i  their standard deviation
  c_K  1.06 (Silverman's constant for a Gaussian kernel) × δ_K / δ_gauss, the canonical-bandwidth
       ratio that gives kernel K the same smoothing (Marron & Nolan 1988, δ_K = (R(K)/μ₂(K)²)^(1/5)):
       gaussian 1.06, triangle 2.58, rectangle 3.69
  s, w sae.bandwidth_scale, sae.bandwidth_window

n_i and the moments of (π − θ_i) are exponential moving averages over steps (decay
sae.bandwidth_decay; the count bias-corrected as in Adam), carried in the train state as three [F]
arrays. Until a feature has sae.bandwidth_min_count such pre-activations per batch (or when σ_i
or θ_i is 0), its ε_i is the fixed ε. The cap keeps the kernel inside the window its statistics
came from. ε_i is computed from the statistics before each step, so the step is the same STE,
ε a [F] array broadcast over the batch (ops.py), and the statistics are then updated from this
batch's pre-activations (no gradient flows through them).
"""
import math

import jax
import jax.numpy as jnp

RULES = ("fixed", "adaptive")
STAT_KEYS = ("bw_count", "bw_sum", "bw_sumsq")  # EMAs of n_i, Σ(π − θ_i), Σ(π − θ_i)²


def _delta(r_k: float, mu2: float) -> float:
  return (r_k / mu2**2) ** 0.2


# c_K: Silverman's 1.06 for the Gaussian kernel, scaled to K by the canonical-bandwidth ratio.
# R(K) = ∫K², μ₂(K) = ∫u²K: rectangle on (−1/2, 1/2): 1, 1/12; triangle on (−1, 1): 2/3, 1/6;
# Gaussian: 1/(2√π), 1.
_DELTA_GAUSS = _delta(1 / (2 * math.sqrt(math.pi)), 1.0)
SILVERMAN = {"gaussian": 1.06,
             "triangle": 1.06 * _delta(2 / 3, 1 / 6) / _DELTA_GAUSS,
             "rectangle": 1.06 * _delta(1.0, 1 / 12) / _DELTA_GAUSS}


def uses_stats(c) -> bool:
  return c.sae.arch == "jumprelu" and c.sae.bandwidth_rule == "adaptive"


def init(c) -> dict:
  """The statistics of a fresh run: zeros [F] per key, or {} when the rule keeps no state."""
  if not uses_stats(c):
    return {}
  return {k: jnp.zeros((c.sae.width,), jnp.float32) for k in STAT_KEYS}


def update(stats: dict, pre_BxF, theta_F, *, window: float, decay: float) -> dict:
  """The statistics after one more batch of pre-activations π [B, F] at thresholds θ [F]."""
  pre_BxF = jax.lax.stop_gradient(pre_BxF)
  theta_F = jax.lax.stop_gradient(theta_F)
  d_BxF = pre_BxF - theta_F
  near_BxF = ((pre_BxF > 0) & (jnp.abs(d_BxF) < window * theta_F)).astype(jnp.float32)
  batch = {"bw_count": jnp.sum(near_BxF, axis=0),
           "bw_sum": jnp.sum(near_BxF * d_BxF, axis=0),
           "bw_sumsq": jnp.sum(near_BxF * d_BxF * d_BxF, axis=0)}
  return {k: decay * stats[k] + (1.0 - decay) * batch[k] for k in STAT_KEYS}


def epsilon(stats: dict, theta_F, step, fixed, *, kernel: str, scale: float, window: float,
            decay: float, min_count: float):
  """ε_i [F] from the statistics of `step` batches (see the module docstring); `fixed` (a
  scalar, possibly traced: a swept ε) where a feature has too few samples."""
  theta_F = jax.lax.stop_gradient(theta_F)
  seen = 1.0 - jnp.asarray(decay, jnp.float32) ** jnp.asarray(step, jnp.float32)
  count_F = stats["bw_count"]
  n_F = count_F / jnp.maximum(seen, 1e-30)  # bias-corrected count per batch
  safe_F = jnp.maximum(count_F, 1e-30)
  mean_F = stats["bw_sum"] / safe_F
  var_F = jnp.maximum(stats["bw_sumsq"] / safe_F - mean_F * mean_F, 0.0)
  sigma_F = jnp.sqrt(var_F)
  rule_F = scale * SILVERMAN[kernel] * sigma_F * jnp.maximum(n_F, 1e-30) ** -0.2
  rule_F = jnp.minimum(rule_F, window * theta_F)
  ok_F = (step > 0) & (n_F >= min_count) & (rule_F > 0)
  fixed = jnp.asarray(fixed, jnp.float32)
  return jnp.where(ok_F, rule_F, fixed)


def config_epsilon(c, stats: dict, theta_F, step, fixed):
  """epsilon() with the constants of config c."""
  s = c.sae
  return epsilon(stats, theta_F, step, fixed, kernel=s.kernel, scale=s.bandwidth_scale,
                 window=s.bandwidth_window, decay=s.bandwidth_decay,
                 min_count=s.bandwidth_min_count)


def config_update(c, stats: dict, pre_BxF, theta_F) -> dict:
  """update() with the constants of config c."""
  return update(stats, pre_BxF, theta_F, window=c.sae.bandwidth_window,
                decay=c.sae.bandwidth_decay)
