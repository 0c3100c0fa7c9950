"""The loss and its gradients computed sparsely after the encoder matmul.

Only x·W_enc must be dense (2·B·D·F FLOPs). Every other term of the loss and of its gradients
lives on the entries of the [B, F] pre-activations that are active (π > θ) or inside the support
of the STE kernel around θ (the only places where ∂/∂θ or ∂/∂z is non-zero). With L0 ≪ F those
are a small fraction of B·F, so the decoder, the weight gradients and ∂f are sparse matmuls.

The candidate entries are listed twice with static shapes (a fixed `capacity`): row-major, to
decode x̂ = f·W_dec, and feature-major, for ∂W_dec = fᵀ·∂x̂, ∂W_enc = xᵀ·∂z and the per-feature
sums (∂θ, ∂b_enc). When more entries than `capacity` qualify, the step falls back to the dense
loss (sae.loss) through lax.cond, so the result never depends on the capacity.

Dimension letters: B batch, D activation width, F dictionary width, N list capacity,
W words of 32 packed mask bits.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import sparse as jsparse

from jumprelu import ops, sae

_BITS = 32
_SDDMM_CHUNK = 1024  # list entries per gathered block of ∂f (two [1024, D] blocks fit L2)


def value_and_grad(params, x_BxD, *, sparsity_coefficient, bandwidth, kernel="rectangle",
                   capacity: float = 0.02, matmul_dtype: str = "float32"):
  """((loss, aux), grads) with the loss and gradients of sae.loss, computed sparsely.

  aux: recon_B, l0_B, fired_F (any row active), in_window (fraction of entries with
  |π − θ| < ε/2) and dense_fallback (1.0 when more than `capacity`·B·F entries qualified).
  `matmul_dtype` applies to the encoder product; the sparse products run in float32.
  """
  batch, width = x_BxD.shape[0], params["W_enc"].shape[1]
  n_cap = max(1, int(capacity * batch * width))
  lam = jnp.asarray(sparsity_coefficient, jnp.float32)
  bandwidth = jnp.asarray(bandwidth, jnp.float32)
  theta_F = sae.threshold(params)
  # The bias is added where z is read, so no second [B, F] array is materialised for it.
  xw_BxF = sae.matmul(x_BxD, params["W_enc"], matmul_dtype)
  bits_BxW = _pack_bits(_candidates(jax.nn.relu(xw_BxF + params["b_enc"]), theta_F, bandwidth,
                                     kernel))  # W = F/32
  bits_FxV = _transpose_bits(bits_BxW, batch)[:width]  # V = B/32
  count = jnp.sum(lax.population_count(bits_BxW).astype(jnp.int32))

  def sparse_branch(_):
    return _sparse(params, x_BxD, xw_BxF, bits_BxW, bits_FxV, n_cap, lam, bandwidth, kernel)

  def dense_branch(_):
    loss_fn = lambda p: sae.loss(p, x_BxD, sparsity_coefficient=lam, bandwidth=bandwidth,
                                 kernel=kernel, matmul_dtype=matmul_dtype)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    pre_BxF = aux["pre_BxF"]
    aux = {"recon_B": aux["recon_B"], "l0_B": aux["l0_B"],
           "fired_F": jnp.any(pre_BxF > theta_F, axis=0),
           "in_window": jnp.mean(jnp.abs(pre_BxF - theta_F) < 0.5 * bandwidth),
           "dense_fallback": jnp.ones((), jnp.float32)}
    return (loss, aux), grads

  return lax.cond(count <= n_cap, sparse_branch, dense_branch, None)


def _candidates(pre_BxF, theta_F, bandwidth, kernel):
  """Entries that are active, inside the kernel's support, or within ε/2 of θ (the in_window
  metric): outside them every term of the loss gradient is exactly zero."""
  diff_BxF = pre_BxF - theta_F
  k_BxF = ops.kernel_fn(kernel, diff_BxF / bandwidth)
  return (ops.heaviside(diff_BxF) > 0) | (k_BxF != 0) | (jnp.abs(diff_BxF) < 0.5 * bandwidth)


def _sparse(params, x_BxD, xw_BxF, bits_BxW, bits_FxV, n_cap, lam, bandwidth, kernel):
  batch, width = xw_BxF.shape
  theta_F = sae.threshold(params)

  # Row-major list: decode x̂ = f·W_dec with a CSR × dense product.
  b_N, j_N, ptr_B1, nnz = _compact(bits_BxW, n_cap, width)
  valid_N = jnp.arange(n_cap) < nnz
  pre_N = jax.nn.relu(xw_BxF[b_N, j_N] + params["b_enc"][j_N])
  act_N = ops.heaviside(pre_N - theta_F[j_N]) * valid_N
  f_N = pre_N * act_N
  x_hat_BxD = _csr_matmul(f_N, j_N, ptr_B1, params["W_dec"], (batch, width)) + params["b_dec"]
  r_BxD = x_hat_BxD - x_BxD
  recon_B = jnp.sum(r_BxD**2, axis=-1)
  l0_B = jax.ops.segment_sum(act_N, b_N, batch, indices_are_sorted=True)
  loss = jnp.mean(recon_B + lam * l0_B)
  g_xhat_BxD = (2.0 / batch) * r_BxD

  # Feature-major list of the same entries: ∂f there, then every gradient.
  t_N, s_N, ptr_F1, _ = _compact(bits_FxV, n_cap, batch)  # t: feature, s: row
  valid_N = jnp.arange(n_cap) < nnz
  z_N = xw_BxF[s_N, t_N] + params["b_enc"][t_N]
  pre_N = jax.nn.relu(z_N)
  theta_N = theta_F[t_N]
  act_N = ops.heaviside(pre_N - theta_N) * valid_N
  f_N = pre_N * act_N
  k_N = ops.kernel_fn(kernel, (pre_N - theta_N) / bandwidth) * valid_N
  g_f_N = _sddmm(g_xhat_BxD, params["W_dec"], s_N, t_N, nnz)
  g_z_N = jnp.where(z_N > 0, act_N * g_f_N, 0.0)
  g_theta_N = k_N * (-(theta_N / bandwidth) * g_f_N - (lam / batch) / bandwidth)  # Eq. 11 + 12
  g_theta_F = jax.ops.segment_sum(g_theta_N, t_N, width, indices_are_sorted=True)
  grads = {
      "W_enc": _csr_matmul(g_z_N, s_N, ptr_F1, x_BxD, (width, batch)).T,
      "b_enc": jax.ops.segment_sum(g_z_N, t_N, width, indices_are_sorted=True),
      "W_dec": _csr_matmul(f_N, s_N, ptr_F1, g_xhat_BxD, (width, batch)),
      "b_dec": jnp.sum(g_xhat_BxD, axis=0),
  }
  if "log_threshold" in params:
    grads["log_threshold"] = g_theta_F * theta_F
  else:
    grads["threshold"] = g_theta_F
  in_window_N = (jnp.abs(pre_N - theta_N) < 0.5 * bandwidth) & valid_N
  aux = {"recon_B": recon_B, "l0_B": l0_B,
         "fired_F": jax.ops.segment_max(act_N, t_N, width, indices_are_sorted=True) > 0,
         "in_window": jnp.sum(in_window_N) / (batch * width),
         "dense_fallback": jnp.zeros((), jnp.float32)}
  return (loss, aux), grads


# ----------------------------------------------------------------------------- index lists

def _pack_bits(mask_RxC):
  """A bool [R, C] as uint32 words [R, ceil(C/32)]: bit i of word w is column 32·w + i."""
  rows, cols = mask_RxC.shape
  words = -(-cols // _BITS)
  mask_RxC = jnp.pad(mask_RxC, ((0, 0), (0, words * _BITS - cols)))
  bits = mask_RxC.reshape(rows, words, _BITS).astype(jnp.uint32)
  return jnp.sum(bits << jnp.arange(_BITS, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _transpose_bits(bits_RxW, n_rows: int):
  """The packed transpose [32·W, ceil(R/32)] of a packed [R, 32·W] mask.

  Each 32×32 bit block is transposed in five rounds of masked swaps (Hacker's Delight §7-3);
  this touches only the packed words, 1/32 of a second pass over the [R, C] mask.
  """
  words = -(-n_rows // _BITS)
  a = jnp.pad(bits_RxW, ((0, words * _BITS - n_rows), (0, 0)))
  a = a.reshape(words, _BITS, -1)  # [V, k, W]: row 32·v + k of the mask
  step, low = _BITS // 2, 0x0000FFFF
  while step:
    # Rows k and k + step of each block (k & step == 0) swap bits: the high halves of row k's
    # 2·step-bit groups with the low halves of row k + step's.
    a = a.reshape(words, _BITS // (2 * step), 2, step, -1)
    lo, hi = a[:, :, 0], a[:, :, 1]
    t = ((lo >> step) ^ hi) & jnp.uint32(low)
    a = jnp.stack([lo ^ (t << step), hi ^ t], axis=2).reshape(words, _BITS, -1)
    step //= 2
    low ^= low << step if step else 0
  return a.transpose(2, 1, 0).reshape(-1, words)  # [W, i, V] -> [32·W, V]


def _compact(bits_RxW, n_cap: int, n_cols: int):
  """The set bits of a packed [R, C] mask as a row-major list, padded to n_cap entries.

  Returns row_N, col_N, the CSR row pointers ptr_R1 [R + 1] and the entry count. Entries past
  the count hold arbitrary in-range indices and must be masked by the caller.
  """
  n_rows, n_words = bits_RxW.shape
  bits_M = bits_RxW.reshape(-1)  # M = R·W words, in row-major order
  pop_M = lax.population_count(bits_M).astype(jnp.int32)
  end_M = jnp.cumsum(pop_M)
  start_M = end_M - pop_M  # list position of each word's first set bit
  # The word of each list entry: mark where each word's run starts, then a running count.
  marks_N = jnp.zeros((n_cap,), jnp.int32).at[start_M].add(1, mode="drop")
  word_N = jnp.clip(jnp.cumsum(marks_N) - 1, 0, n_rows * n_words - 1)
  rank_N = jnp.arange(n_cap, dtype=jnp.int32) - start_M[word_N]  # among the word's set bits
  bit_N = _select_bit(bits_M[word_N], rank_N)
  row_N = word_N // n_words
  col_N = jnp.minimum((word_N % n_words) * _BITS + bit_N, n_cols - 1)
  ptr_R1 = jnp.concatenate([jnp.zeros((1,), jnp.int32), end_M.reshape(n_rows, n_words)[:, -1]])
  return row_N, col_N, ptr_R1, end_M[-1]


def _select_bit(word_N, rank_N):
  """Position of the rank-th (0-based) set bit of each uint32 word."""
  lo_N = jnp.zeros_like(rank_N)
  for step in (16, 8, 4, 2, 1):
    probe_N = lo_N + step
    low_bits_N = word_N & ((jnp.uint32(1) << probe_N.astype(jnp.uint32)) - jnp.uint32(1))
    ok_N = lax.population_count(low_bits_N).astype(jnp.int32) <= rank_N
    lo_N = jnp.where(ok_N, probe_N, lo_N)
  return lo_N


# ----------------------------------------------------------------------------- sparse products

def _csr_matmul(data_N, col_N, ptr_R1, dense_CxD, shape):
  """S @ dense for the CSR matrix S of `shape` (entries past ptr_R1[-1] are ignored)."""
  return jsparse.BCSR((data_N, col_N, ptr_R1), shape=shape) @ dense_CxD


def _sddmm(a_RxD, b_CxD, row_N, col_N, count):
  """a[row]·b[col] for the first `count` list entries (0 after), one gathered block at a time."""
  n = row_N.shape[0]
  chunk = min(_SDDMM_CHUNK, n)
  pad = -n % chunk
  row_KxC = jnp.pad(row_N, (0, pad)).reshape(-1, chunk)
  col_KxC = jnp.pad(col_N, (0, pad)).reshape(-1, chunk)

  def block(k, out_KxC):
    a_CxD = a_RxD.at[row_KxC[k]].get(mode="promise_in_bounds")
    b_CxD = b_CxD_all.at[col_KxC[k]].get(mode="promise_in_bounds")
    return out_KxC.at[k].set(jnp.sum(a_CxD * b_CxD, axis=-1))

  b_CxD_all = b_CxD
  out_KxC = lax.fori_loop(0, (count + chunk - 1) // chunk, block,
                          jnp.zeros(row_KxC.shape, a_RxD.dtype))
  return out_KxC.reshape(-1)[:n]
