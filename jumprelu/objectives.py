"""The JumpReLU SAE's other training objectives: sparsity penalties that replace the paper's λ·L0,
the extra penalties that can be added to any of them, and a Matryoshka reconstruction for any
architecture. `sae.loss` stays the paper's Eq. 10 with its hand-written backward pass (and
sparse.py its fast step); every objective here trains by autodiff through ops.jumprelu,
ops.step and the one estimator defined below.

Dimension letters: B batch, D activation width, F dictionary width, M nested prefixes.
Where a penalty's exact published equation could not be found, its comment says so.

sae.sparsity_loss (λ = sae.sparsity_coefficient, after its warm-up):
  "l0"         λ·mean_B Σᵢ H(πᵢ − θᵢ)                       the paper's Eq. 10 (sae.loss)
  "target_l0"  λ·(L0 / L0* − 1)²,  L0 = mean_B Σᵢ H(πᵢ − θᵢ)   Gemma Scope 2 (its form assumed)
  "tanh"       λ·mean_B Σᵢ tanh(c·fᵢ·‖W_dec,i‖)               Anthropic, January 2025
added when their coefficient is > 0:
  pre-activation loss  λ_P·mean_B Σᵢ ReLU(θᵢ − zᵢ)·‖W_dec,i‖   Anthropic, January 2025
  frequency penalty    μ·Σᵢ ReLU(pᵢ − τ),  pᵢ = mean_B H(πᵢ − θᵢ)   Gemma Scope 2 (form ours)
and for any architecture, sae.matryoshka_prefixes (m₁ < … < F):
  reconstruction       mean over prefixes m of mean_B ‖x − (f[:, :m]·W_dec[:m] + b_dec)‖²
"""
import functools

import jax
import jax.numpy as jnp

from jumprelu import ops, sae

SPARSITY_LOSSES = ("l0", "target_l0", "tanh")


def uses_paper_loss(c) -> bool:
  """True when a JumpReLU config trains on exactly Eq. 10 (sae.loss, or sparse.py's step)."""
  s = c.sae
  return (s.sparsity_loss == "l0" and s.pre_act_coefficient == 0 and
          s.frequency_coefficient == 0 and not s.matryoshka_prefixes and not s.jumprelu_auxk)


# ----------------------------------------------------------------------------- the tanh penalty

# tanh(s·JumpReLU_θ(z)), s = c·‖W_dec,i‖ [F]. Straight-through estimator in the manner of Eq. 11–12:
# the penalty jumps by tanh(s·θ) where z crosses θ, so the KDE derivative of its expectation is
#   ∂/∂θ := −(tanh(s·θ)/ε)·K((z − θ)/ε)
# (Eq. 11 is the same rule for a jump of height θ, Eq. 12 for height 1), and away from the jump
#   ∂/∂z := H(z − θ)·s·(1 − tanh²(s·z)),  ∂/∂s := H(z − θ)·z·(1 − tanh²(s·z)).
# Anthropic's January 2025 update (transformer-circuits.pub/2025/january-update) and SAELens 6's
# jumprelu_sparsity_loss_mode="tanh" take tanh(c·|f|·‖W_d‖) of the JumpReLU output f and reach θ
# by the chain rule through Eq. 11, i.e. a jump height of s·θ·(1 − tanh²(s·f)) instead of
# tanh(s·θ): the two agree to O((s·θ)²), and this one is exactly the derivative of the smoothed
# penalty (tested against finite differences of it).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tanh_jumprelu(z, threshold, scale, bandwidth, kernel):
  del bandwidth, kernel
  return jnp.tanh(scale * z * ops.heaviside(z - threshold))


def _tanh_jumprelu_fwd(z, threshold, scale, bandwidth, kernel):
  out = _tanh_jumprelu(z, threshold, scale, bandwidth, kernel)
  return out, (z, threshold, scale, bandwidth, out)


def _tanh_jumprelu_bwd(kernel, res, g):
  z, threshold, scale, bandwidth, out = res
  on_g = ops.heaviside(z - threshold) * (1.0 - out * out) * g
  k = ops.kernel_fn(kernel, (z - threshold) / bandwidth)
  threshold_bar = jnp.sum(-(jnp.tanh(scale * threshold) / bandwidth) * k * g, axis=0)
  return scale * on_g, threshold_bar, jnp.sum(z * on_g, axis=0), jnp.zeros_like(bandwidth)


