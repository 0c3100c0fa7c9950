"""The loss and its gradients computed sparsely after the encoder matmul.

Only x·W_enc must be dense (2·B·D·F FLOPs). Every other term of the loss and of its gradients
lives on the entries of the [B, F] pre-activations that are active (π > θ) or inside the support
of the STE kernel around θ (the only places where ∂/∂θ or ∂/∂z is non-zero). With L0 ≪ F those
are a small fraction of B·F, so the decoder, the weight gradients and ∂f are sparse matmuls.

The candidate entries are listed twice with static shapes (a fixed `capacity`): row-major within
cache-sized slices of features, to decode x̂ = f·W_dec, and feature-major (the same entries moved
by one scatter), for ∂f, ∂W_dec = fᵀ·∂x̂, ∂W_enc = xᵀ·∂z and the per-feature sums (∂θ, ∂b_enc).
When more entries than `capacity` qualify, the step falls back to the dense loss (sae.loss)
through lax.cond, so the result never depends on the capacity.

Dimension letters (suffixes such as ptr_F1 add one: [F + 1]):
  B  batch rows                        D  activation width
  F  dictionary width                  N  list capacity (entries valid below nnz)
  W  packed words along a row: ceil(F/32) for the [B, F] mask
  V  packed words along a column: ceil(B/32), the words of each row of the transpose bits_FxV
     (in _lists' bits_SBxV: the words of one feature slice)
  M  every word of a packed mask, row-major (R·W; F·V for bits_FxV)
  S  feature slices x̂ is decoded in
  R, C  rows and columns of a helper's generic mask or matrix
  K  blocks of _SDDMM_CHUNK list entries in _sddmm (where C is the block's length)

Worked example (the helpers' real outputs; one decode slice, n_cap = 8). The candidates of B = 3
rows, F = 5 features: row 0 has features 1, 3; row 1 has 0, 1, 4; row 2 has 3.
  _pack_bits       bits_BxW = [[0b01010], [0b10011], [0b01000]] = [[10], [19], [8]]
  _transpose_bits  bits_FxV = [[2], [3], [0], [5], [2]]  (bit b of word j: row b has feature j)
  _lists           row-major: b = [0, 0, 1, 1, 1, 2], j = [1, 3, 0, 1, 4, 3], nnz = 6 (entries 6
                   and 7 are padding), ptr_SB1 = [0, 2, 5, 6];
                   feature-major: start_M = [0, 1, 3, 3, 5], ptr_F1 = [0, 1, 3, 3, 5, 6]
  _sparse          pos_N = [1, 3, 0, 2, 5, 4]: entry (b, j) moves to start_M[j] + the set bits of
                   bits_FxV[j] below bit b, e.g. (1, 1) to 1 + popcount(0b11 & 0b01) = 2, so the
                   feature-major order is (1, 0), (0, 1), (1, 1), (0, 3), (2, 3), (1, 4).
"""
import jax
import jax.numpy as jnp
from absl import logging
from jax import lax
from jax.experimental import sparse as jsparse

from jumprelu import objectives, ops, sae, sweep

_BITS = 32
_SDDMM_CHUNK = 1024  # list entries per gathered block of ∂f (2048 and 4096 measured slower)
# x̂ = f·W_dec gathers a W_dec row per active entry. Decoding one slice of features at a time keeps
# the rows a product reads in cache: at D=576, F=16384 (W_dec 36 MiB) four 9 MiB slices ran the
# decode in 81 ms against 140 ms unsliced (2 slices: 113 ms, 8: 89 ms) on the benchmark CPU.
_DECODE_SLICE_BYTES = 10 << 20


