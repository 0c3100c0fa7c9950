"""Which SAE a config trains (`sae.arch`): plain dispatch to sae.py (JumpReLU) or baselines.py.

Every architecture shares the train loop, the sharding, checkpoints and export. Per-member
hyperparameters arrive as `hp`, a dict of (possibly traced, for a vmapped ensemble) scalars:
  sparsity_coefficient  λ after its warm-up (JumpReLU: its sparsity penalty's; ReLU and Gated: L1)
  bandwidth             ε of JumpReLU's straight-through estimator
  k                     TopK's (static bound: k_max(c)) and BatchTopK's k
  target_l0             JumpReLU's target L0 under sae.sparsity_loss="target_l0"
  warmup                the λ warm-up's fraction in [0, 1] (also scales the frequency penalty)
JumpReLU trains on sae.loss (Eq. 10) unless the config asks for another objective
(objectives.py); sae.matryoshka_prefixes applies to every architecture.
Raw-unit exports (export.raw_params) keep each architecture's own names; features() and
split_raw() read them as well as training params.
"""
import jax
import jax.numpy as jnp

from jumprelu import baselines, objectives, ops, sae, sparse

ARCHS = ("jumprelu", "relu", "gated", "topk", "batchtopk")
# The per-SAE hyperparameters (sweep.AXES) each architecture reads; it ignores the others.
USES = {"jumprelu": ("sparsity_coefficient", "bandwidth", "target_l0"),
        "relu": ("sparsity_coefficient",), "gated": ("sparsity_coefficient",), "topk": ("k",),
        "batchtopk": ("k",)}


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
  if arch == "batchtopk":
    return baselines.batchtopk_init(key, d, width)
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
    loss_fn = _matryoshka(c, _jumprelu_loss_fn(c, x_BxD, hp), x_BxD)
    if c.sae.jumprelu_auxk:
      loss_fn = _with_auxk(loss_fn, x_BxD, c.sae.jumprelu_auxk, c.sae.k_aux, dead_F)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    aux["fired_F"] = jnp.any(aux["pre_BxF"] > theta_F, axis=0)
    aux["in_window"] = _in_window(aux["pre_BxF"], theta_F, hp["bandwidth"])
    return (loss, aux), grads
  return _baseline_value_and_grad(c, arch, params, x_BxD, hp, dead_F)


def _in_window(pre_BxF, theta_F, bandwidth):
  """The fraction of pre-activations within ε/2 of θ: the rectangle STE's window."""
  return jnp.mean(jnp.abs(pre_BxF - theta_F) < 0.5 * bandwidth)


def _baseline_value_and_grad(c, arch: str, params: dict, x_BxD, hp: dict, dead_F):
  """value_and_grad of the baseline `arch` (any but JumpReLU) on params; aux gains fired_F."""
  lam = hp["sparsity_coefficient"]
  if arch == "relu":
    loss_fn = lambda p: baselines.relu_loss(p, x_BxD, sparsity_coefficient=lam)
  elif arch == "gated":
    loss_fn = lambda p: baselines.gated_loss(p, x_BxD, sparsity_coefficient=lam)
  elif arch == "topk":
    loss_fn = lambda p: baselines.topk_loss(
        p, x_BxD, k=hp["k"], k_max=k_max(c), k_aux=c.sae.k_aux,
        aux_coefficient=c.sae.aux_coefficient, dead_F=dead_F)
  else:
    loss_fn = lambda p: baselines.batchtopk_loss(
        p, x_BxD, k=hp["k"], k_aux=c.sae.k_aux, aux_coefficient=c.sae.aux_coefficient,
        dead_F=dead_F)
  (loss, aux), grads = jax.value_and_grad(_matryoshka(c, loss_fn, x_BxD), has_aux=True)(params)
  aux["fired_F"] = jnp.any(aux["f_BxF"] > 0, axis=0)
  return (loss, aux), grads


