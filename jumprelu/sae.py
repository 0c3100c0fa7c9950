"""The JumpReLU SAE as pure functions over a params dict.

Dimension letters: B batch, D activation width, F dictionary width.
Params: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], and the threshold θ [F] stored
either as `log_threshold` (the paper's default: θ = exp(log θ) stays positive) or as
`threshold` (trained directly, as some libraries do).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jumprelu import ops

THRESHOLD_PARAMS = ("log", "raw")
MATMUL_DTYPES = ("float32", "bfloat16")


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
  θ > 0 it does not change the features, only keeps negative values out of the STE window
  (`loss(..., pre_relu=False)` trains without it, an ablation)."""
  return jax.nn.relu(x_BxD @ params["W_enc"] + params["b_enc"])


def encode(params: dict, x_BxD, *, bandwidth, kernel: str = "rectangle"):
  """Features f = JumpReLU_θ(π(x)) [B, F] and the pre-activations π(x) [B, F]."""
  pre_BxF = pre_activations(params, x_BxD)
  return ops.jumprelu(pre_BxF, threshold(params), bandwidth, kernel), pre_BxF


def decode(params: dict, f_BxF: jax.Array) -> jax.Array:
  """x̂ = f·W_dec + b_dec."""
  return f_BxF @ params["W_dec"] + params["b_dec"]


