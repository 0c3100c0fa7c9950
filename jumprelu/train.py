"""Training: the optimiser and schedules, the pure train step, and the host loop."""
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

from jumprelu import checkpoint, data, export, logs, sae, sharding, validate


@struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimiser steps taken
  params: dict  # see sae.py
  opt_state: optax.OptState
  tokens_since_fired: jax.Array  # [F] int32, capped: tokens since each feature last fired
  norm_scale: jax.Array  # [] float32: C = sqrt(E‖x‖²); the SAE sees x / C


# ----------------------------------------------------------------------------- schedules

def learning_rate(c, step):
  """Cosine warm-up from lr_warmup_init·lr to lr over lr_warmup_steps, then constant."""
  lr, w, init = c.optim.learning_rate, c.optim.lr_warmup_steps, c.optim.lr_warmup_init
  if w == 0:
    return jnp.asarray(lr, jnp.float32)
  t = jnp.minimum(jnp.asarray(step, jnp.float32) / w, 1.0)
  return lr * (init + (1 - init) * 0.5 * (1 - jnp.cos(jnp.pi * t)))


def sparsity_coefficient(c, step):
  """λ rises linearly from 0 to sae.sparsity_coefficient over optim.sparsity_warmup_steps."""
  w = c.optim.sparsity_warmup_steps
  frac = 1.0 if w == 0 else jnp.minimum(jnp.asarray(step, jnp.float32) / w, 1.0)
  return c.sae.sparsity_coefficient * frac


def optimizer(c) -> optax.GradientTransformation:
  return optax.adam(lambda s: learning_rate(c, s), b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps)


# ----------------------------------------------------------------------------- state

def init_state(c, key, norm_scale) -> TrainState:
  params = sae.init(key, c.data.d_in, c.sae.width, threshold_init=c.sae.threshold_init,
                    threshold_param=c.sae.threshold_param)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer(c).init(params),
      tokens_since_fired=jnp.zeros((c.sae.width,), jnp.int32),
      norm_scale=jnp.asarray(norm_scale, jnp.float32))


# ----------------------------------------------------------------------------- train step

_TOKENS_CAP = 2**30  # keeps the int32 dead-feature counters from overflowing


def train_step(c, state: TrainState, x_BxD: jax.Array) -> tuple[TrainState, dict]:
  """One Adam step on the Eq. 10 loss; pure. Returns the new state and scalar metrics."""
  x_BxD = x_BxD / state.norm_scale
  lam = sparsity_coefficient(c, state.step)
  loss_fn = lambda p: sae.loss(p, x_BxD, sparsity_coefficient=lam, bandwidth=c.sae.bandwidth,
                               kernel=c.sae.kernel)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads["W_dec"] = sae.remove_parallel_grad(state.params["W_dec"], grads["W_dec"])
  updates, opt_state = optimizer(c).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params["W_dec"] = sae.normalize_decoder(params["W_dec"])

  theta_F = sae.threshold(state.params)
  fired_F = jnp.any(aux["pre_BxF"] > theta_F, axis=0)
  batch = x_BxD.shape[0]
  tokens_since_fired = jnp.where(
      fired_F, 0, jnp.minimum(state.tokens_since_fired + batch, _TOKENS_CAP))
  centred = x_BxD - jnp.mean(x_BxD, axis=0)
  metrics = {
      "loss": loss,
      "recon": jnp.mean(aux["recon_B"]),  # ‖x − x̂‖², normalised units
      "mse": jnp.mean(aux["recon_B"]) / x_BxD.shape[1],
      "fvu": jnp.sum(aux["recon_B"]) / jnp.sum(centred**2),
      "l0": jnp.mean(aux["l0_B"]),
      # Fraction of pre-activations within ε/2 of θ: the rectangle STE's window.
      "in_window": jnp.mean(jnp.abs(aux["pre_BxF"] - theta_F) < 0.5 * c.sae.bandwidth),
      "threshold_mean": jnp.mean(theta_F),
      "dead": jnp.sum(tokens_since_fired >= c.train.dead_window_tokens),
      "sparsity_coefficient": lam,
      "learning_rate": learning_rate(c, state.step),
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            tokens_since_fired=tokens_since_fired)
  return new_state, metrics