_tanh_jumprelu.defvjp(_tanh_jumprelu_fwd, _tanh_jumprelu_bwd)


def tanh_jumprelu(z_BxF, threshold_F, scale_F, bandwidth, kernel: str = "rectangle"):
  """tanh(s·z·H(z − θ)) [B, F] with the estimator above toward θ (and exact toward z and s)."""
  ops.check_kernel(kernel)
  z_BxF = jnp.asarray(z_BxF)
  return _tanh_jumprelu(z_BxF, threshold_F, scale_F, jnp.asarray(bandwidth, z_BxF.dtype), kernel)


# ----------------------------------------------------------------------------- penalties

def target_l0_penalty(l0, target_l0):
  """(L0 / L0* − 1)² of the batch-mean L0 (differentiable through ops.step).

  Gemma Scope 2 trains with "a quadratic L0 penalty" around a target L0 (its announcement,
  greaterwrong.com/posts/YQro5LyYjDzZrBCdb/announcing-gemma-scope-2); its report's equation was
  not found, so this is the form of dictionary_learning's JumpReluTrainer (trainers/jumprelu.py:
  sparsity_coefficient·((l0 / target_l0) − 1)², l0 the batch mean of the step function)."""
  return (l0 / target_l0 - 1.0) ** 2


def frequency_penalty(fires_BxF, frequency_max):
  """Σᵢ ReLU(pᵢ − τ), pᵢ the fraction of the batch on which feature i fires (differentiable
  through ops.step): each feature above τ pays μ per firing on top of the L0 term.

  Gemma Scope 2 adds "a frequency penalty which prevented the formation of high-frequency
  latents" (announcement above); its equation was not found. This hinge on the batch firing
  frequency is our choice: zero for features below τ (Gemma Scope 2 and the paper's Fig. 5 count
  latents above 10%), and for those above, Eq. 12's gradient scaled by μ."""
  return jnp.sum(jax.nn.relu(jnp.mean(fires_BxF, axis=0) - frequency_max))


def pre_act_penalty_B(z_BxF, threshold_F, dec_norm_F):
  """Σᵢ ReLU(θᵢ − zᵢ)·‖W_dec,i‖ per row, z the encoder's x·W_enc + b_enc before any ReLU.

  Anthropic's January 2025 update: λ_P·Σᵢ ReLU(exp(tᵢ) − hᵢ(x))·‖W_d,i‖ (λ_P = 3e-6 there), which
  pulls every latent's pre-activation toward its threshold, so none stays dead. (SAELens applies
  it to dead latents only; this is the update's form, over all of them.)"""
  return jax.nn.relu(threshold_F - z_BxF) @ dec_norm_F


# ----------------------------------------------------------------------------- the JumpReLU loss

