"""Linear probes for the downstream evaluations (SAEBench, Karvonen et al. 2025, arXiv
2503.09532): logistic regression, an L1-regularised multi-probe that ranks SAE features,
k-sparse probes on the k features whose class means differ most, and their scores.

Plain numpy in float64 (the problems are small: thousands of rows, at most a few thousand
columns); the L1 probe runs in JAX since it sees every feature. Labels are bool arrays.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def fit_logistic(X_NxK, y_N, *, c: float = 1.0, iters: int = 100) -> tuple[np.ndarray, float]:
  """(w [K], b) minimising Σ log-loss + ‖w‖² / (2c) (scikit-learn's LogisticRegression with
  C = c, the probe SAEBench trains), by Newton's method with a backtracking line search."""
  X = np.asarray(X_NxK, np.float64)
  y = np.asarray(y_N, np.float64)
  A = np.concatenate([X, np.ones((len(X), 1))], axis=1)
  reg = np.full(A.shape[1], 1.0 / c)
  reg[-1] = 0.0  # the bias is not penalised

  def objective(theta):
    z = A @ theta
    return np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(reg * theta**2)

  theta = np.zeros(A.shape[1])
  value = objective(theta)
  for _ in range(iters):
    p = 1.0 / (1.0 + np.exp(-(A @ theta)))
    grad = A.T @ (p - y) + reg * theta
    hess = (A * (p * (1 - p))[:, None]).T @ A + np.diag(reg) + 1e-10 * np.eye(A.shape[1])
    step = np.linalg.solve(hess, grad)
    t = 1.0
    while t > 1e-8 and objective(theta - t * step) > value - 0.25 * t * grad @ step:
      t *= 0.5
    theta, new = theta - t * step, objective(theta - t * step)
    if value - new < 1e-10 * max(1.0, abs(value)):
      value = new
      break
    value = new
  return theta[:-1], float(theta[-1])


def scores(w_K, b: float, X_NxK) -> np.ndarray:
  """The probe's logits [N]; positive means class True."""
  return np.asarray(X_NxK, np.float64) @ w_K + b


def accuracy(scores_N, y_N) -> float:
  return float(np.mean((np.asarray(scores_N) > 0) == np.asarray(y_N, bool)))


def f1(pred_N, y_N) -> float:
  """F1 of boolean predictions (0 when nothing is predicted or nothing is positive)."""
  pred, y = np.asarray(pred_N, bool), np.asarray(y_N, bool)
  tp = np.sum(pred & y)
  if tp == 0:
    return 0.0
  precision, recall = tp / np.sum(pred), tp / np.sum(y)
  return float(2 * precision * recall / (precision + recall))


def mean_diff_top_k(X_NxF, y_N, k: int) -> np.ndarray:
  """The k columns whose mean differs most between the classes, |mean_pos − mean_neg|
  descending (SAEBench's sparse-probing feature selection; ties: lower index first)."""
  X, y = np.asarray(X_NxF, np.float64), np.asarray(y_N, bool)
  diff = np.abs(X[y].mean(axis=0) - X[~y].mean(axis=0))
  return np.argsort(-diff, kind="stable")[:k]


def k_sparse_probe(X_train, y_train, X_test, y_test, k: int) -> dict:
  """SAEBench's k-sparse probe: logistic regression on the mean_diff_top_k features of the
  training set; its held-out accuracy and the features."""
  idx = mean_diff_top_k(X_train, y_train, k)
  w, b = fit_logistic(np.asarray(X_train)[:, idx], y_train)
  return {"accuracy": accuracy(scores(w, b, np.asarray(X_test)[:, idx]), y_test),
          "features": idx.tolist()}


def dense_probe(X_train, y_train, X_test, y_test) -> dict:
  """Logistic regression on every column (the raw-activation baseline)."""
  w, b = fit_logistic(X_train, y_train)
  return {"accuracy": accuracy(scores(w, b, X_test), y_test)}


@functools.partial(jax.jit, static_argnames=("steps",))
def _l1_multi_probe(X_NxF, Y_NxC, l1, lr, steps: int):
  """Proximal gradient (ISTA) on mean_N,C BCE + l1 · mean_C ‖W_c‖₁ for C probes at once."""
  N, C = Y_NxC.shape
  thresh = lr * l1 / C

  def body(_, carry):
    W_CxF, b_C = carry
    p_NxC = jax.nn.sigmoid(X_NxF @ W_CxF.T + b_C)
    g_NxC = (p_NxC - Y_NxC) / (N * C)
    W_CxF = W_CxF - lr * (g_NxC.T @ X_NxF)
    W_CxF = jnp.sign(W_CxF) * jnp.maximum(jnp.abs(W_CxF) - thresh, 0.0)
    return W_CxF, b_C - lr * jnp.sum(g_NxC, axis=0)

  return jax.lax.fori_loop(0, steps, body, (jnp.zeros((C, X_NxF.shape[1])), jnp.zeros(C)))


def l1_multi_probe(X_NxF, Y_NxC, *, l1: float = 0.01, steps: int = 500) -> np.ndarray:
  """Weights [C, F] of C one-vs-rest logistic probes with an L1 penalty (SAEBench ranks a
  class's features by these, largest positive first). Columns are scaled to unit standard
  deviation first, so the penalty treats features of every scale alike; the returned weights
  are in those units."""
  X = np.asarray(X_NxF, np.float32)
  X = X / np.maximum(X.std(axis=0), 1e-6)
  N, C = np.shape(Y_NxC)
  # The smooth part's gradient is Lipschitz with ‖X‖₂² / (4 N C): ‖X‖₂ by power iteration.
  v = np.ones(X.shape[1], np.float32) / np.sqrt(X.shape[1])
  for _ in range(30):
    v = X.T @ (X @ v)
    v /= max(np.linalg.norm(v), 1e-30)
  lipschitz = float(np.linalg.norm(X @ v)) ** 2 / (4.0 * N * C) + 1e-12
  W, _ = _l1_multi_probe(jnp.asarray(X), jnp.asarray(Y_NxC, jnp.float32), l1,
                         1.0 / lipschitz, steps)
  return np.asarray(W)


def balanced_split(y_N, rng, test_fraction: float = 0.2, max_per_class: int | None = None):
  """(train indices, test indices) with as many negatives as positives (negatives drawn at
  random, SAEBench's balancing), split at random; at most max_per_class of each."""
  y = np.asarray(y_N, bool)
  pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
  n = min(len(pos), len(neg), max_per_class or len(y))
  pos, neg = rng.permutation(pos)[:n], rng.permutation(neg)[:n]
  n_test = max(1, int(round(n * test_fraction)))
  test = np.concatenate([pos[:n_test], neg[:n_test]])
  train = np.concatenate([pos[n_test:], neg[n_test:]])
  return rng.permutation(train), rng.permutation(test)