def value_and_grad(params, x_BxD, *, sparsity_coefficient, bandwidth, kernel="rectangle",
                   capacity: float = 0.02, matmul_dtype: str = "float32",
                   decode_slices: int | None = None):
  """((loss, aux), grads) with the loss and gradients of sae.loss, computed sparsely.

  aux: recon_B, l0_B, fired_F (any row active), in_window (fraction of entries with
  |π − θ| < ε/2) and dense_fallback (1.0 when more than `capacity`·B·F entries qualified).
  `matmul_dtype` applies to the encoder product; the sparse products run in float32.
  `decode_slices`: feature slices x̂ is decoded in (default: W_dec / _DECODE_SLICE_BYTES).
  """
  batch, width = x_BxD.shape[0], params["W_enc"].shape[1]
  n_cap = max(1, int(capacity * batch * width))
  lam = jnp.asarray(sparsity_coefficient, jnp.float32)
  bandwidth = jnp.asarray(bandwidth, jnp.float32)
  theta_F = sae.threshold(params)
  # The bias is added where z is read, so no second [B, F] array is materialised for it.
  xw_BxF = sae.matmul(x_BxD, params["W_enc"], matmul_dtype)
  bits_BxW = _pack_bits(_candidates(jax.nn.relu(xw_BxF + params["b_enc"]), theta_F, bandwidth,
                                     kernel))
  bits_FxV = _transpose_bits(bits_BxW, batch)[:width]
  count = jnp.sum(lax.population_count(bits_BxW).astype(jnp.int32))
  if decode_slices is None:
    decode_slices = -(-params["W_dec"].size * params["W_dec"].dtype.itemsize
                      // _DECODE_SLICE_BYTES)
  slice_words = -(-bits_BxW.shape[1] // max(1, int(decode_slices)))  # every slice whole words

  # The index list is built before the branch: an operand of lax.cond is written out once,
  # where inside it XLA would recompute its whole chain (cumsum, bit select) in every fusion that
  # reads it (~15–30 ms each at 1.3 M entries).
  lists = _lists(bits_BxW, bits_FxV, n_cap, slice_words)

  def sparse_branch(lists):
    return _sparse(params, x_BxD, xw_BxF, lists, slice_words * _BITS, lam, bandwidth, kernel)

  def dense_branch(lists):
    del lists
    loss_fn = lambda p: sae.loss(p, x_BxD, sparsity_coefficient=lam, bandwidth=bandwidth,
                                 kernel=kernel, matmul_dtype=matmul_dtype)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    pre_BxF = aux["pre_BxF"]
    aux = {"recon_B": aux["recon_B"], "l0_B": aux["l0_B"],
           "fired_F": jnp.any(pre_BxF > theta_F, axis=0),
           "in_window": jnp.mean(jnp.abs(pre_BxF - theta_F) < 0.5 * bandwidth),
           "dense_fallback": jnp.ones((), jnp.float32)}
    return (loss, aux), grads

  return lax.cond(count <= n_cap, sparse_branch, dense_branch, lists)


def _candidates(pre_BxF, theta_F, bandwidth, kernel):
  """Entries that are active, inside the kernel's support, or within ε/2 of θ (the in_window
  metric): outside them every term of the loss gradient is exactly zero."""
  diff_BxF = pre_BxF - theta_F
  k_BxF = ops.kernel_fn(kernel, diff_BxF / bandwidth)
  return (ops.heaviside(diff_BxF) > 0) | (k_BxF != 0) | (jnp.abs(diff_BxF) < 0.5 * bandwidth)


def _lists(bits_BxW, bits_FxV, n_cap, slice_words):
  """The candidate entries as int32 arrays of n_cap entries (valid below nnz), slice-major, and
  what places them in feature-major order.

  Slice-major (b row, j feature, c, ptr_SB1): the features cut into slices of `slice_words` words
  (the last may be shorter), each listed row-major; c is j's column within its slice and ptr_SB1
  [S·B + 1] delimits each (slice, row). Feature-major: bits_FxV (the packed transpose), start_M
  (the list position of each of its words' first set bit) and ptr_F1 [F + 1].
  """
  batch, words = bits_BxW.shape
  n_slices = -(-words // slice_words)
  slice_width = slice_words * _BITS
  bits_SBxV = jnp.pad(bits_BxW, ((0, 0), (0, n_slices * slice_words - words)))
  bits_SBxV = bits_SBxV.reshape(batch, n_slices, slice_words).transpose(1, 0, 2)
  r_N, c_N, ptr_SB1, nnz = _compact(bits_SBxV.reshape(n_slices * batch, slice_words), n_cap,
                                    slice_width)
  # The feature-major order needs no second compaction: where the slice-major entry (b, j) lands
  # is ptr_F1[j] + the set bits of column j above row b, read off the packed transpose.
  start_M, _, ptr_F1 = _word_offsets(bits_FxV)
  return {"b": r_N % batch, "j": (r_N // batch) * slice_width + c_N, "c": c_N,
          "ptr_SB1": ptr_SB1, "nnz": nnz, "bits_FxV": bits_FxV, "start_M": start_M,
          "ptr_F1": ptr_F1}


def _sparse(params, x_BxD, xw_BxF, lists, slice_width, lam, bandwidth, kernel):
  """value_and_grad's sparse branch: ((loss, aux), grads) evaluated on the listed entries only.

  xw_BxF is x·W_enc without b_enc; `lists` comes from _lists (its nnz ≤ capacity, which the
  caller's lax.cond checks); slice_width: features per decode slice (the last may be narrower).
  """
  batch, width = xw_BxF.shape
  theta_F = sae.threshold(params)
  nnz = lists["nnz"]
  n_cap = lists["b"].shape[0]
  valid_N = jnp.arange(n_cap) < nnz

  # Slice-major list: decode x̂ = f·W_dec one slice of features at a time (CSR × dense).
  b_N, j_N = lists["b"], jnp.minimum(lists["j"], width - 1)
  z_N = xw_BxF[b_N, j_N] + params["b_enc"][j_N]
  pre_N = jax.nn.relu(z_N)
  act_N = ops.heaviside(pre_N - theta_F[j_N]) * valid_N
  f_N = pre_N * act_N
  x_hat_BxD = params["b_dec"]
  for k in range((lists["ptr_SB1"].shape[0] - 1) // batch):
    lo, hi = k * slice_width, min((k + 1) * slice_width, width)
    ptr_B1 = lists["ptr_SB1"][k * batch:(k + 1) * batch + 1]
    x_hat_BxD = x_hat_BxD + _csr_rows(f_N, lists["c"], ptr_B1, params["W_dec"][lo:hi],
                                      first=k == 0)
  r_BxD = x_hat_BxD - x_BxD
  recon_B = jnp.sum(r_BxD**2, axis=-1)
  l0_B = jax.ops.segment_sum(act_N, b_N, batch)
  loss = jnp.mean(recon_B + lam * l0_B)
  g_xhat_BxD = (2.0 / batch) * r_BxD

  # Feature-major list of the same entries: ∂f there, then every gradient. Each entry is moved
  # to its place in (feature, row) order with its row, feature and z (one scatter).
  bits_FxV, ptr_F1 = lists["bits_FxV"], lists["ptr_F1"]
  w_N = j_N * bits_FxV.shape[1] + b_N // _BITS
  below_N = jnp.uint32(1) << (b_N % _BITS).astype(jnp.uint32)
  rank_N = lax.population_count(bits_FxV.reshape(-1)[w_N] & (below_N - 1)).astype(jnp.int32)
  pos_N = jnp.where(valid_N, lists["start_M"][w_N] + rank_N, n_cap + jnp.arange(n_cap))  # drop
  moved_Nx3 = jnp.stack([b_N, j_N, lax.bitcast_convert_type(z_N, jnp.int32)], axis=-1)
  moved_Nx3 = jnp.zeros_like(moved_Nx3).at[pos_N].set(moved_Nx3, mode="drop",
                                                      unique_indices=True)
  s_N, t_N = moved_Nx3[:, 0], moved_Nx3[:, 1]
  z_N = lax.bitcast_convert_type(moved_Nx3[:, 2], jnp.float32)
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
  bits_M = bits_RxW.reshape(-1)
  start_M, end_M, ptr_R1 = _word_offsets(bits_RxW)
  # The word of each list entry: mark where each word's run starts, then a running count.
  marks_N = jnp.zeros((n_cap,), jnp.int32).at[start_M].add(1, mode="drop")
  word_N = jnp.clip(jnp.cumsum(marks_N) - 1, 0, n_rows * n_words - 1)
  rank_N = jnp.arange(n_cap, dtype=jnp.int32) - start_M[word_N]  # among the word's set bits
  bit_N = _select_bit(bits_M[word_N], rank_N)
  row_N = word_N // n_words
  col_N = jnp.minimum((word_N % n_words) * _BITS + bit_N, n_cols - 1)
  return row_N, col_N, ptr_R1, end_M[-1]


def _word_offsets(bits_RxW):
  """For a packed [R, 32·W] mask listed row-major: the list positions of each word's first set
  bit and one past its last (start_M, end_M) and the CSR row pointers ptr_R1 [R + 1]."""
  pop_M = lax.population_count(bits_RxW.reshape(-1)).astype(jnp.int32)
  end_M = jnp.cumsum(pop_M)
  ptr_R1 = jnp.concatenate([jnp.zeros((1,), jnp.int32), end_M.reshape(bits_RxW.shape)[:, -1]])
  return end_M - pop_M, end_M, ptr_R1


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


def _csr_rows(data_N, col_N, ptr_R1, dense_CxD, first: bool):
  """S @ dense for the rows of a list that ptr_R1 delimits (row r holds entries ptr_R1[r] ≤ n <
  ptr_R1[r + 1]). XLA:CPU's CSR kernel reads such offset pointers as they are. Elsewhere (GPU
  and the generic lowering read the format strictly: ptr[0] = 0) the rows are first rotated to
  the front of the list (_row_block)."""
  shape = (ptr_R1.shape[0] - 1, dense_CxD.shape[0])
  if first:
    return _csr_matmul(data_N, col_N, ptr_R1, dense_CxD, shape)
  return lax.platform_dependent(
      cpu=lambda: _csr_matmul(data_N, col_N, ptr_R1, dense_CxD, shape),
      default=lambda: _csr_matmul(*_row_block(data_N, col_N, ptr_R1), dense_CxD, shape))


def _row_block(data_N, col_N, ptr_R1):
  """The rows that ptr_R1 delimits as a standard CSR matrix (data, cols, pointers from 0)."""
  start = ptr_R1[0]
  return jnp.roll(data_N, -start), jnp.roll(col_N, -start), ptr_R1 - start


def _sddmm(a_RxD, b_CxD, row_N, col_N, count):
  """a[row]·b[col] for the first `count` list entries (0 after), one gathered block at a time."""
  n = row_N.shape[0]
  chunk = min(_SDDMM_CHUNK, n)
  pad = -n % chunk
  row_KxC = jnp.pad(row_N, (0, pad)).reshape(-1, chunk)
  col_KxC = jnp.pad(col_N, (0, pad)).reshape(-1, chunk)

  ones_D = jnp.ones((a_RxD.shape[1],), a_RxD.dtype)

  def block(k, out_KxC):
    a_CxD = a_RxD.at[row_KxC[k]].get(mode="promise_in_bounds")
    b_CxD = b_CxD_all.at[col_KxC[k]].get(mode="promise_in_bounds")
    # The row sums as a product with ones: XLA:CPU then fuses both gathers and the multiply into
    # one pass that writes a single [chunk, D] block, where jnp.sum(a * b, -1) is handed whole to
    # a YNNPACK reduction that needs both gathered blocks materialised first (2× slower here).
    return out_KxC.at[k].set((a_CxD * b_CxD) @ ones_D)

  b_CxD_all = b_CxD
  out_KxC = lax.fori_loop(0, (count + chunk - 1) // chunk, block,
                          jnp.zeros(row_KxC.shape, a_RxD.dtype))
  return out_KxC.reshape(-1)[:n]


# ----------------------------------------------------------------------------- where it runs

def choose_step_impl(c, platform: str) -> tuple[str, str]:
  """(the step train.step_impl="auto" runs on `platform`, why). Any other value is kept.

  A rule, not a compile probe (scripts/aot_tpu.py --probe_sparse_s is one): this step is
  2.3–3.0× faster than the dense one on CPU at L0 = 1% of F (BENCHMARKS.md), but XLA's TPU
  compile of it at 131k wide had not finished after 25 minutes (14 GiB of host RAM, v4), and on
  GPU it is unmeasured; so dense there."""
  impl = c.train.step_impl
  if impl != "auto":
    return impl, f"train.step_impl={impl!r}"
  if (c.sae.arch != "jumprelu" or sweep.is_sweep(c) or not objectives.uses_paper_loss(c)
      or not c.sae.pre_relu or c.sae.bandwidth_rule != "fixed" or c.sae.topk_start_steps):
    return "dense", ("this step is the single JumpReLU SAE's with the paper's loss, the ReLU, "
                     f"a fixed bandwidth and no TopK start only (sae.arch={c.sae.arch!r}, a "
                     f"sweep: {sweep.is_sweep(c)}, sae.bandwidth_rule={c.sae.bandwidth_rule!r}, "
                     f"sae.topk_start_steps={c.sae.topk_start_steps})")
  if platform == "cpu":
    return "sparse", "on CPU it is 2.3–3.0× faster than the dense step at L0 = 1% of F"
  if platform == "tpu":
    return "dense", ("on TPU the sparse step's compile had not finished after 25 minutes at "
                     "131k wide (v4); the dense one compiles in ~20 s")
  return "dense", f"the sparse step is unmeasured on {platform}"


def resolve_step_impl(c, platform: str):
  """c with train.step_impl="auto" replaced by choose_step_impl's choice (c itself otherwise),
  the choice and why logged."""
  if c.train.step_impl != "auto":
    return c
  impl, why = choose_step_impl(c, platform)
  logging.info("train.step_impl=auto: the %s step (%s)", impl, why)
  c = c.copy_and_resolve_references()
  with c.unlocked():
    c.train.step_impl = impl
  return c