def jumprelu_loss(params: dict, x_BxD, *, sparsity_coefficient, bandwidth, kernel="rectangle",
                  sparsity_loss="l0", target_l0=1.0, tanh_scale=4.0, pre_act_coefficient=0.0,
                  frequency_coefficient=0.0, frequency_max=0.1, matmul_dtype="float32"):
  """mean_B‖x − x̂‖² + the configured sparsity penalty (+ the optional ones). Returns (loss, aux).

  aux has sae.loss's keys (recon_B, l0_B, f_BxF, pre_BxF, x_hat_BxD) and `sparsity`, the value of
  the sparsity penalty (λ included). With "l0" and no extra penalty this is sae.loss exactly
  (tested), by autodiff instead of its hand-written backward pass. Every coefficient may be
  traced (an ensemble); kernel, sparsity_loss and matmul_dtype are static."""
  if sparsity_loss not in SPARSITY_LOSSES:
    raise ValueError(f"sae.sparsity_loss must be one of {SPARSITY_LOSSES}, got {sparsity_loss!r}")
  x_BxD = jnp.asarray(x_BxD)
  theta_F = sae.threshold(params)
  z_BxF = sae.matmul(x_BxD, params["W_enc"], matmul_dtype) + params["b_enc"]
  pre_BxF = jax.nn.relu(z_BxF)  # as sae.pre_activations
  f_BxF = ops.jumprelu(pre_BxF, theta_F, bandwidth, kernel)
  x_hat_BxD = sae.matmul(f_BxF, params["W_dec"], matmul_dtype) + params["b_dec"]
  recon_B = jnp.sum((x_BxD - x_hat_BxD) ** 2, axis=-1)
  dec_norm_F = jnp.linalg.norm(params["W_dec"], axis=-1)
  needs_fires = sparsity_loss != "tanh" or not _is_zero(frequency_coefficient)
  fires_BxF = ops.step(pre_BxF, theta_F, bandwidth, kernel) if needs_fires else None

  if sparsity_loss == "l0":
    sparsity = sparsity_coefficient * jnp.mean(jnp.sum(fires_BxF, axis=-1))
  elif sparsity_loss == "target_l0":
    sparsity = sparsity_coefficient * target_l0_penalty(jnp.mean(jnp.sum(fires_BxF, axis=-1)),
                                                        target_l0)
  else:
    tanh_BxF = tanh_jumprelu(pre_BxF, theta_F, tanh_scale * dec_norm_F, bandwidth, kernel)
    sparsity = sparsity_coefficient * jnp.mean(jnp.sum(tanh_BxF, axis=-1))
  total = jnp.mean(recon_B) + sparsity
  if not _is_zero(pre_act_coefficient):
    total = total + pre_act_coefficient * jnp.mean(pre_act_penalty_B(z_BxF, theta_F, dec_norm_F))
  if not _is_zero(frequency_coefficient):
    total = total + frequency_coefficient * frequency_penalty(fires_BxF, frequency_max)
  aux = {"recon_B": recon_B, "l0_B": jnp.sum(ops.heaviside(pre_BxF - theta_F), axis=-1),
         "f_BxF": f_BxF, "pre_BxF": pre_BxF, "x_hat_BxD": x_hat_BxD, "sparsity": sparsity}
  return total, aux


def _is_zero(v) -> bool:
  """A Python 0 (the term is left out of the program); a traced coefficient always counts."""
  return isinstance(v, int | float) and v == 0


# ----------------------------------------------------------------------------- Matryoshka

def prefix_recon_MxB(params: dict, f_BxF, x_BxD, prefixes: tuple[int, ...]):
  """‖x − x̂_m‖² per row for each nested prefix m [M, B], x̂_m = f[:, :m]·W_dec[:m] + b_dec; the
  whole dictionary is always the last prefix."""
  width = f_BxF.shape[-1]
  bounds = [0, *[m for m in prefixes if m < width], width]
  x_hat_BxD = jnp.broadcast_to(params["b_dec"], x_BxD.shape)
  out = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):  # static slices: one matmul per group in all
    x_hat_BxD = x_hat_BxD + f_BxF[:, lo:hi] @ params["W_dec"][lo:hi]
    out.append(jnp.sum((x_BxD - x_hat_BxD) ** 2, axis=-1))
  return jnp.stack(out)


def with_matryoshka(loss_fn, params: dict, x_BxD, prefixes: tuple[int, ...]):
  """loss_fn(params) with its reconstruction term replaced by the Matryoshka one.

  Bussmann et al. 2025 (Learning Multi-Level Features with Matryoshka SAEs, arXiv 2503.17547;
  dictionary_learning's trainers/matryoshka_batch_top_k.py): the features of each nested prefix
  of the dictionary must reconstruct x on their own, so the first latents learn the general
  features. The prefix losses are averaged with equal weights (their default). Works for any
  architecture whose aux holds f_BxF and recon_B and that decodes with W_dec and b_dec (all of
  ours): the other terms (sparsity, AuxK, Gated's auxiliary loss) are unchanged. aux["recon_B"]
  stays the full dictionary's error, as the metrics report it."""
  total, aux = loss_fn(params)
  matryoshka_B = jnp.mean(prefix_recon_MxB(params, aux["f_BxF"], x_BxD, prefixes), axis=0)
  return total + jnp.mean(matryoshka_B - aux["recon_B"]), {**aux, "matryoshka_B": matryoshka_B}
