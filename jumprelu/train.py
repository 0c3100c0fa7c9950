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

from jumprelu import (arch, checkpoint, data, export, harvest, interop, logs, sae, sharding,
                     sweep, validate)
from jumprelu import workdir as workdir_lib


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


def sparsity_coefficient(c, step, target=None):
  """λ rises linearly from 0 to `target` (default sae.sparsity_coefficient) over
  optim.sparsity_warmup_steps."""
  w = c.optim.sparsity_warmup_steps
  target = c.sae.sparsity_coefficient if target is None else target
  frac = 1.0 if w == 0 else jnp.minimum(jnp.asarray(step, jnp.float32) / w, 1.0)
  return target * frac


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

def init_state(c, key, norm_scale, n_members: int = 0) -> TrainState:
  """The initial state; with n_members > 0, that many identical copies stacked (an ensemble)."""
  params = arch.init(c, key)
  state = TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer(c).init(params),
      tokens_since_fired=jnp.zeros((c.sae.width,), jnp.int32),
      norm_scale=jnp.asarray(norm_scale, jnp.float32))
  if not n_members:
    return state
  return state.replace(params=sweep.stack(state.params, n_members),
                       opt_state=sweep.stack(state.opt_state, n_members),
                       tokens_since_fired=sweep.stack(state.tokens_since_fired, n_members))


# Which TrainState fields carry the member axis of an ensemble (vmap's in_axes / out_axes).
STATE_AXES = TrainState(step=None, params=0, opt_state=0, tokens_since_fired=0, norm_scale=None)


def member_state(state: TrainState, i: int) -> TrainState:
  """Member i of an ensemble's state, as the state of a run of that member alone."""
  return state.replace(params=sweep.take(state.params, i), opt_state=sweep.take(state.opt_state, i),
                       tokens_since_fired=sweep.take(state.tokens_since_fired, i))


# ----------------------------------------------------------------------------- train step

_TOKENS_CAP = 2**30  # keeps the int32 dead-feature counters from overflowing


def config_hparams(c) -> dict:
  """The per-SAE hyperparameters train_step takes (an ensemble passes one set per member)."""
  return {"sparsity_coefficient": c.sae.sparsity_coefficient, "bandwidth": c.sae.bandwidth,
          "k": c.sae.k}


def train_step(c, state: TrainState, x_BxD: jax.Array, hp: dict | None = None
               ) -> tuple[TrainState, dict]:
  """One Adam step on the configured SAE's loss; pure. Returns the new state and scalar metrics.

  `hp` (default config_hparams(c)) holds λ, ε and k; they may be traced, so a vmapped ensemble
  of SAEs that differ only in them is one program (see sweep.py)."""
  hp = config_hparams(c) if hp is None else hp
  x_BxD = x_BxD / state.norm_scale
  lam = sparsity_coefficient(c, state.step, hp["sparsity_coefficient"])
  dead_F = state.tokens_since_fired >= c.train.dead_window_tokens
  (loss, aux), grads = arch.value_and_grad(c, state.params, x_BxD,
                                           {**hp, "sparsity_coefficient": lam}, dead_F)
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
      "dead": jnp.sum(tokens_since_fired >= c.train.dead_window_tokens),
      "sparsity_coefficient": lam,
      "learning_rate": learning_rate(c, state.step),
  }
  if c.sae.arch == "jumprelu":
    # Fraction of pre-activations within ε/2 of θ: the rectangle STE's window.
    metrics["in_window"] = aux["in_window"]
    metrics["threshold_mean"] = jnp.mean(sae.threshold(state.params))
  if c.sae.arch == "topk":
    metrics["auxk"] = aux["auxk"]
  if c.sae.arch == "jumprelu" and c.train.step_impl == "sparse":
    metrics["dense_fallback"] = aux["dense_fallback"]  # 1: batch overflowed train.sparse_capacity
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            tokens_since_fired=tokens_since_fired)
  return new_state, metrics


def ensemble_step(c, state: TrainState, x_BxD: jax.Array, hp_S: dict):
  """train_step of every member at once, vmapped over the member axis; the batch is shared.
  Metrics come back with a leading [S] axis."""
  return jax.vmap(lambda s, hp: train_step(c, s, x_BxD, hp), in_axes=(STATE_AXES, 0),
                  out_axes=(STATE_AXES, 0))(state, hp_S)


