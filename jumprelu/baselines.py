"""The paper's baseline SAEs (ReLU, Gated, TopK) and BatchTopK as pure functions over params dicts.

Same shape of API as sae.py: `*_init(key, d_in, width)`, `*_encode(params, x_BxD, ...)` ->
(f_BxF, pre_BxF), and `*_loss(params, x_BxD, *, ...)` -> (loss, aux), where aux holds at least
the keys of sae.loss's aux: recon_B, l0_B (non-zero features per row), f_BxF, pre_BxF (the
ReLU'd pre-activations the features are read from) and x_hat_BxD. All three decode with
sae.decode (x̂ = f·W_dec + b_dec) and train with plain autodiff (no custom_vjp). A feature has
fired where f_BxF > 0.

Dimension letters: B batch, D activation width, F dictionary width, K kept latents per row.
"""
import jax
import jax.numpy as jnp
from jax import lax

from jumprelu import ops
from jumprelu import sae


def _decoder_init(key, d_in: int, width: int, dtype) -> dict:
  """The recipe's init without θ: unit-norm He-uniform W_dec rows, W_enc = W_decᵀ, zero biases."""
  p = sae.init(key, d_in, width, dtype=dtype)
  return {name: p[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


def _recon_B(x_BxD, x_hat_BxD):
  """‖x − x̂‖² per row."""
  return jnp.sum((x_BxD - x_hat_BxD) ** 2, axis=-1)


# ----------------------------------------------------------------------------- ReLU SAE

def relu_init(key, d_in: int, width: int, *, dtype=jnp.float32) -> dict:
  """W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], initialised as sae.init."""
  return _decoder_init(key, d_in, width, dtype)


def relu_encode(params: dict, x_BxD):
  """f = ReLU(x·W_enc + b_enc) [B, F], returned twice (features and pre-activations)."""
  f_BxF = jax.nn.relu(x_BxD @ params["W_enc"] + params["b_enc"])
  return f_BxF, f_BxF


def relu_loss(params: dict, x_BxD, *, sparsity_coefficient):
  """mean_B(‖x − x̂‖² + λ·Σᵢ fᵢ‖W_dec,i‖). Returns (loss, aux)."""
  x_BxD = jnp.asarray(x_BxD)
  f_BxF, pre_BxF = relu_encode(params, x_BxD)
  x_hat_BxD = sae.decode(params, f_BxF)
  recon_B = _recon_B(x_BxD, x_hat_BxD)
  # The L1 is weighted by the decoder norms (Anthropic's April 2024 update, the JumpReLU paper's
  # ReLU baseline), so shrinking f while growing W_dec buys nothing. Under the recipe's unit-norm
  # decoder the weights are 1 and their gradient is parallel to W_dec, which
  # sae.remove_parallel_grad drops: then this is the plain L1 of a constrained decoder.
  sparsity_B = f_BxF @ jnp.linalg.norm(params["W_dec"], axis=-1)
  total = jnp.mean(recon_B + sparsity_coefficient * sparsity_B)
  aux = {"recon_B": recon_B, "l0_B": jnp.sum(f_BxF > 0, axis=-1).astype(x_BxD.dtype),
         "f_BxF": f_BxF, "pre_BxF": pre_BxF, "x_hat_BxD": x_hat_BxD, "sparsity_B": sparsity_B}
  return total, aux


# ----------------------------------------------------------------------------- Gated SAE
# Rajamanoharan et al. 2024a (arXiv 2404.16014), Sec. 3: both encoder paths read x − b_dec,
#   π_gate = (x − b_dec)·W_gate + b_gate,  π_mag = (x − b_dec)·W_mag + b_mag,
#   W_mag = exp(r_mag) ⊙ W_gate (r_mag [F] scales feature i's column),
#   f = H(π_gate) ⊙ ReLU(π_mag),
# and the loss (their Sec. 3.2) is ‖x − x̂(f)‖² + λ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen(ReLU(π_gate))‖²,
# x̂_frozen a copy of the decoder (W_dec and b_dec) that receives no gradient. H passes no
# gradient by design: the gate path learns only from the L1 and the auxiliary term.

def gated_init(key, d_in: int, width: int, *, dtype=jnp.float32) -> dict:
  """W_gate [D, F] = W_decᵀ, r_mag [F] = 0 (so W_mag = W_gate), b_gate = b_mag = 0, W_dec, b_dec."""
  p = _decoder_init(key, d_in, width, dtype)
  zeros_F = jnp.zeros((width,), dtype)
  return {"W_gate": p["W_enc"], "b_gate": zeros_F, "r_mag": zeros_F, "b_mag": zeros_F,
          "W_dec": p["W_dec"], "b_dec": p["b_dec"]}


def _gated_paths(params: dict, x_BxD):
  """π_gate and π_mag [B, F]; π_mag reuses the gate's matmul since W_mag = exp(r_mag) ⊙ W_gate."""
  z_BxF = (x_BxD - params["b_dec"]) @ params["W_gate"]
  return z_BxF + params["b_gate"], jnp.exp(params["r_mag"]) * z_BxF + params["b_mag"]


def gated_encode(params: dict, x_BxD):
  """Features f = H(π_gate)·ReLU(π_mag) [B, F] and the gate's ReLU(π_gate) [B, F]."""
  pi_gate_BxF, pi_mag_BxF = _gated_paths(params, x_BxD)
  f_BxF = ops.heaviside(pi_gate_BxF) * jax.nn.relu(pi_mag_BxF)
  return f_BxF, jax.nn.relu(pi_gate_BxF)


def gated_loss(params: dict, x_BxD, *, sparsity_coefficient):
  """mean_B(‖x − x̂‖² + λ·Σᵢ ReLU(π_gate)ᵢ‖W_dec,i‖ + ‖x − x̂_frozen(ReLU(π_gate))‖²) and aux."""
  x_BxD = jnp.asarray(x_BxD)
  f_BxF, gate_BxF = gated_encode(params, x_BxD)
  x_hat_BxD = sae.decode(params, f_BxF)
  recon_B = _recon_B(x_BxD, x_hat_BxD)
  frozen = {"W_dec": lax.stop_gradient(params["W_dec"]),
            "b_dec": lax.stop_gradient(params["b_dec"])}
  aux_recon_B = _recon_B(x_BxD, sae.decode(frozen, gate_BxF))
  # The Gated paper's L1 is plain, with W_dec rows held at unit norm. The norm weighting here
  # (Anthropic's form) uses the frozen decoder's norms: the Gated authors advise freezing the
  # decoder in the sparsity term too when it is frozen in the auxiliary one ("definitely better
  # than having the decoder weights frozen in one place but not the other", comment on their
  # post, lesswrong.com/posts/vdoiWXeouGsZEYgrg, comment N6C2nFatJfeq9hrxM). At unit norm, as the
  # recipe keeps it, all these forms agree.
  sparsity_B = gate_BxF @ jnp.linalg.norm(frozen["W_dec"], axis=-1)
  total = jnp.mean(recon_B + sparsity_coefficient * sparsity_B + aux_recon_B)
  aux = {"recon_B": recon_B, "l0_B": jnp.sum(f_BxF > 0, axis=-1).astype(x_BxD.dtype),
         "f_BxF": f_BxF, "pre_BxF": gate_BxF, "x_hat_BxD": x_hat_BxD,
         "sparsity_B": sparsity_B, "aux_recon_B": aux_recon_B}
  return total, aux


# ----------------------------------------------------------------------------- TopK SAE
# Gao et al. 2024 (arXiv 2406.04093). The encoder is the JumpReLU paper's π = x·W_enc + b_enc,
# shared with sae.py, not OpenAI's (x − b_pre)·W_enc + b: the two span the same functions
# (b_enc absorbs −b_dec·W_enc) though their training dynamics differ slightly.

def topk_init(key, d_in: int, width: int, *, dtype=jnp.float32) -> dict:
  """W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], initialised as sae.init."""
  return _decoder_init(key, d_in, width, dtype)


def _topk_mask(v_BxF, k, k_max: int | None = None):
  """Boolean [B, F], True at each row's k largest entries (ties broken by lax.top_k).

  `k` may be traced (an ensemble of SAEs with different k, vmapped) when the static `k_max` ≥ k
  is given: lax.top_k returns its k_max entries in descending order, so the first k of them are
  top_k(v, k)'s, and the rest are masked off.
  """
  k_max = k if k_max is None else k_max
  _, idx_BxK = lax.top_k(v_BxF, k_max)
  rows_Bx1 = jnp.arange(v_BxF.shape[0])[:, None]
  keep_K = jnp.arange(k_max) < k
  return jnp.zeros(v_BxF.shape, bool).at[rows_Bx1, idx_BxK].set(
      jnp.broadcast_to(keep_K, idx_BxK.shape))


def _check_k(name: str, k, width: int) -> None:
  if not isinstance(k, int) or not 1 <= k <= width:
    raise ValueError(f"TopK SAE: {name} must be a Python int in [1, width={width}] "
                     f"(it is static under jit), got {k!r}")


def topk_encode(params: dict, x_BxD, *, k, k_max: int | None = None):
  """f = each row's k largest of ReLU(x·W_enc + b_enc), the rest 0 [B, F], and that ReLU [B, F].

  k is a Python int, or a traced one with a static bound k_max (see _topk_mask)."""
  _check_k("k" if k_max is None else "k_max", k if k_max is None else k_max,
           params["W_enc"].shape[-1])
  pre_BxF = jax.nn.relu(x_BxD @ params["W_enc"] + params["b_enc"])
  # A mask rather than a scatter of top_k's values: the gradient reaches the k selected
  # latents and no others, and needs no gather in the backward pass.
  mask_BxF = _topk_mask(lax.stop_gradient(pre_BxF), k, k_max)
  return jnp.where(mask_BxF, pre_BxF, 0.0), pre_BxF


def topk_loss(params: dict, x_BxD, *, k, k_aux: int, aux_coefficient, dead_F,
              k_max: int | None = None):
  """mean_B‖x − x̂‖² + α·AuxK (dead latents reconstructing the residual). Returns (loss, aux).

  AuxK (Gao et al., Sec. 2.4 and App. A.2; α = 1/32, k_aux = 512 there): e = x − x̂ with x̂
  held fixed, and ê = z·W_dec, z the top `k_aux` of ReLU(π) among the latents where `dead_F`
  [F] is True (Gao et al.: not fired for 10M tokens). Following OpenAI's code (sparse_autoencoder/train.py,
  `normalized_mse`), AuxK = Σ_B‖e − ê‖² / Σ_B‖e − mean_B(e)‖², relative to the residual's
  batch variance; 0 when no latent is dead or the residual does not vary. OpenAI also
  normalises the main MSE by the data variance; here it stays ‖x − x̂‖², as in sae.loss, since
  inputs are already scaled to E‖x‖² = 1 by the recipe.
  """
  _check_k("k_aux", k_aux, params["W_enc"].shape[-1])
  x_BxD = jnp.asarray(x_BxD)
  f_BxF, pre_BxF = topk_encode(params, x_BxD, k=k, k_max=k_max)
  x_hat_BxD = sae.decode(params, f_BxF)
  recon_B = _recon_B(x_BxD, x_hat_BxD)
  auxk = _auxk(params, x_BxD, x_hat_BxD, pre_BxF, k_aux, dead_F)
  total = jnp.mean(recon_B) + aux_coefficient * auxk
  aux = {"recon_B": recon_B, "l0_B": jnp.sum(f_BxF > 0, axis=-1).astype(x_BxD.dtype),
         "f_BxF": f_BxF, "pre_BxF": pre_BxF, "x_hat_BxD": x_hat_BxD, "auxk": auxk}
  return total, aux


def _auxk(params: dict, x_BxD, x_hat_BxD, pre_BxF, k_aux: int, dead_F):
  """Gao et al.'s AuxK as OpenAI's code normalises it (see topk_loss); 0 when nothing is dead."""
  dead_F = jnp.asarray(dead_F, bool)
  # Alive latents rank below every dead one (ReLU'd values are ≥ 0), then are masked out in case
  # fewer than k_aux are dead.
  ranked_BxF = jnp.where(dead_F, lax.stop_gradient(pre_BxF), -1.0)
  z_BxF = jnp.where(_topk_mask(ranked_BxF, k_aux) & dead_F, pre_BxF, 0.0)
  e_BxD = lax.stop_gradient(x_BxD - x_hat_BxD)
  # No b_dec in ê: the bias belongs to the main reconstruction and learns only from it.
  e_hat_BxD = z_BxF @ params["W_dec"]
  num = jnp.sum((e_BxD - e_hat_BxD) ** 2)
  den = jnp.sum((e_BxD - jnp.mean(e_BxD, axis=0)) ** 2)
  ok = (den > 0) & jnp.any(dead_F)
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)  # inner where keeps 0/0 out of grads


# ----------------------------------------------------------------------------- BatchTopK SAE
# Bussmann et al. 2024 (BatchTopK Sparse Autoencoders, arXiv 2412.06410). In training the batch's
# B·k largest ReLU'd pre-activations are kept, wherever they are: rows keep k on average, more or
# fewer each. At inference the SAE is a JumpReLU with one global threshold θ, estimated during
# training as a running mean of the smallest activation a batch kept (their code, and
# dictionary_learning's trainers/batch_top_k.py: θ ← β·θ + (1 − β)·min kept, β = 0.999). θ is
# held as [F] (one value, repeated) so the export is a JumpReLU SAE (W_enc, b_enc, W_dec, b_dec,
# threshold) that SAELens loads as "jumprelu". θ takes no gradient: train.train_step writes
# batchtopk_threshold's estimate into it after each step.

def batchtopk_init(key, d_in: int, width: int, *, dtype=jnp.float32) -> dict:
  """topk_init's params and the inference threshold [F], 0 until the first step sets it."""
  return {**_decoder_init(key, d_in, width, dtype), "threshold": jnp.zeros((width,), dtype)}


def batchtopk_encode(params: dict, x_BxD, *, k):
  """Training features: the batch's B·k largest of ReLU(x·W_enc + b_enc), the rest 0 [B, F]; that
  ReLU [B, F]; and the smallest value kept [] (0 if none is positive). k may be traced."""
  if isinstance(k, int):
    _check_k("k", k, params["W_enc"].shape[-1])
  pre_BxF = jax.nn.relu(x_BxD @ params["W_enc"] + params["b_enc"])
  kth = _kth_largest(lax.stop_gradient(pre_BxF), pre_BxF.shape[0] * k)
  # A mask, as in topk_encode: gradients reach the kept entries only. Ties with the B·k-th value
  # are all kept (measure zero for float activations).
  keep_BxF = (pre_BxF >= kth) & (pre_BxF > 0)
  min_kept = jnp.min(jnp.where(keep_BxF, lax.stop_gradient(pre_BxF), jnp.inf))
  min_kept = jnp.where(jnp.isfinite(min_kept), min_kept, 0.0)
  return jnp.where(keep_BxF, pre_BxF, 0.0), pre_BxF, min_kept


def _kth_largest(v_BxF, n):
  """The n-th largest entry of v_BxF ≥ 0 (float32), exactly, by a radix select: non-negative
  floats order like their bit patterns, so the answer's 31 bits are fixed from the top down, each
  by one count of the entries at or above a candidate. 31 passes over [B, F] instead of sorting
  B·F values: the loss and its gradient at B=1024, D=64, F=512, k=4 took 18–23 ms on 2 CPU cores
  against 117–123 ms with lax.top_k of B·k. n may be traced; per-row counts are clipped at n so
  the total fits int32 at any B·F."""
  bits_BxF = lax.bitcast_convert_type(v_BxF, jnp.int32)

  def set_bit(i, prefix):
    candidate = prefix | jnp.left_shift(jnp.int32(1), 30 - i)
    count = jnp.sum(jnp.minimum(jnp.sum(bits_BxF >= candidate, axis=1), n))
    return jnp.where(count >= n, candidate, prefix)

  return lax.bitcast_convert_type(lax.fori_loop(0, 31, set_bit, jnp.int32(0)), v_BxF.dtype)


def batchtopk_loss(params: dict, x_BxD, *, k, k_aux: int, aux_coefficient, dead_F):
  """mean_B‖x − x̂‖² + α·AuxK, as topk_loss with the batch's top B·k. Returns (loss, aux); aux
  also holds min_kept, the batch's smallest kept activation (for batchtopk_threshold)."""
  _check_k("k_aux", k_aux, params["W_enc"].shape[-1])
  x_BxD = jnp.asarray(x_BxD)
  f_BxF, pre_BxF, min_kept = batchtopk_encode(params, x_BxD, k=k)
  x_hat_BxD = sae.decode(params, f_BxF)
  recon_B = _recon_B(x_BxD, x_hat_BxD)
  auxk = _auxk(params, x_BxD, x_hat_BxD, pre_BxF, k_aux, dead_F)
  total = jnp.mean(recon_B) + aux_coefficient * auxk
  aux = {"recon_B": recon_B, "l0_B": jnp.sum(f_BxF > 0, axis=-1).astype(x_BxD.dtype),
         "f_BxF": f_BxF, "pre_BxF": pre_BxF, "x_hat_BxD": x_hat_BxD, "auxk": auxk,
         "min_kept": min_kept}
  return total, aux


def batchtopk_threshold(threshold_F, min_kept, decay, first):
  """The running estimate of the inference threshold after one more batch: min_kept itself on
  the first step (`first`), else decay·θ + (1 − decay)·min_kept."""
  return jnp.where(first, min_kept, decay * threshold_F + (1.0 - decay) * min_kept)
