"""The JumpReLU SAE as pure functions over a params dict.

Dimension letters: B batch, D activation width, F dictionary width.
Params: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], and the threshold θ [F] stored
either as `log_threshold` (the paper's default: θ = exp(log θ) stays positive) or as
`threshold` (trained directly, as some libraries do).
"""
import jax
import jax.numpy as jnp

from jumprelu import ops

THRESHOLD_PARAMS = ("log", "raw")


def init(key, d_in: int, width: int, *, threshold_init: float = 0.001,
         threshold_param: str = "log", dtype=jnp.float32) -> dict:
  """Gemma Scope init: He-uniform decoder rows scaled to unit norm, W_enc = W_decᵀ, zero biases."""
  if threshold_param not in THRESHOLD_PARAMS:
    raise ValueError(f"sae.threshold_param must be one of {THRESHOLD_PARAMS}, got {threshold_param!r}")
  W_dec_FxD = jax.nn.initializers.he_uniform()(key, (width, d_in), dtype)
  W_dec_FxD = W_dec_FxD / jnp.linalg.norm(W_dec_FxD, axis=-1, keepdims=True)
  params = {
      "W_enc": W_dec_FxD.T,
      "b_enc": jnp.zeros((width,), dtype),
      "W_dec": W_dec_FxD,
      "b_dec": jnp.zeros((d_in,), dtype),
  }
  theta_F = jnp.full((width,), threshold_init, dtype)
  if threshold_param == "log":
    params["log_threshold"] = jnp.log(theta_F)
  else:
    params["threshold"] = theta_F
  return params


def threshold(params: dict) -> jax.Array:
  """θ [F], whichever way it is parameterised."""
  if "log_threshold" in params:
    return jnp.exp(params["log_threshold"])
  return params["threshold"]


def pre_activations(params: dict, x_BxD: jax.Array) -> jax.Array:
  """π(x) = ReLU(x·W_enc + b_enc). The ReLU follows the paper's pseudo-code (App. J); with
  θ > 0 it does not change the features, only keeps negative values out of the STE window."""
  return jax.nn.relu(x_BxD @ params["W_enc"] + params["b_enc"])


def encode(params: dict, x_BxD, *, bandwidth, kernel: str = "rectangle"):
  """Features f = JumpReLU_θ(π(x)) [B, F] and the pre-activations π(x) [B, F]."""
  pre_BxF = pre_activations(params, x_BxD)
  return ops.jumprelu(pre_BxF, threshold(params), bandwidth, kernel), pre_BxF


def decode(params: dict, f_BxF: jax.Array) -> jax.Array:
  """x̂ = f·W_dec + b_dec."""
  return f_BxF @ params["W_dec"] + params["b_dec"]


def loss(params: dict, x_BxD, *, sparsity_coefficient, bandwidth, kernel: str = "rectangle"):
  """Eq. 9–10 averaged over the batch: ‖x − x̂‖² + λ·Σᵢ H(πᵢ − θᵢ). Returns (loss, aux)."""
  theta_F = threshold(params)
  pre_BxF = pre_activations(params, x_BxD)
  f_BxF = ops.jumprelu(pre_BxF, theta_F, bandwidth, kernel)
  x_hat_BxD = decode(params, f_BxF)
  recon_B = jnp.sum((x_BxD - x_hat_BxD) ** 2, axis=-1)
  l0_B = jnp.sum(ops.step(pre_BxF, theta_F, bandwidth, kernel), axis=-1)
  total = jnp.mean(recon_B + sparsity_coefficient * l0_B)
  return total, {"recon_B": recon_B, "l0_B": l0_B, "f_BxF": f_BxF, "pre_BxF": pre_BxF,
                 "x_hat_BxD": x_hat_BxD}


def remove_parallel_grad(W_dec_FxD: jax.Array, grad_FxD: jax.Array) -> jax.Array:
  """Drops the gradient component along each (unit-norm) decoder direction, per the recipe."""
  parallel_F1 = jnp.sum(W_dec_FxD * grad_FxD, axis=-1, keepdims=True)
  return grad_FxD - parallel_F1 * W_dec_FxD


def normalize_decoder(W_dec_FxD: jax.Array) -> jax.Array:
  """Rescales every dictionary direction (row of W_dec) to unit norm."""
  return W_dec_FxD / jnp.linalg.norm(W_dec_FxD, axis=-1, keepdims=True)


def fold_normalization(params: dict, scale: float | jax.Array) -> dict:
  """Params that act on raw activations, for a model trained on x / scale.

  With x_n = x / C: π_raw = C·π_n, so b_enc, θ and b_dec are multiplied by C; W_enc and W_dec
  are unchanged. Returns the Gemma Scope layout with an explicit `threshold`.
  """
  return {
      "W_enc": params["W_enc"],
      "b_enc": params["b_enc"] * scale,
      "W_dec": params["W_dec"],
      "b_dec": params["b_dec"] * scale,
      "threshold": threshold(params) * scale,
  }
