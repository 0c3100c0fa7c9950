"""Training: the optimiser and schedules, the pure train step, and the host loop."""
import json
import math
import os
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.experimental import multihost_utils

from jumprelu import (checkpoint, data, export, harvest, interop, logs, sae, sharding, sparse,
                     validate)


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
  """Adam. With β1 = 0 (the recipe) its first moment is just the gradient, so we keep only the
  second moment: the same update, a third less optimiser memory (3.5 GiB/device at 1M wide)."""
  lr = lambda s: learning_rate(c, s)
  if c.optim.b1 == 0:
    return optax.chain(
        optax.scale_by_rms(decay=c.optim.b2, eps=c.optim.eps, eps_in_sqrt=False,
                           bias_correction=True),
        optax.scale_by_learning_rate(lr))
  return optax.adam(lr, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps)


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
  theta_F = sae.threshold(state.params)
  if c.train.step_impl == "sparse":  # same loss and gradients, see sparse.py
    (loss, aux), grads = sparse.value_and_grad(
        state.params, x_BxD, sparsity_coefficient=lam, bandwidth=c.sae.bandwidth,
        kernel=c.sae.kernel, capacity=c.train.sparse_capacity, matmul_dtype=c.train.matmul_dtype)
  else:
    loss_fn = lambda p: sae.loss(p, x_BxD, sparsity_coefficient=lam, bandwidth=c.sae.bandwidth,
                                 kernel=c.sae.kernel, matmul_dtype=c.train.matmul_dtype)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    aux["fired_F"] = jnp.any(aux["pre_BxF"] > theta_F, axis=0)
    aux["in_window"] = jnp.mean(jnp.abs(aux["pre_BxF"] - theta_F) < 0.5 * c.sae.bandwidth)
  grads["W_dec"] = sae.remove_parallel_grad(state.params["W_dec"], grads["W_dec"])
  updates, opt_state = optimizer(c).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params["W_dec"] = sae.normalize_decoder(params["W_dec"])

  fired_F = aux["fired_F"]
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
      "in_window": aux["in_window"],
      "threshold_mean": jnp.mean(theta_F),
      "dead": jnp.sum(tokens_since_fired >= c.train.dead_window_tokens),
      "sparsity_coefficient": lam,
      "learning_rate": learning_rate(c, state.step),
  }
  if c.train.step_impl == "sparse":  # 1 when the batch overflowed train.sparse_capacity
    metrics["dense_fallback"] = aux["dense_fallback"]
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

def store_path(c, workdir: str | None) -> str:
  """Where the activations are: data.path, or WORKDIR/activations for a harvested store."""
  if c.data.path or c.data.source == "npy":
    return c.data.path
  return os.path.join(workdir, "activations")


def make_source(c, workdir: str | None = None) -> tuple[data.ActivationSource, dict | None]:
  """The configured activation source (width, and a harvested store's model and site, checked
  against the config), and for synthetic data the ground truth: the true dictionary and L0."""
  if c.data.source == "live":
    source = harvest.LiveSource(c)
    validate.check_width(c, source.d, source.names[0])
    return source, None
  if c.data.source in ("npy", "harvest"):
    path = store_path(c, workdir)
    manifest = data.read_manifest(path)
    if manifest is not None:
      harvest.check_store(c, manifest["spec"], path)
    source = data.open_npy(path, seed=c.seed)
    validate.check_width(c, source.d, path)
    return source, None
  s = c.data.synthetic
  x, true_GxD, facts = data.synthetic(s.n_rows, c.data.d_in, s.n_features, s.mean_l0,
                                      seed=s.seed, noise_std=s.noise_std)
  truth = {"dictionary": true_GxD, "true_l0": facts["true_l0"]}
  return data.ActivationSource([x], ["synthetic"], seed=c.seed), truth


# ----------------------------------------------------------------------------- host loop

# Keys a resumed run may change: longer runs, other logging, another mesh (checkpoints restore
# onto any mesh), the bad-data policy (so a run stopped by a bad row can go on with
# data.skip_nonfinite=True) and the overwrite switch itself.
_RESUMABLE_KEYS = ("train.num_steps", "train.log_every", "train.checkpoint_every",
                   "train.keep_checkpoints", "train.overwrite", "data.skip_nonfinite",
                   "mesh.data", "mesh.model", "log.tensorboard", "log.wandb_project",
                   "log.histogram_every", "log.progress", "export.saelens", "export.model_name",
                   "export.hook_name", "export.context_size", "export.dataset_path",
                   "export.density_batches",
                   "train.step_impl", "train.sparse_capacity")  # same gradients either way