def jit_train_step(c, mesh, state_shardings, step_fn=None):
  """The step jitted once with explicit shardings; the old state's buffers are donated.

  By default train_step, or for a sweep config ensemble_step over its members' hyperparameters
  (the state then stacked: init_state(..., n_members))."""
  if step_fn is None:
    members = sweep.grid(c)
    if members:
      hp_S = sweep.stacked_hparams(members)
      step_fn = lambda c, state, x: ensemble_step(c, state, x, hp_S)
    else:
      step_fn = train_step
  return jax.jit(lambda state, x: step_fn(c, state, x),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def sharded_init(c, mesh, key, norm_scale, n_members: int = 0):
  """Initialises the state directly into its shardings (no full copy on one device)."""
  init = lambda: init_state(c, key, norm_scale, n_members)
  shardings = sharding.tree_shardings(mesh, jax.eval_shape(init))
  return jax.jit(init, out_shardings=shardings)(), shardings


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

Preempted = workdir_lib.Preempted  # raised after saving on a preemption notice (SIGTERM)
EXIT_PREEMPTED = workdir_lib.EXIT_PREEMPTED  # the entry point's exit status then

def train_and_evaluate(c, workdir: str) -> dict:
  """Trains per config `c` in `workdir`, resuming from its newest checkpoint; returns a summary.

  Raises Preempted after saving a checkpoint if a preemption notice (SIGTERM) arrives."""
  validate.check_config(c)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.model)
  sharding.check_divisible(mesh, c.sae.width, c.train.batch_size)
  source, truth = make_source(c, workdir)
  workdir_lib.check_config(c, workdir)
  logging.info("mesh %s over %d devices; data: %d rows of width %d", dict(mesh.shape),
               mesh.size, source.n, source.d)

  members = sweep.grid(c)  # [] for one SAE
  if members:
    logging.info("sweep: %d %s SAEs trained as one vmapped ensemble: %s", len(members),
                 c.sae.arch, ", ".join(name for name, _ in members))
  key = jax.random.key(c.seed)
  abstract = jax.eval_shape(lambda: init_state(c, key, 1.0, len(members)))
  shardings = sharding.tree_shardings(mesh, abstract)
  mngr = checkpoint.manager(workdir, c.train.keep_checkpoints)
  state = checkpoint.restore_latest(mngr, checkpoint.abstract_like(abstract, shardings))
  if state is None:
    norm_scale = math.sqrt(source.mean_sq_norm(c.data.norm_rows, c.data.skip_nonfinite)
                           ) if c.data.normalize else 1.0
    logging.info("input normalisation: x / %.6g (so E‖x‖² = 1)", norm_scale)
    state, _ = sharded_init(c, mesh, key, norm_scale, len(members))
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
    m = _host_metrics(jax.device_get(metrics), members)
    bad = [k for k, v in m.items() if k.split("/")[0] == "loss" and not math.isfinite(v)]
    if bad:
      raise FloatingPointError(
          f"non-finite loss ({', '.join(f'{k} = {m[k]}' for k in bad)}) at step {step}; training "
          "stopped (the last checkpoint is intact). Lower optim.learning_rate or check the "
          "activations")
    last = {"step": step + 1, **m}
    writer.advance(step + 1)
    n_replaced += replaced
    if (step + 1) % log_every == 0 or step + 1 == num_steps:
      if c.data.skip_nonfinite:
        m["nonfinite_rows"] = workdir_lib.process_sum(n_replaced)
        n_replaced = 0
      writer.write(step + 1, m)

  def to_devices(step):  # on the prefetch thread: read step's rows and put them on the devices
    rows, replaced = read(step)
    return sharding.global_batch(mesh, rows, batch_size), replaced

  preempted, stop_listening = workdir_lib.preemption_notice()
  batches = data.Prefetch(to_devices, range(start, num_steps), c.train.prefetch)
  try:
    pending = None
    for step in range(start, num_steps):
      x, replaced = next(batches)
      state, metrics = step_fn(state, x)
      if c.log.histogram_every and (step + 1) % c.log.histogram_every == 0:
        writer.histograms(step + 1, _histograms(c, members, state, x))
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
    batches.close()
    stop_listening()
    mngr.wait_until_finished()  # a save in flight completes even if training stops on an error
  writer.close()
  if not last:  # resumed from the final checkpoint (killed after it): reuse its logged metrics
    last = workdir_lib.logged_metrics(workdir, num_steps)

  base = {"steps": num_steps, "tokens": num_steps * batch_size, "seconds": time.time() - t0}
  # Firing densities on batches past the last step, shared by every member; every process reads.
  density_batches = [sharding.global_batch(mesh, read(num_steps + k)[0], batch_size)
                     for k in range(c.export.density_batches)] if c.export.saelens else []
  store = store_path(c, workdir)
  manifest = data.read_manifest(store)  # a harvested store's: model, hook and context length
  if not members:
    return _export_run(c, workdir, state, {**base, "final": last}, truth, density_batches,
                       manifest)
  summary = {**base, "members": {}}
  for i, (name, hp) in enumerate(members):
    mc, mdir = sweep.member_config(c, hp, store), sweep.member_dir(workdir, name)
    mstate = member_state(state, i)
    _save_member(mc, workdir, mdir, name, mstate)
    summary["members"][name] = _export_run(
        mc, mdir, mstate, {**base, "final": sweep.split_metrics(last, name)}, truth,
        density_batches, manifest)
  if is_main:
    export.save_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def _host_metrics(metrics: dict, members) -> dict:
  """Floats from the step's metrics; an ensemble's [S] arrays become "key/MEMBER" entries."""
  if not members:
    return {k: float(v) for k, v in metrics.items()}
  return {f"{k}/{name}": float(v[i]) for k, v in metrics.items()
          for i, (name, _) in enumerate(members)}