def jit_train_step(c, mesh, state_shardings, step_fn=train_step):
  """The step jitted once with explicit shardings; the old state's buffers are donated."""
  return jax.jit(lambda state, x: step_fn(c, state, x),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def sharded_init(c, mesh, key, norm_scale):
  """Initialises the state directly into its shardings (no full copy on one device)."""
  abstract = jax.eval_shape(lambda: init_state(c, key, norm_scale))
  shardings = sharding.tree_shardings(mesh, abstract)
  state = jax.jit(lambda: init_state(c, key, norm_scale), out_shardings=shardings)()
  return state, shardings


# ----------------------------------------------------------------------------- data

def make_source(c) -> tuple[data.ActivationSource, dict | None]:
  """The configured activation source (width checked against data.d_in), and for synthetic
  data the ground truth: the true dictionary and L0."""
  if c.data.source == "npy":
    source = data.open_npy(c.data.path, seed=c.seed)
    validate.check_width(c, source.d, c.data.path)
    return source, None
  s = c.data.synthetic
  x, true_GxD, facts = data.synthetic(s.n_rows, c.data.d_in, s.n_features, s.mean_l0,
                                      seed=s.seed, noise_std=s.noise_std)
  truth = {"dictionary": true_GxD, "true_l0": facts["true_l0"]}
  return data.ActivationSource([x], ["synthetic"], seed=c.seed), truth


# ----------------------------------------------------------------------------- host loop

# Keys a resumed run may change: longer runs, other logging, and another mesh (checkpoints
# restore onto any mesh).
_RESUMABLE_KEYS = ("train.num_steps", "train.log_every", "train.checkpoint_every",
                   "train.keep_checkpoints", "mesh.data", "mesh.model")


def _flat(d: dict, prefix="") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _check_workdir_config(c, workdir: str) -> None:
  """Refuses to continue a run in `workdir` that was started with a different config."""
  path = os.path.join(workdir, "config.json")
  new = _flat(json.loads(c.to_json_best_effort()))
  if os.path.exists(path):
    with open(path) as fh:
      old = _flat(json.load(fh))
    changed = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and k not in _RESUMABLE_KEYS)
    if changed:
      diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
      raise ValueError(f"{workdir} holds a run with a different config ({diffs}); use a new "
                       "--workdir, or delete the old one to start over")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as fh:
      fh.write(c.to_json_best_effort(indent=1))


def train_and_evaluate(c, workdir: str) -> dict:
  """Trains per config `c` in `workdir`, resuming from its newest checkpoint; returns a summary."""
  validate.check_config(c)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.model)
  sharding.check_divisible(mesh, c.sae.width, c.train.batch_size)
  _check_workdir_config(c, workdir)
  source, truth = make_source(c)
  logging.info("mesh %s over %d devices; data: %d rows of width %d", dict(mesh.shape),
               mesh.size, source.n, source.d)

  key = jax.random.key(c.seed)
  abstract = jax.eval_shape(lambda: init_state(c, key, 1.0))
  shardings = sharding.tree_shardings(mesh, abstract)
  mngr = checkpoint.manager(workdir, c.train.keep_checkpoints)
  state = checkpoint.restore_latest(mngr, checkpoint.abstract_like(abstract, shardings))
  if state is None:
    norm_scale = math.sqrt(source.mean_sq_norm(c.data.norm_rows)) if c.data.normalize else 1.0
    logging.info("input normalisation: x / %.6g (so E‖x‖² = 1)", norm_scale)
    state, _ = sharded_init(c, mesh, key, norm_scale)
  else:
    logging.info("resumed from checkpoint at step %d", int(state.step))
  start = int(state.step)
  is_main = jax.process_index() == 0
  writer = logs.MetricWriter(workdir, start, c.train.num_steps, c.train.batch_size)

  step_fn = jit_train_step(c, mesh, shardings)
  lo, hi = sharding.process_rows(mesh, c.train.batch_size)
  batch_size, num_steps = c.train.batch_size, c.train.num_steps
  last = {}
  t0 = time.time()

  def finish(step, metrics):  # reads step's metrics while the next step already runs
    nonlocal last
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(m["loss"]):
      raise FloatingPointError(
          f"non-finite loss ({m['loss']}) at step {step}; training stopped (the last checkpoint "
          f"is intact). Lower optim.learning_rate or check the activations")
    last = {"step": step + 1, **m}
    if (step + 1) % c.train.log_every == 0 or step + 1 == num_steps:
      writer.write(step + 1, m)

  pending = None
  for step in range(start, num_steps):
    x = sharding.global_batch(mesh, source.batch(step, batch_size, lo, hi), batch_size)
    state, metrics = step_fn(state, x)
    if pending is not None:
      finish(*pending)
    pending = (step, metrics)
    if (step + 1) % c.train.checkpoint_every == 0 or step + 1 == num_steps:
      finish(*pending)  # never checkpoint a state whose loss was not checked
      pending = None
      checkpoint.save(mngr, step + 1, state)
  if pending is not None:
    finish(*pending)
  mngr.wait_until_finished()
  writer.close()

  summary = {"steps": num_steps, "tokens": num_steps * batch_size,
             "seconds": time.time() - t0, "final": last}
  if truth is not None:
    summary["true_l0"] = truth["true_l0"]
    summary["dictionary_recovery"] = data.dictionary_recovery(
        np.asarray(sharding.to_host(state.params["W_dec"])), truth["dictionary"])
    logging.info("synthetic ground truth: L0 %.2f (true %.2f), dictionary recovery %.3f "
                 "(mean best cosine)", last.get("l0", float("nan")), truth["true_l0"],
                 summary["dictionary_recovery"])
  norm_scale = float(sharding.to_host(state.norm_scale))
  params = export.raw_params(sharding.to_host(state.params), norm_scale)
  if is_main:
    export.save_npz(os.path.join(workdir, "export", "params.npz"), params)
    with open(os.path.join(workdir, "summary.json"), "w") as fh:
      json.dump(summary, fh, indent=1)
  return summary
