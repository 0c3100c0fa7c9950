"""The fused dense backward (sae.loss) and the sparse step (sparse.py) against autodiff.

Tolerances: the sparse step adds the same non-zero terms as the dense one, in another order
(CSR products accumulate per row or per feature; the dense path uses blocked GEMMs), so the two
agree to float32 rounding. Each gradient leaf is compared with atol = 1e-5·max|leaf| (a few
hundred ulps of the largest entry, well above the ~1e-7·√B accumulated rounding) and rtol 1e-4.
After five Adam steps on a trained SAE the parameters agree within 1e-6 absolute: two float32 ulps
of the largest ones (|log θ| ≈ 4, ulp 4.8e-7); the measured gap is one ulp.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

from jumprelu import ops, run, sae, sharding, sparse, train, validate
from tests.conftest import tiny

EPS = 0.05  # bandwidth wide enough that the STE window holds several entries per feature


def _reference_loss(params, x, *, sparsity_coefficient, bandwidth, kernel="rectangle"):
  """Eq. 10 by autodiff through ops.jumprelu and ops.step: what sae.loss's backward must equal."""
  theta = sae.threshold(params)
  pre = sae.pre_activations(params, x)
  f = ops.jumprelu(pre, theta, bandwidth, kernel)
  x_hat = sae.decode(params, f)
  recon = jnp.sum((x - x_hat) ** 2, -1)
  l0 = jnp.sum(ops.step(pre, theta, bandwidth, kernel), -1)
  aux = {"recon_B": recon, "l0_B": l0, "f_BxF": f, "pre_BxF": pre, "x_hat_BxD": x_hat}
  return jnp.mean(recon + sparsity_coefficient * l0), aux


def _sae(threshold_param="log", d=16, f=96, b=64, seed=0, quantile=0.9):
  """A random SAE whose θ puts ~10% of entries above threshold and several inside the window."""
  rng = np.random.default_rng(seed)
  params = sae.init(jax.random.key(seed), d, f, threshold_param=threshold_param)
  params["b_enc"] = jnp.asarray(rng.normal(0, 0.05, f), jnp.float32)
  x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
  pre = np.asarray(sae.pre_activations(params, x))
  theta = np.maximum(np.quantile(pre, quantile, axis=0), 1e-3).astype(np.float32)
  theta[:8] = pre[0, :8] + EPS / 4  # row 0 of the first 8 features sits inside the window
  if threshold_param == "log":
    params["log_threshold"] = jnp.log(jnp.asarray(theta))
  else:
    params["threshold"] = jnp.asarray(theta)
  return params, x


def _assert_grads_close(got, want):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    scale = float(np.max(np.abs(w))) or 1.0
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- fused dense loss

