"""Which SAE a config trains (`sae.arch`): plain dispatch to sae.py (JumpReLU) or baselines.py.

Every architecture shares the train loop, the sharding, checkpoints and export. Per-member
hyperparameters arrive as `hp`, a dict of (possibly traced, for a vmapped ensemble) scalars:
  sparsity_coefficient  λ after its warm-up (JumpReLU: L0 penalty; ReLU and Gated: L1 penalty)
  bandwidth             ε of JumpReLU's straight-through estimator
  k                     TopK's k (static bound: k_max(c))
Raw-unit exports (export.raw_params) keep each architecture's own names; features() and
split_raw() read them as well as training params.
"""
import jax
import jax.numpy as jnp

from jumprelu import baselines, ops, sae, sparse

ARCHS = ("jumprelu", "relu", "gated", "topk")
# The per-SAE hyperparameters (sweep.AXES) each architecture reads; it ignores the others.
USES = {"jumprelu": ("sparsity_coefficient", "bandwidth"), "relu": ("sparsity_coefficient",),
        "gated": ("sparsity_coefficient",), "topk": ("k",)}


def init(c, key) -> dict:
  """Initial params of the configured architecture (all start from the recipe's decoder)."""
  d, width, arch = c.data.d_in, c.sae.width, c.sae.arch
  if arch == "jumprelu":
    return sae.init(key, d, width, threshold_init=c.sae.threshold_init,
                    threshold_param=c.sae.threshold_param)
  if arch == "relu":
    return baselines.relu_init(key, d, width)
  if arch == "gated":
    return baselines.gated_init(key, d, width)
  if arch == "topk":
    return baselines.topk_init(key, d, width)
  raise ValueError(f"sae.arch must be one of {ARCHS}, got {arch!r}")


def k_max(c) -> int:
  """The largest k any TopK member of this run uses (static, for lax.top_k)."""
  return max(c.sweep.k) if c.sweep.k else c.sae.k


def value_and_grad(c, params: dict, x_BxD, hp: dict, dead_F):
  """((loss, aux), grads) of the configured loss on a normalised batch.

  aux holds recon_B, l0_B, fired_F [F] (fired on this batch) and, for JumpReLU, in_window: the
  fraction of pre-activations within ε/2 of θ (the rectangle STE's window)."""
  arch, lam = c.sae.arch, hp["sparsity_coefficient"]
  if arch == "jumprelu":
    if c.train.step_impl == "sparse":  # same loss and gradients, see sparse.py
      return sparse.value_and_grad(
          params, x_BxD, sparsity_coefficient=lam, bandwidth=hp["bandwidth"],
          kernel=c.sae.kernel, capacity=c.train.sparse_capacity,
          matmul_dtype=c.train.matmul_dtype)
    theta_F = sae.threshold(params)
    loss_fn = lambda p: sae.loss(p, x_BxD, sparsity_coefficient=lam, bandwidth=hp["bandwidth"],
                                 kernel=c.sae.kernel, matmul_dtype=c.train.matmul_dtype)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    aux["fired_F"] = jnp.any(aux["pre_BxF"] > theta_F, axis=0)
    aux["in_window"] = jnp.mean(jnp.abs(aux["pre_BxF"] - theta_F) < 0.5 * hp["bandwidth"])
    return (loss, aux), grads
  if arch == "relu":
    loss_fn = lambda p: baselines.relu_loss(p, x_BxD, sparsity_coefficient=lam)
  elif arch == "gated":
    loss_fn = lambda p: baselines.gated_loss(p, x_BxD, sparsity_coefficient=lam)
  else:
    loss_fn = lambda p: baselines.topk_loss(
        p, x_BxD, k=hp["k"], k_max=k_max(c), k_aux=c.sae.k_aux,
        aux_coefficient=c.sae.aux_coefficient, dead_F=dead_F)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  aux["fired_F"] = jnp.any(aux["f_BxF"] > 0, axis=0)
  return (loss, aux), grads


# ----------------------------------------------------------------------------- raw-unit exports

def name_of(params_raw: dict) -> str:
  """The architecture of a raw-unit export (Gemma Scope files name none: JumpReLU)."""
  name = str(params_raw["architecture"]) if "architecture" in params_raw else "jumprelu"
  if name not in ARCHS:
    raise ValueError(f"unknown SAE architecture {name!r}; expected one of {ARCHS}")
  return name


def split_raw(params_raw: dict) -> tuple[str, int | None, dict]:
  """(architecture, TopK's k or None, the arrays alone) of a raw-unit export."""
  name = name_of(params_raw)
  k = int(params_raw["k"]) if name == "topk" else None
  arrays = {n: v for n, v in params_raw.items() if n not in ("architecture", "k")}
  return name, k, arrays


def features(params: dict, x_BxD, *, arch: str, k: int | None = None):
  """Feature activations f [.., F] of training params or a raw-unit export (k: static int)."""
  if arch == "jumprelu":
    pre = sae.pre_activations(params, x_BxD)
    return pre * ops.heaviside(pre - sae.threshold(params))
  if arch == "relu":
    return baselines.relu_encode(params, x_BxD)[0]
  if arch == "gated":
    return baselines.gated_encode(params, x_BxD)[0]
  shape = x_BxD.shape[:-1]  # top-k over the features of each row, for any leading dims
  f = baselines.topk_encode(params, x_BxD.reshape(-1, x_BxD.shape[-1]), k=k)[0]
  return f.reshape(*shape, f.shape[-1])