def topk_start_value_and_grad(c, params: dict, x_BxD, hp: dict, dead_F, step):
  """value_and_grad of a JumpReLU SAE with sae.topk_start_steps = N: before step N it trains as a
  TopK SAE (each row's k = sae.k largest ReLU'd pre-activations, TopK's AuxK; θ gets no
  gradient), from step N on with its configured objective. TopK's per-row budget trains latents
  for rare features that a JumpReLU started dense does not find (docs/reproduction.md).

  aux holds recon_B, l0_B, pre_BxF, fired_F, in_window and theta_start: in the TopK steps the
  mean over rows of each row's smallest kept activation (a threshold at which a JumpReLU fires
  about k per row; NaN when no row kept a positive one), after them NaN. train_step sets every
  θ to it while the TopK steps last, so the JumpReLU starts where TopK's sparsity was."""
  keep = ("recon_B", "l0_B", "pre_BxF", "fired_F")

  def topk(p):
    (loss, aux), grads = _baseline_value_and_grad(c, "topk", p, x_BxD, hp, dead_F)
    f_BxF = aux["f_BxF"]
    kept_B = jnp.min(jnp.where(f_BxF > 0, f_BxF, jnp.inf), axis=-1)
    ok_B = jnp.isfinite(kept_B)
    theta = jnp.sum(jnp.where(ok_B, kept_B, 0.0)) / jnp.sum(ok_B)  # NaN when no row kept one
    return (loss, {**{k: aux[k] for k in keep}, "theta_start": theta,
                   "in_window": _in_window(aux["pre_BxF"], sae.threshold(p), hp["bandwidth"])}
            ), grads

  def jumprelu(p):
    (loss, aux), grads = value_and_grad(c, p, x_BxD, hp, dead_F)
    return (loss, {**{k: aux[k] for k in (*keep, "in_window")},
                   "theta_start": jnp.float32(jnp.nan)}), grads

  return jax.lax.cond(step < c.sae.topk_start_steps, topk, jumprelu, params)


def _jumprelu_loss_fn(c, x_BxD, hp):
  """sae.loss (Eq. 10, with its hand-written backward pass), or objectives.jumprelu_loss when the
  config asks for another sparsity objective or an extra penalty."""
  s, lam = c.sae, hp["sparsity_coefficient"]
  if objectives.uses_paper_loss(c):
    return lambda p: sae.loss(p, x_BxD, sparsity_coefficient=lam, bandwidth=hp["bandwidth"],
                              kernel=s.kernel, matmul_dtype=c.train.matmul_dtype,
                              pre_relu=s.pre_relu)
  # The frequency penalty warms up with λ: at init most features fire on > 10% of tokens.
  mu = s.frequency_coefficient * hp["warmup"] if s.frequency_coefficient else 0.0
  return lambda p: objectives.jumprelu_loss(
      p, x_BxD, sparsity_coefficient=lam, bandwidth=hp["bandwidth"], kernel=s.kernel,
      sparsity_loss=s.sparsity_loss, target_l0=hp["target_l0"], tanh_scale=s.tanh_scale,
      pre_act_coefficient=s.pre_act_coefficient, frequency_coefficient=mu,
      frequency_max=s.frequency_max, matmul_dtype=c.train.matmul_dtype)


def _with_auxk(loss_fn, x_BxD, alpha, k_aux: int, dead_F):
  """loss_fn + α·AuxK: the dead latents' top k_aux ReLU'd pre-activations reconstruct the
  residual, as TopK's auxiliary loss (baselines.topk_loss), so a latent the L0 penalty has
  silenced keeps learning a direction the live ones miss. aux gains "auxk"."""
  def fn(p):
    total, aux = loss_fn(p)
    auxk = baselines._auxk(p, x_BxD, aux["x_hat_BxD"], aux["pre_BxF"], k_aux, dead_F)
    return total + alpha * auxk, {**aux, "auxk": auxk}
  return fn


def _matryoshka(c, loss_fn, x_BxD):
  """loss_fn, or with sae.matryoshka_prefixes its Matryoshka form (objectives.with_matryoshka)."""
  prefixes = tuple(c.sae.matryoshka_prefixes)
  if not prefixes:
    return loss_fn
  return lambda p: objectives.with_matryoshka(loss_fn, p, x_BxD, prefixes)


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
  k = int(params_raw["k"]) if name == "topk" else None  # BatchTopK exports its threshold
  arrays = {n: v for n, v in params_raw.items() if n not in ("architecture", "k")}
  return name, k, arrays


def features(params: dict, x_BxD, *, arch: str, k: int | None = None):
  """Feature activations f [.., F] of training params or a raw-unit export (k: static int).

  BatchTopK's are its inference features: a JumpReLU with the learned global threshold."""
  if arch in ("jumprelu", "batchtopk"):
    pre = sae.pre_activations(params, x_BxD)
    return pre * ops.heaviside(pre - sae.threshold(params))
  if arch == "relu":
    return baselines.relu_encode(params, x_BxD)[0]
  if arch == "gated":
    return baselines.gated_encode(params, x_BxD)[0]
  shape = x_BxD.shape[:-1]  # top-k over the features of each row, for any leading dims
  f = baselines.topk_encode(params, x_BxD.reshape(-1, x_BxD.shape[-1]), k=k)[0]
  return f.reshape(*shape, f.shape[-1])