@pytest.mark.parametrize("kernel", ops.KERNELS)
@pytest.mark.parametrize("threshold_param", sae.THRESHOLD_PARAMS)
@pytest.mark.parametrize("jit", [False, True])
def test_fused_loss_backward_equals_autodiff(kernel, threshold_param, jit):
  """Every cotangent path (loss and each aux output, toward params, x and λ) matches."""
  params, x = _sae(threshold_param, d=6, f=10, b=7, quantile=0.5)

  def objective(loss_fn):
    def fn(p, x, lam):
      loss, a = loss_fn(p, x, sparsity_coefficient=lam, bandwidth=EPS, kernel=kernel)
      return (loss + 0.3 * jnp.sum(a["recon_B"] ** 2) + jnp.sum(a["l0_B"] * jnp.arange(7.0))
              + jnp.sum(jnp.sin(a["f_BxF"])) + jnp.sum(a["pre_BxF"] ** 2)
              + jnp.sum(jnp.cos(a["x_hat_BxD"])))
    grad = jax.grad(fn, argnums=(0, 1, 2))
    return jax.jit(grad) if jit else grad

  got = objective(sae.loss)(params, x, 0.5)
  want = objective(_reference_loss)(params, x, 0.5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  jaxpr = str(jax.make_jaxpr(lambda p: sae.loss(p, x, sparsity_coefficient=0.5,
                                                 bandwidth=EPS)[0])(params))
  assert "custom_vjp_call" in jaxpr  # the hand-written backward is what gets differentiated


# ----------------------------------------------------------------------------- index lists

@pytest.mark.parametrize("shape", [(37, 70), (64, 96), (5, 33)])
def test_compaction_lists_every_set_bit_in_order(shape):
  mask = np.random.default_rng(1).random(shape) < 0.15
  rows_bits = sparse._pack_bits(jnp.asarray(mask))
  for bits, m in ((rows_bits, mask), (sparse._transpose_bits(rows_bits, shape[0])[:shape[1]],
                                      mask.T)):
    row, col, ptr, count = sparse._compact(bits, m.size, m.shape[1])
    want_row, want_col = np.nonzero(m)
    n = len(want_row)
    assert int(count) == n
    np.testing.assert_array_equal(np.asarray(row)[:n], want_row)
    np.testing.assert_array_equal(np.asarray(col)[:n], want_col)
    np.testing.assert_array_equal(ptr, np.concatenate([[0], np.cumsum(m.sum(1))]))


def test_a_slice_of_the_list_is_a_standard_csr_matrix():
  """Off CPU, each decode slice is handed to the CSR kernels as a matrix of its own, with
  ptr[0] = 0; densified by jax's generic path (which reads the format strictly) it is the
  slice's entries."""
  mask = np.random.default_rng(3).random((3 * 11, 40)) < 0.3  # 3 slices of 11 rows
  rows_bits = sparse._pack_bits(jnp.asarray(mask))
  row, col, ptr, count = sparse._compact(rows_bits, mask.size, 40)
  values = jnp.where(jnp.arange(mask.size) < count, jnp.arange(mask.size, dtype=jnp.float32), 0)
  dense = np.zeros(mask.shape, np.float32)
  dense[np.nonzero(mask)] = np.arange(mask.sum())
  for k in range(3):
    data, cols, ptr_k = sparse._row_block(values, col, ptr[k * 11:(k + 1) * 11 + 1])
    assert int(ptr_k[0]) == 0
    got = jsparse.BCSR((data, cols, ptr_k), shape=(11, 40)).todense()
    np.testing.assert_array_equal(got, dense[k * 11:(k + 1) * 11])


# ----------------------------------------------------------------------------- sparse gradients

def _dense(params, x, lam, kernel):
  loss_fn = lambda p: sae.loss(p, x, sparsity_coefficient=lam, bandwidth=EPS, kernel=kernel)
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


def _sparse(params, x, lam, kernel, capacity, decode_slices=None):
  return jax.jit(lambda p, x: sparse.value_and_grad(
      p, x, sparsity_coefficient=lam, bandwidth=EPS, kernel=kernel, capacity=capacity,
      decode_slices=decode_slices))(params, x)


@pytest.mark.parametrize("kernel", ["rectangle", "triangle", "gaussian"])
@pytest.mark.parametrize("threshold_param", sae.THRESHOLD_PARAMS)
def test_sparse_gradients_equal_dense(kernel, threshold_param):
  params, x = _sae(threshold_param)
  theta = sae.threshold(params)
  pre = sae.pre_activations(params, x)
  in_window = np.abs(np.asarray(pre - theta)) < EPS / 2
  assert in_window[0, :8].all() and in_window.sum() > 8  # the STE window is exercised
  (loss, aux), grads = _dense(params, x, 0.3, kernel)
  # The Gaussian kernel's support ends where exp underflows (|π − θ| ≈ 14ε); it needs room.
  capacity = 0.9 if kernel == "gaussian" else 0.3
  (s_loss, s_aux), s_grads = _sparse(params, x, 0.3, kernel, capacity)
  assert float(s_aux["dense_fallback"]) == 0.0  # the sparse branch ran
  np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(s_aux["recon_B"], aux["recon_B"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(s_aux["l0_B"], aux["l0_B"])
  np.testing.assert_array_equal(s_aux["fired_F"], np.any(pre > theta, axis=0))
  np.testing.assert_allclose(s_aux["in_window"], in_window.mean())
  _assert_grads_close(s_grads, grads)
  assert np.any(s_grads[next(k for k in s_grads if "threshold" in k)])


@pytest.mark.parametrize("slices", [3, 50])
def test_decoding_in_feature_slices_changes_nothing(slices):
  """x̂ decoded slice by slice (F = 200: 7 words in slices of 3, 3 and 1, the last word partly
  padding; or more slices asked for than there are words) gives the dense loss and gradients."""
  params, x = _sae(f=200, seed=2)
  (loss, aux), grads = _dense(params, x, 0.3, "rectangle")
  (s_loss, s_aux), s_grads = _sparse(params, x, 0.3, "rectangle", 0.3, decode_slices=slices)
  assert float(s_aux["dense_fallback"]) == 0.0
  np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(s_aux["recon_B"], aux["recon_B"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(s_aux["l0_B"], aux["l0_B"])
  _assert_grads_close(s_grads, grads)


def test_overflow_falls_back_to_the_dense_loss():
  params, x = _sae()
  (loss, aux), grads = _dense(params, x, 0.3, "rectangle")
  (s_loss, s_aux), s_grads = _sparse(params, x, 0.3, "rectangle", capacity=0.01)
  assert float(s_aux["dense_fallback"]) == 1.0
  np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
  np.testing.assert_array_equal(s_aux["l0_B"], aux["l0_B"])
  _assert_grads_close(s_grads, grads)


# ----------------------------------------------------------------------------- train step

def _trained_state(c, steps):
  """A tiny SAE trained with the dense step until it is sparse (L0 ≪ width)."""
  mesh = sharding.make_mesh(1, 1)
  state, shardings = train.sharded_init(c, mesh, jax.random.key(c.seed), 1.0)
  source, _ = run.make_source(c)
  step_fn = train.jit_train_step(c, mesh, shardings)
  for s in range(steps):
    state, metrics = step_fn(state, source.batch(s, c.train.batch_size))
  return jax.device_get(state), float(metrics["l0"])


def _steps(c, state, start, steps, mesh_shape=(1, 1)):
  mesh = sharding.make_mesh(*mesh_shape)
  abstract = jax.eval_shape(lambda: train.init_state(c, jax.random.key(0), 1.0))
  shardings = sharding.tree_shardings(mesh, abstract)
  state = jax.device_put(state, shardings)
  source, _ = run.make_source(c)
  chex.clear_trace_counter()
  step_fn = train.jit_train_step(c, mesh, shardings,
                                 step_fn=chex.assert_max_traces(train.train_step, n=1))
  history = []
  for s in range(start, start + steps):
    x = sharding.global_batch(mesh, source.batch(s, c.train.batch_size), c.train.batch_size)
    state, metrics = step_fn(state, x)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


@pytest.fixture(scope="module")
def trained():
  c = tiny(**{"sae.sparsity_coefficient": 0.03, "optim.sparsity_warmup_steps": 0,
              "optim.lr_warmup_steps": 0, "optim.learning_rate": 3e-3, "sae.bandwidth": 0.01})
  state, l0 = _trained_state(c, 300)
  assert l0 < 0.25 * c.sae.width, l0
  return c, state


def test_sparse_train_step_matches_dense_on_a_trained_sae(trained):
  c, state = trained
  dense_state, dense_hist = _steps(c, state, 300, 5)
  c_sparse = tiny(**{**{k: c[k.split(".")[0]][k.split(".")[1]] for k in (
      "sae.sparsity_coefficient", "optim.sparsity_warmup_steps", "optim.lr_warmup_steps",
      "optim.learning_rate", "sae.bandwidth")}, "train.step_impl": "sparse",
      "train.sparse_capacity": 0.5})
  sparse_state, sparse_hist = _steps(c_sparse, state, 300, 5)
  assert all(float(m["dense_fallback"]) == 0.0 for m in sparse_hist)
  assert sum(float(m["in_window"]) for m in sparse_hist) > 0  # θ got window gradients
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(dense_state),
                          jax.tree.leaves(sparse_state)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  for k in dense_hist[-1]:
    np.testing.assert_allclose(sparse_hist[-1][k], dense_hist[-1][k], rtol=1e-4, atol=1e-6,
                               err_msg=k)


def test_sparse_step_with_the_dictionary_split_across_devices(trained):
  """F split over "model" (and B over "data"): same result as on one device."""
  c, state = trained
  c = tiny(**{"sae.sparsity_coefficient": 0.03, "optim.sparsity_warmup_steps": 0,
              "optim.lr_warmup_steps": 0, "optim.learning_rate": 3e-3, "sae.bandwidth": 0.01,
              "train.step_impl": "sparse", "train.sparse_capacity": 0.5})
  one, one_hist = _steps(c, state, 300, 3)
  split, split_hist = _steps(c, state, 300, 3, mesh_shape=(2, 4))
  assert float(split_hist[-1]["dense_fallback"]) == 0.0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(split)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-5,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("key,value,message", [
    ("train.step_impl", "fast",
     r"train.step_impl must be one of \('dense', 'sparse', 'auto'\), got 'fast'"),
    ("train.sparse_capacity", 0.0, r"train.sparse_capacity must be in \(0, 1\]"),
])
def test_bad_step_keys_fail_validation(key, value, message):
  with pytest.raises(ValueError, match=message):
    validate.check_config(tiny(**{key: value}))