def matmul(a, b, matmul_dtype: str = "float32"):
  """a @ b with both inputs cast to `matmul_dtype`, accumulated and returned in float32."""
  if matmul_dtype == "float32":
    return a @ b
  dtype = jnp.dtype(matmul_dtype)
  return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def loss(params: dict, x_BxD, *, sparsity_coefficient, bandwidth, kernel: str = "rectangle",
         matmul_dtype: str = "float32", pre_relu: bool = True):
  """Eq. 9–10 averaged over the batch: ‖x − x̂‖² + λ·Σᵢ H(πᵢ − θᵢ). Returns (loss, aux).

  Its gradients are those of autodiff through `encode`, `decode` and `ops.step` (see _loss).
  `matmul_dtype="bfloat16"` runs every product on bf16 inputs with fp32 accumulation.
  `bandwidth` is a scalar or one ε per feature [F] (bandwidth.py). `pre_relu=False` drops the
  ReLU before the JumpReLU (π = z): the same features for θ > 0, but the STE window then also
  sees negative z, and the encoder gets H(z − θ) instead of H(z − θ)·ReLU'(z).
  """
  ops.check_kernel(kernel)
  if matmul_dtype not in MATMUL_DTYPES:
    raise ValueError(f"train.matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
  x_BxD = jnp.asarray(x_BxD)
  lam = jnp.asarray(sparsity_coefficient, x_BxD.dtype)
  return _loss(params, x_BxD, lam, jnp.asarray(bandwidth, x_BxD.dtype), kernel, matmul_dtype,
               bool(pre_relu))


# The whole Eq. 10 loss with one hand-written backward pass. It applies the same estimators as
# autodiff through ops.jumprelu and ops.step (Eq. 11 and 12 toward θ; H(π − θ)·ReLU'(z) toward
# the encoder) but keeps only z = x·W_enc, f, ∂f and ∂z as [B, F] arrays and reads each once or
# twice; autodiff through the composition makes about twice as many [B, F] passes. Cotangents of
# every aux output are honoured, so differentiating through aux stays exact.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _loss(params, x_BxD, lam, bandwidth, kernel, matmul_dtype, pre_relu):
  return _loss_fwd(params, x_BxD, lam, bandwidth, kernel, matmul_dtype, pre_relu)[0]


def _loss_fwd(params, x_BxD, lam, bandwidth, kernel, matmul_dtype, pre_relu):
  theta_F = threshold(params)
  z_BxF = matmul(x_BxD, params["W_enc"], matmul_dtype) + params["b_enc"]
  pre_BxF = jax.nn.relu(z_BxF) if pre_relu else z_BxF
  f_BxF = pre_BxF * ops.heaviside(pre_BxF - theta_F)
  x_hat_BxD = matmul(f_BxF, params["W_dec"], matmul_dtype) + params["b_dec"]
  r_BxD = x_hat_BxD - x_BxD
  recon_B = jnp.sum(r_BxD**2, axis=-1)
  l0_B = jnp.sum(ops.heaviside(pre_BxF - theta_F), axis=-1)
  total = jnp.mean(recon_B + lam * l0_B)
  aux = {"recon_B": recon_B, "l0_B": l0_B, "f_BxF": f_BxF, "pre_BxF": pre_BxF,
         "x_hat_BxD": x_hat_BxD}
  return (total, aux), (params, x_BxD, lam, bandwidth, z_BxF, f_BxF, r_BxD, l0_B)


def _loss_bwd(kernel, matmul_dtype, pre_relu, res, cts):
  params, x_BxD, lam, bandwidth, z_BxF, f_BxF, r_BxD, l0_B = res
  g_total, g_aux = cts
  batch = x_BxD.shape[0]
  theta_F = threshold(params)
  # ∂/∂x̂ of mean(‖x − x̂‖²) and of any recon_B / x̂ cotangent.
  g_r_B1 = (g_total / batch + g_aux["recon_B"])[:, None]
  g_xhat_BxD = g_aux["x_hat_BxD"] + 2 * g_r_B1 * r_BxD
  g_f_BxF = g_aux["f_BxF"] + matmul(g_xhat_BxD, params["W_dec"].T, matmul_dtype)
  g_l0_B1 = (g_total * lam / batch + g_aux["l0_B"])[:, None]
  pre_BxF = jax.nn.relu(z_BxF) if pre_relu else z_BxF
  k_BxF = ops.kernel_fn(kernel, (pre_BxF - theta_F) / bandwidth)
  # Eq. 11 through f plus Eq. 12 through the L0 term, factored so XLA makes one [B, F] pass.
  g_theta_F = jnp.sum(k_BxF * (-(theta_F / bandwidth) * g_f_BxF - g_l0_B1 / bandwidth), axis=0)
  g_pre_BxF = g_aux["pre_BxF"] + ops.heaviside(pre_BxF - theta_F) * g_f_BxF
  g_z_BxF = jnp.where(z_BxF > 0, g_pre_BxF, 0.0) if pre_relu else g_pre_BxF  # ReLU'(0) = 0
  # The weight gradients contract B. Written as xᵀ·∂z, XLA:CPU hands them to a single-threaded
  # Eigen kernel; with the small [D, B] transposes materialised first (the barrier stops XLA
  # folding them back into the dot) they run as ordinary [D, B]·[B, F] products, ~1.7× faster.
  x_DxB = lax.optimization_barrier(x_BxD.T)
  g_xhat_DxB = lax.optimization_barrier(g_xhat_BxD.T)
  grads = {
      "W_enc": matmul(x_DxB, g_z_BxF, matmul_dtype),
      "b_enc": jnp.sum(g_z_BxF, axis=0),
      "W_dec": lax.optimization_barrier(matmul(g_xhat_DxB, f_BxF, matmul_dtype)).T,
      "b_dec": jnp.sum(g_xhat_BxD, axis=0),
  }
  if "log_threshold" in params:
    grads["log_threshold"] = g_theta_F * theta_F
  else:
    grads["threshold"] = g_theta_F
  g_x_BxD = matmul(g_z_BxF, params["W_enc"].T, matmul_dtype) - 2 * g_r_B1 * r_BxD
  g_lam = jnp.sum(g_total / batch * l0_B)
  return grads, g_x_BxD, g_lam, jnp.zeros_like(bandwidth)


_loss.defvjp(_loss_fwd, _loss_bwd)


def remove_parallel_grad(W_dec_FxD: jax.Array, grad_FxD: jax.Array) -> jax.Array:
  """Drops the gradient component along each (unit-norm) decoder direction, per the recipe."""
  parallel_F1 = jnp.sum(W_dec_FxD * grad_FxD, axis=-1, keepdims=True)
  return grad_FxD - parallel_F1 * W_dec_FxD


def normalize_decoder(W_dec_FxD: jax.Array) -> jax.Array:
  """Rescales every dictionary direction (row of W_dec) to unit norm."""
  return W_dec_FxD / jnp.linalg.norm(W_dec_FxD, axis=-1, keepdims=True)