def _histograms(c, members, state: TrainState, x_BxD) -> dict:
  if not members:
    return logs.feature_histograms(state.params, x_BxD, state.norm_scale, arch=c.sae.arch,
                                   k=c.sae.k)
  out = {}
  for i, (name, hp) in enumerate(members):
    arrays = logs.feature_histograms(sweep.take(state.params, i), x_BxD, state.norm_scale,
                                     arch=c.sae.arch, k=hp["k"])
    out.update({f"{k}/{name}": v for k, v in arrays.items()})
  return out


def _save_member(mc, workdir: str, mdir: str, name: str, mstate: TrainState) -> None:
  """Makes WORKDIR/members/NAME a finished run of its own: its config, its final checkpoint
  (restorable by train.py with that config) and its lines of the ensemble's metrics."""
  if jax.process_index() == 0:
    export.save_json(os.path.join(mdir, "config.json"), json.loads(mc.to_json_best_effort()))
    records = []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as fh:
        records = [sweep.split_metrics(json.loads(line), name) for line in fh if line.strip()]
    export.save_jsonl(os.path.join(mdir, "metrics.jsonl"), records)
  mngr = checkpoint.manager(mdir, mc.train.keep_checkpoints)
  if mngr.latest_step() != int(mstate.step):  # not already saved by an earlier, resumed call
    checkpoint.save(mngr, int(mstate.step), mstate)
  mngr.wait_until_finished()


def _export_run(c, workdir: str, state: TrainState, summary: dict, truth, density_batches,
                manifest) -> dict:
  """Writes WORKDIR/export/params.npz (raw units), the SAELens folder and summary.json."""
  norm_scale = float(sharding.to_host(state.norm_scale))
  summary["norm_scale"] = norm_scale
  if truth is not None:
    summary["true_l0"] = truth["true_l0"]
    summary["dictionary_recovery"] = data.dictionary_recovery(
        np.asarray(sharding.to_host(state.params["W_dec"])), truth["dictionary"])
    logging.info("%s: synthetic ground truth: L0 %.2f (true %.2f), dictionary recovery %.3f "
                 "(mean best cosine)", workdir, summary["final"].get("l0", float("nan")),
                 truth["true_l0"], summary["dictionary_recovery"])
  params = arch.raw_params(c.sae.arch, sharding.to_host(state.params), norm_scale, c.sae.k)
  if c.export.saelens:
    density_F = logs.mean_firing_density(state.params, density_batches, state.norm_scale,
                                         arch=c.sae.arch, k=c.sae.k)
  if jax.process_index() == 0:
    export.save_npz(os.path.join(workdir, "export", "params.npz"), params)
    if c.export.saelens:  # a harvested store's manifest supplies model, hook and context
      interop.save_saelens_for_run(c, os.path.join(workdir, "export", "saelens"), params,
                                   density_F, norm_scale, manifest)
    export.save_json(os.path.join(workdir, "summary.json"), summary)
  return summary