# Everything a run writes into its workdir (logs.py's files too): what train.overwrite deletes.
_RUN_OUTPUTS = ("checkpoints", "checkpoints_rejected", "export", "metrics.jsonl",
                "histograms.jsonl", "tensorboard", "wandb_id", "summary.json", "config.json")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a preemption notice; rerun the command to resume


class Preempted(Exception):
  """Training stopped on a preemption notice (SIGTERM) after saving a checkpoint."""


def _flat(d: dict, prefix="") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _check_workdir_config(c, workdir: str) -> None:
  """Refuses to continue a run in `workdir` that was started with a different (or unknown)
  config, unless train.overwrite=True, which deletes that run's outputs first. (config.json is
  written by train_and_evaluate once its checkpoint is known to fit.)"""
  path = os.path.join(workdir, "config.json")
  new = _flat(json.loads(c.to_json_best_effort()))
  problem = None
  if os.path.exists(path):
    try:
      with open(path) as fh:
        old = _flat(json.load(fh))
    except (OSError, ValueError) as e:
      problem = f"a run whose config.json cannot be read ({e})"
    else:
      changed = sorted(k for k in set(old) | set(new)
                       if old.get(k) != new.get(k) and k not in _RESUMABLE_KEYS)
      if changed:
        problem = "a run with a different config (" + ", ".join(
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed) + ")"
  elif any(os.path.isfile(p) or os.path.isdir(p) and os.listdir(p)
           for p in (os.path.join(workdir, name) for name in _RUN_OUTPUTS)):
    problem = "a run without a config.json, so it cannot be checked"
  if problem and not c.train.overwrite:
    raise ValueError(f"{workdir} holds {problem}; use a new --workdir, or set "
                     "--config.train.overwrite=True to delete that run and start over")
  if jax.process_index() == 0 and problem:
    doomed = [p for p in _RUN_OUTPUTS if os.path.lexists(os.path.join(workdir, p))]
    logging.warning("train.overwrite=True: %s holds %s; deleting %s", workdir, problem, doomed)
    for p in doomed:
      p = os.path.join(workdir, p)
      shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
  if jax.process_count() > 1:  # nobody opens the checkpoints before process 0 is done here
    multihost_utils.sync_global_devices("jumprelu_workdir_checked")


def _preemption_notice():
  """(reached, stop): reached(step) turns True at the step boundary where every process should
  save and stop after a preemption notice (SIGTERM); stop() stops listening."""
  if jax.process_count() > 1:
    # JAX's preemption service catches SIGTERM on any host and picks one step for all of them.
    return multihost_utils.reached_preemption_sync_point, lambda: None
  if threading.current_thread() is not threading.main_thread():
    logging.warning("train_and_evaluate is not on the main thread, so a SIGTERM (preemption "
                    "notice) cannot be caught: it kills the run, which resumes from the last "
                    "checkpoint")
    return lambda step: False, lambda: None
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  restore = previous if previous is not None else signal.SIG_DFL
  return lambda step: bool(received), lambda: signal.signal(signal.SIGTERM, restore)


def _process_sum(n: int) -> int:
  if jax.process_count() == 1:
    return n
  return int(np.sum(multihost_utils.process_allgather(np.asarray(n, np.int32))))


