"""Per-feature statistics gathered on the device while text streams through an SAE, for the
feature browser: nothing per token ever reaches the host.

For each feature, over the kept positions of every context seen (state is a plain dict):
  top_*     the K contexts where it fires hardest (one example per context: its max position),
            with the feature's activations in a window around that position
  smp_*     S firing tokens drawn uniformly at random (priority sampling: each (token, feature)
            gets a uniform key; the S largest keys are a uniform sample without replacement), so
            sorted by value they spread across the quantiles of its activation distribution
  fires_F   how many tokens it fired on, sum_F the sum of its activations there
  hist_FxH  counts of its nonzero activations in log-spaced bins (HIST_EDGES)
  tokens    kept tokens seen
Empty slots hold value -1 and context -1. Dimension letters: B contexts in a batch, L positions,
F features, K top examples, S samples, W window positions, H histogram bins.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Log-spaced histogram bins over raw activation magnitudes (scale-free: SAEs of any LM fit).
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_PER_DECADE = -3.0, 5.0, 10
HIST_BINS = int((HIST_LOG10_MAX - HIST_LOG10_MIN) * HIST_PER_DECADE)
HIST_EDGES = 10.0 ** np.linspace(HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS + 1)


def init(width: int, top_k: int, samples: int, before: int, after: int) -> dict:
  """Empty statistics for F = width features; windows hold `before` positions, the example's,
  and `after` positions."""
  w = before + 1 + after
  empty = lambda n: {"val": -jnp.ones((width, n), jnp.float32),
                     "ctx": -jnp.ones((width, n), jnp.int32),
                     "pos": jnp.zeros((width, n), jnp.int32),
                     "win": jnp.zeros((width, n, w), jnp.float32)}
  return {"top": empty(top_k), "smp": {**empty(samples), "key": -jnp.ones((width, samples))},
          "fires_F": jnp.zeros(width, jnp.int32), "sum_F": jnp.zeros(width, jnp.float32),
          "hist_FxH": jnp.zeros((width, HIST_BINS), jnp.int32),
          "tokens": jnp.zeros((), jnp.int32)}


def _windows(f_BxLxF, b_FxN, pos_FxN, before: int, after: int):
  """f[b, pos + o, feature] for o in [-before, after] (0 outside the context) [F, N, W]."""
  L, F = f_BxLxF.shape[1], f_BxLxF.shape[2]
  q_FxNxW = pos_FxN[..., None] + jnp.arange(-before, after + 1)
  inside = (q_FxNxW >= 0) & (q_FxNxW < L)
  feat_FxNxW = jnp.broadcast_to(jnp.arange(F)[:, None, None], q_FxNxW.shape)
  vals = f_BxLxF[b_FxN[..., None], jnp.clip(q_FxNxW, 0, L - 1), feat_FxNxW]
  return jnp.where(inside, vals, 0.0)


def _merge(slots: dict, key_FxN, ctx_FxN, pos_FxN, val_FxN, f_BxLxF, b_FxN, before, after):
  """The running slots and a batch's candidates, ranked by `key` (the value itself for top
  examples, the random priority for samples); keeps as many as there are slots."""
  n = slots["ctx"].shape[1]
  old_key = slots["key"] if "key" in slots else slots["val"]
  ranked_key, idx_FxN = jax.lax.top_k(jnp.concatenate([old_key, key_FxN], axis=1), n)
  pick = lambda old, new: jnp.take_along_axis(jnp.concatenate([old, new], axis=1), idx_FxN, 1)
  from_batch = idx_FxN >= n
  b_sel = jnp.take_along_axis(b_FxN, jnp.maximum(idx_FxN - n, 0), axis=1)
  pos = pick(slots["pos"], pos_FxN)
  new_win = _windows(f_BxLxF, b_sel, pos, before, after)
  old_win = jnp.take_along_axis(slots["win"], jnp.minimum(idx_FxN, n - 1)[..., None], axis=1)
  out = {"val": pick(slots["val"], val_FxN), "ctx": pick(slots["ctx"], ctx_FxN), "pos": pos,
         "win": jnp.where(from_batch[..., None], new_win, old_win)}
  if "key" in slots:
    out["key"] = ranked_key
  return out


def update(state: dict, f_BxLxF, keep_BxL, ctx0, rng, *, before: int, after: int) -> dict:
  """state after the contexts ctx0 .. ctx0 + B - 1, whose features are f_BxLxF (0 where
  keep_BxL is False: a batch padded with contexts of padding tokens adds nothing). rng: a PRNG
  key for the samples, a new one per batch. Pure; jit it inside the step that computes f."""
  B, L, F = f_BxLxF.shape
  fired = f_BxLxF > 0
  ctx_B = (ctx0 + jnp.arange(B)).astype(jnp.int32)
  # Top examples: per context its max position, then the K best contexts.
  m_FxB = jnp.max(f_BxLxF, axis=1).T
  p_FxB = jnp.argmax(f_BxLxF, axis=1).T.astype(jnp.int32)
  m_FxB = jnp.where(m_FxB > 0, m_FxB, -1.0)
  b_FxB = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32), (F, B))
  top = _merge(state["top"], m_FxB, jnp.broadcast_to(ctx_B, (F, B)), p_FxB, m_FxB, f_BxLxF,
               b_FxB, before, after)
  # Samples: uniform priorities over firing (token, feature) pairs.
  prio_FxBL = jnp.where(fired, jax.random.uniform(rng, f_BxLxF.shape), -1.0).reshape(B * L, F).T
  flat_FxBL = jnp.broadcast_to(jnp.arange(B * L, dtype=jnp.int32), (F, B * L))
  s = min(state["smp"]["ctx"].shape[1], B * L)
  key_FxS, flat_FxS = jax.lax.top_k(prio_FxBL, s)  # the batch's best s, then merged
  flat_FxS = jnp.take_along_axis(flat_FxBL, flat_FxS, axis=1)
  b_FxS, pos_FxS = flat_FxS // L, flat_FxS % L
  val_FxS = jnp.where(key_FxS >= 0, f_BxLxF[b_FxS, pos_FxS, jnp.arange(F)[:, None]], -1.0)
  smp = _merge(state["smp"], key_FxS, jnp.where(key_FxS >= 0, ctx_B[b_FxS], -1), pos_FxS,
               val_FxS, f_BxLxF, b_FxS, before, after)
  # Density and histogram.
  log_bin = (jnp.log10(jnp.maximum(f_BxLxF, 1e-30)) - HIST_LOG10_MIN) * HIST_PER_DECADE
  bin_BxLxF = jnp.clip(jnp.floor(log_bin).astype(jnp.int32), 0, HIST_BINS - 1)
  feat_BxLxF = jnp.broadcast_to(jnp.arange(F), f_BxLxF.shape)
  hist = state["hist_FxH"].at[feat_BxLxF, bin_BxLxF].add(fired.astype(jnp.int32))
  return {"top": top, "smp": smp, "fires_F": state["fires_F"] + jnp.sum(fired, axis=(0, 1)),
          "sum_F": state["sum_F"] + jnp.sum(f_BxLxF, axis=(0, 1)), "hist_FxH": hist,
          "tokens": state["tokens"] + jnp.sum(keep_BxL).astype(jnp.int32)}


def to_numpy(state: dict) -> dict:
  """The statistics on the host: top and samples sorted by value, descending, per feature."""
  s = jax.tree.map(np.asarray, jax.device_get(state))
  for slots in (s["top"], s["smp"]):  # a slot no firing token reached stays empty
    slots["ctx"] = np.where(slots["val"] > 0, slots["ctx"], -1)
  order = np.argsort(-s["smp"]["val"], axis=1, kind="stable")
  s["smp"] = {k: np.take_along_axis(v, order.reshape(order.shape + (1,) * (v.ndim - 2)), 1)
              for k, v in s["smp"].items()}
  return s