def _logged_metrics(workdir: str, step: int) -> dict:
  """The train metrics logged at `step` by an earlier run (for a run resumed at its end)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as fh:
    records = [json.loads(line) for line in fh if line.strip()]
  record = next((r for r in records if r["step"] == step), {})
  added = ("tokens", "tokens_per_s", "nonfinite_rows")  # not train metrics: the log adds them
  return {k: v for k, v in record.items() if k not in added}


def train_and_evaluate(c, workdir: str) -> dict:
  """Trains per config `c` in `workdir`, resuming from its newest checkpoint; returns a summary.

  Raises Preempted after saving a checkpoint if a preemption notice (SIGTERM) arrives."""
  validate.check_config(c)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.model)
  sharding.check_divisible(mesh, c.sae.width, c.train.batch_size)
  source, truth = make_source(c, workdir)
  _check_workdir_config(c, workdir)
  logging.info("mesh %s over %d devices; data: %d rows of width %d", dict(mesh.shape),
               mesh.size, source.n, source.d)

  key = jax.random.key(c.seed)
  abstract = jax.eval_shape(lambda: init_state(c, key, 1.0))
  shardings = sharding.tree_shardings(mesh, abstract)
  mngr = checkpoint.manager(workdir, c.train.keep_checkpoints)
  state = checkpoint.restore_latest(mngr, checkpoint.abstract_like(abstract, shardings))
  if state is None:
    norm_scale = math.sqrt(source.mean_sq_norm(c.data.norm_rows, c.data.skip_nonfinite)
                           ) if c.data.normalize else 1.0
    logging.info("input normalisation: x / %.6g (so E‖x‖² = 1)", norm_scale)
    state, _ = sharded_init(c, mesh, key, norm_scale)
  else:
    logging.info("resumed from checkpoint at step %d", int(state.step))
  start = int(state.step)
  if start > c.train.num_steps:
    raise ValueError(f"{workdir} holds a checkpoint at step {start}, past train.num_steps="
                     f"{c.train.num_steps}; set --config.train.num_steps={start} or more, or use "
                     "a new --workdir")
  if jax.process_index() == 0:
    export.save_json(os.path.join(workdir, "config.json"), json.loads(c.to_json_best_effort()))
  is_main = jax.process_index() == 0
  writer = logs.MetricWriter(workdir, start, c.train.num_steps, c.train.batch_size,
                             tensorboard=c.log.tensorboard, wandb_project=c.log.wandb_project,
                             config=c.to_dict(), progress=c.log.progress)

  step_fn = jit_train_step(c, mesh, shardings)
  lo, hi = sharding.process_rows(mesh, c.train.batch_size)
  batch_size, num_steps, log_every = c.train.batch_size, c.train.num_steps, c.train.log_every

  def read(step):  # -> (this process's rows, how many non-finite rows were replaced)
    if not c.data.skip_nonfinite:
      return source.batch(step, batch_size, lo, hi), 0
    rows, replaced = source.batch_skipping_nonfinite(step, batch_size, lo, hi)
    if replaced:
      logging.warning("step %d: replaced %d non-finite activation rows (data.skip_nonfinite="
                      "True): %s", step, len(replaced), ", ".join(replaced[:5]))
    return rows, len(replaced)

  # Rows replaced since the last metrics line; a resumed run recounts the steps it skips over.
  n_replaced = sum(read(s)[1] for s in range(start - start % log_every, start)
                   ) if c.data.skip_nonfinite else 0
  last = {}
  t0 = time.time()

  def finish(step, metrics, replaced):  # reads step's metrics while the next step already runs
    nonlocal last, n_replaced
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(m["loss"]):
      raise FloatingPointError(
          f"non-finite loss ({m['loss']}) at step {step}; training stopped (the last checkpoint "
          f"is intact). Lower optim.learning_rate or check the activations")
    last = {"step": step + 1, **m}
    writer.advance(step + 1)
    n_replaced += replaced
    if (step + 1) % log_every == 0 or step + 1 == num_steps:
      if c.data.skip_nonfinite:
        m["nonfinite_rows"] = _process_sum(n_replaced)
        n_replaced = 0
      writer.write(step + 1, m)

  preempted, stop_listening = _preemption_notice()
  try:
    pending = None
    for step in range(start, num_steps):
      rows, replaced = read(step)
      x = sharding.global_batch(mesh, rows, batch_size)
      state, metrics = step_fn(state, x)
      if c.log.histogram_every and (step + 1) % c.log.histogram_every == 0:
        writer.histograms(step + 1, logs.feature_histograms(state.params, x, state.norm_scale))
      if pending is not None:
        finish(*pending)
      pending = (step, metrics, replaced)
      stop = preempted(step + 1)  # every process calls this at every step
      if stop or (step + 1) % c.train.checkpoint_every == 0 or step + 1 == num_steps:
        finish(*pending)  # never checkpoint a state whose loss was not checked
        pending = None
        checkpoint.save(mngr, step + 1, state)
      if stop:
        mngr.wait_until_finished()
        writer.close()
        raise Preempted(f"preemption notice (SIGTERM): saved a checkpoint at step {step + 1} of "
                        f"{num_steps} in {workdir} and stopped; rerun the same command to resume")
    if pending is not None:
      finish(*pending)
  finally:
    stop_listening()
    mngr.wait_until_finished()  # a save in flight completes even if training stops on an error
  writer.close()
  if not last:  # resumed from the final checkpoint (killed after it): reuse its logged metrics
    last = _logged_metrics(workdir, num_steps)

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
  if c.export.saelens:  # firing densities on batches past the last step; every process reads
    density_F = logs.mean_firing_density(state.params, (
        sharding.global_batch(mesh, read(num_steps + k)[0], batch_size)
        for k in range(c.export.density_batches)), state.norm_scale)
  if is_main:
    export.save_npz(os.path.join(workdir, "export", "params.npz"), params)
    if c.export.saelens:  # a harvested store's manifest supplies model, hook and context
      interop.save_saelens_for_run(c, os.path.join(workdir, "export", "saelens"), params,
                                   density_F, norm_scale,
                                   data.read_manifest(store_path(c, workdir)))
    export.save_json(os.path.join(workdir, "summary.json"), summary)
  return summary
