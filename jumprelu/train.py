"""Training: the optimiser and schedules, the pure train step, and the host loop that fits an
SAE (or a sweep's ensemble) to an activation source with checkpoints and metrics."""
import math

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import struct

from jumprelu import arch, bandwidth, baselines, checkpoint, data, features, logs, sae, sharding
from jumprelu import sparse, sweep
from jumprelu import workdir as workdir_lib


@struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimiser steps taken
  params: dict  # see sae.py
  opt_state: optax.OptState
  tokens_since_fired: jax.Array  # [F] int32, capped: tokens since each feature last fired
  norm_scale: jax.Array  # [] float32: C = sqrt(E‖x‖²); the SAE sees x / C
  # sae.bandwidth_rule="adaptive": the per-feature statistics of bandwidth.py ([F] each); else {}
  bandwidth_stats: dict = struct.field(default_factory=dict)


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
    tx = optax.chain(
        optax.scale_by_rms(decay=c.optim.b2, eps=c.optim.eps, eps_in_sqrt=False,
                           bias_correction=True),
        optax.scale_by_learning_rate(lr))
  else:
    tx = optax.adam(lr, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps)
  if c.optim.grad_clip > 0:  # per SAE: a vmapped ensemble clips each member's own gradient
    tx = optax.chain(optax.clip_by_global_norm(c.optim.grad_clip), tx)
  return tx


# ----------------------------------------------------------------------------- state

def init_state(c, key, norm_scale, n_members: int = 0) -> TrainState:
  """The initial state; with n_members > 0, that many identical copies stacked (an ensemble)."""
  params = arch.init(c, key)
  state = TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer(c).init(params),
      tokens_since_fired=jnp.zeros((c.sae.width,), jnp.int32),
      norm_scale=jnp.asarray(norm_scale, jnp.float32), bandwidth_stats=bandwidth.init(c))
  if not n_members:
    return state
  return state.replace(params=sweep.stack(state.params, n_members),
                       opt_state=sweep.stack(state.opt_state, n_members),
                       tokens_since_fired=sweep.stack(state.tokens_since_fired, n_members),
                       bandwidth_stats=sweep.stack(state.bandwidth_stats, n_members))


# Which TrainState fields carry the member axis of an ensemble (vmap's in_axes / out_axes).
STATE_AXES = TrainState(step=None, params=0, opt_state=0, tokens_since_fired=0, norm_scale=None,
                        bandwidth_stats=0)


def member_state(state: TrainState, i: int) -> TrainState:
  """Member i of an ensemble's state, as the state of a run of that member alone."""
  return state.replace(params=sweep.take(state.params, i), opt_state=sweep.take(state.opt_state, i),
                       tokens_since_fired=sweep.take(state.tokens_since_fired, i),
                       bandwidth_stats=sweep.take(state.bandwidth_stats, i))


# ----------------------------------------------------------------------------- train step

_TOKENS_CAP = 2**30  # keeps the int32 dead-feature counters from overflowing


def config_hparams(c) -> dict:
  """The per-SAE hyperparameters train_step takes (an ensemble passes one set per member)."""
  return {"sparsity_coefficient": c.sae.sparsity_coefficient, "bandwidth": c.sae.bandwidth,
          "k": c.sae.k, "target_l0": c.sae.target_l0}


def train_step(c, state: TrainState, x_BxD: jax.Array, hp: dict | None = None
               ) -> tuple[TrainState, dict]:
  """One Adam step on the configured SAE's loss; pure. Returns the new state and scalar metrics.

  `hp` (default config_hparams(c)) holds λ, ε, k and the target L0; they may be traced, so a
  vmapped ensemble of SAEs that differ only in them is one program (see sweep.py)."""
  hp = config_hparams(c) if hp is None else hp
  x_BxD = x_BxD / state.norm_scale
  lam = sparsity_coefficient(c, state.step, hp["sparsity_coefficient"])
  warmup = sparsity_coefficient(c, state.step, 1.0)  # the warm-up's fraction, for other penalties
  dead_F = state.tokens_since_fired >= c.train.dead_window_tokens
  adaptive = bandwidth.uses_stats(c)
  if adaptive:  # ε_i [F] from the statistics of the batches before this one
    theta_F = sae.threshold(state.params)
    hp = {**hp, "bandwidth": bandwidth.config_epsilon(c, state.bandwidth_stats, theta_F,
                                                      state.step, hp["bandwidth"])}
  hp_now = {**hp, "sparsity_coefficient": lam, "warmup": warmup}
  topk_start = c.sae.arch == "jumprelu" and c.sae.topk_start_steps > 0
  if topk_start:  # TopK's loss for the first sae.topk_start_steps steps, then JumpReLU's
    (loss, aux), grads = arch.topk_start_value_and_grad(
        c, state.params, x_BxD, hp_now, dead_F, state.step)
  else:
    (loss, aux), grads = arch.value_and_grad(c, state.params, x_BxD, hp_now, dead_F)
  unit_decoder = c.sae.decoder_norm == "unit"
  if unit_decoder:
    grads["W_dec"] = sae.remove_parallel_grad(state.params["W_dec"], grads["W_dec"])
  updates, opt_state = optimizer(c).update(grads, state.opt_state, state.params)
  if c.sae.arch == "jumprelu" and c.optim.threshold_lr_scale != 1:
    name = "log_threshold" if "log_threshold" in updates else "threshold"
    updates[name] = updates[name] * c.optim.threshold_lr_scale
  params = optax.apply_updates(state.params, updates)
  if unit_decoder:
    params["W_dec"] = sae.normalize_decoder(params["W_dec"])
  if topk_start:  # while TopK trains, every θ follows its per-row sparsity (arch.py)
    name = "log_threshold" if "log_threshold" in params else "threshold"
    theta = aux["theta_start"]
    value = jnp.log(jnp.maximum(theta, 1e-6)) if name == "log_threshold" else theta
    params[name] = jnp.where(jnp.isfinite(theta), jnp.full_like(params[name], value),
                             params[name])
  if c.sae.arch == "jumprelu" and c.sae.pre_relu and "threshold" in params:
    # θ itself stays ≥ 0 (projected). Below 0, a JumpReLU after the ReLU fires wherever the ReLU
    # is positive, but H(0 − θ) = 1 makes the L0 term count the ReLU's zeros too: λ paid on every
    # token, and no STE gradient reaches a θ more than ε/2 below the zeros to bring it back.
    params["threshold"] = jnp.maximum(params["threshold"], 0.0)
  bandwidth_stats = state.bandwidth_stats
  if adaptive:
    bandwidth_stats = bandwidth.config_update(c, bandwidth_stats, aux["pre_BxF"], theta_F)
  if c.sae.arch == "batchtopk":  # its inference threshold: a running mean, not a gradient step
    params["threshold"] = baselines.batchtopk_threshold(
        state.params["threshold"], aux["min_kept"], c.sae.batchtopk_threshold_decay,
        state.step == 0)

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
    # In raw activation units (θ·C), as eval.json's threshold_mean and the exports hold θ.
    metrics["threshold_mean"] = jnp.mean(sae.threshold(state.params)) * state.norm_scale
    if adaptive:  # normalised units, as sae.bandwidth
      metrics["bandwidth_mean"] = jnp.mean(hp["bandwidth"])
  if c.sae.arch in ("topk", "batchtopk"):
    metrics["auxk"] = aux["auxk"]
  if c.sae.arch == "batchtopk":  # the inference threshold, in raw activation units
    metrics["threshold_mean"] = jnp.mean(params["threshold"]) * state.norm_scale
  if c.sae.arch == "jumprelu" and c.train.step_impl == "sparse":
    metrics["dense_fallback"] = aux["dense_fallback"]  # 1: batch overflowed train.sparse_capacity
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            tokens_since_fired=tokens_since_fired, bandwidth_stats=bandwidth_stats)
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


# ----------------------------------------------------------------------------- host loop

def fit(c, workdir: str, source, mesh) -> tuple[TrainState, dict]:
  """Trains to train.num_steps from the newest checkpoint in `workdir` (else from scratch);
  returns the final state and the last step's metrics.

  Raises workdir.Preempted after saving a checkpoint on a preemption notice (SIGTERM, Ctrl-C)."""
  members = sweep.grid(c)  # [] for one SAE
  if members:
    logging.info("sweep: %d %s SAEs trained as one vmapped ensemble: %s", len(members),
                 c.sae.arch, ", ".join(name for name, _ in members))
  state, shardings, mngr = _restore_or_init(c, workdir, source, mesh, len(members))
  start, num_steps = int(state.step), c.train.num_steps
  workdir_lib.save_config(c, workdir)  # now that its checkpoint is known to fit
  writer = logs.MetricWriter(workdir, start, num_steps, c.train.batch_size,
                             tensorboard=c.log.tensorboard, wandb_project=c.log.wandb_project,
                             config=c.to_dict(), progress=c.log.progress)
  try:
    state, last = _loop(c, workdir, mesh, source, state, shardings, mngr, writer, members)
  finally:
    checkpoint.saved(mngr, wait=True)  # a save in flight completes even if training stops
    writer.close()
  if not last:  # resumed from the final checkpoint (killed after it): reuse its logged metrics
    last = workdir_lib.logged_metrics(workdir, num_steps)
  return state, last


def _restore_or_init(c, workdir, source, mesh, n_members):
  """The newest intact checkpoint's state, or a fresh one with the input scale estimated."""
  key = jax.random.key(c.seed)
  abstract = jax.eval_shape(lambda: init_state(c, key, 1.0, n_members))
  shardings = sharding.tree_shardings(mesh, abstract)
  mngr = checkpoint.manager(workdir, c.train.keep_checkpoints)
  state = checkpoint.restore_latest(mngr, checkpoint.abstract_like(abstract, shardings))
  if state is None:
    norm_scale = math.sqrt(source.mean_sq_norm(c.data.norm_rows, c.data.skip_nonfinite)
                           ) if c.data.normalize else 1.0
    logging.info("input normalisation: x / %.6g (so E‖x‖² = 1)", norm_scale)
    state, _ = sharded_init(c, mesh, key, norm_scale, n_members)
  else:
    logging.info("resumed from checkpoint at step %d", int(state.step))
  if int(state.step) > c.train.num_steps:
    raise ValueError(f"{workdir} holds a checkpoint at step {int(state.step)}, past "
                     f"train.num_steps={c.train.num_steps}; set --config.train.num_steps="
                     f"{int(state.step)} or more, or use a new --workdir")
  return state, shardings, mngr


def read_rows(c, source, mesh, step: int) -> tuple:
  """(this process's rows of the batch at `step`, where the non-finite rows replaced were)."""
  lo, hi = sharding.process_rows(mesh, c.train.batch_size)
  if not c.data.skip_nonfinite:
    return source.batch(step, c.train.batch_size, lo, hi), []
  return source.batch_skipping_nonfinite(step, c.train.batch_size, lo, hi)


def read_batch(c, source, mesh, step: int, in_flight=None) -> tuple:
  """(the batch at `step` laid out over the mesh, how many non-finite rows were replaced).

  Every process reads its own rows of a store. For a source on the mesh (live) the batch is
  what the step gathers its rows from on the devices (source.gathering), made once the state
  `in_flight` is ready where the source needs the devices to itself (live.py)."""
  if getattr(source, "on_mesh", False):
    x, replaced = source.step_input(step, c.train.batch_size, c.data.skip_nonfinite, in_flight)
  else:
    rows, replaced = read_rows(c, source, mesh, step)
    x = sharding.global_batch(mesh, rows, c.train.batch_size)
  if replaced:
    logging.warning("step %d: replaced %d non-finite activation rows (data.skip_nonfinite="
                    "True): %s", step, len(replaced), ", ".join(replaced[:5]))
  return x, len(replaced)


def global_batch(c, source, mesh, step: int, in_flight=None) -> jax.Array:
  """The batch at `step`, laid out over the mesh (every process reads its own rows; a source on
  the mesh gathers it once `in_flight` is ready)."""
  if getattr(source, "on_mesh", False):
    return source.global_batch(step, c.train.batch_size, c.data.skip_nonfinite, in_flight)[0]
  return read_batch(c, source, mesh, step)[0]


def _loop(c, workdir, mesh, source, state, shardings, mngr, writer, members):
  """Steps to train.num_steps. Step s+1 is dispatched before step s's metrics are read, so the
  host never waits on the device between steps; a checkpoint is saved only after its loss was
  checked."""
  # train.step_impl="auto" becomes the step this platform runs best (logged with why)
  step_fn = jit_train_step(sparse.resolve_step_impl(c, mesh.devices.flat[0].platform), mesh,
                           shardings)
  on_mesh = getattr(source, "on_mesh", False)
  if on_mesh:  # live: every step one program that gathers its batch on the devices
    step_fn = source.gathering(step_fn)
  start, num_steps = int(state.step), c.train.num_steps

  to_devices = lambda step: read_batch(c, source, mesh, step, in_flight=state)
  log_every = c.train.log_every
  # Rows replaced since the last metrics line; a resumed run recounts the steps it skips over.
  replaced_since_log = sum(to_devices(s)[1] for s in range(
      start - start % log_every, start)) if c.data.skip_nonfinite else 0
  last, pending, saving = {}, None, False
  preempted, stop_listening = workdir_lib.preemption_notice()
  # A source on the mesh runs collectives (the LM's chunk): in this thread, so that every
  # process dispatches them in the same order as the steps. Stores prefetch on a thread.
  batches = data.Prefetch(to_devices, range(start, num_steps),
                          0 if on_mesh else c.train.prefetch)
  try:
    for step in range(start, num_steps):
      x, replaced = next(batches)
      state, metrics = step_fn(state, x)
      if c.log.histogram_every and (step + 1) % c.log.histogram_every == 0:
        writer.histograms(step + 1, _histograms(c, members, state, global_batch(
            c, source, mesh, step, in_flight=state) if on_mesh else x))
      if pending is not None:
        last = _record(c, writer, members, *pending)
      replaced_since_log += replaced
      pending = (step, metrics, replaced_since_log)
      if (step + 1) % log_every == 0:
        replaced_since_log = 0
      stop = preempted(step + 1)  # every process calls this at every step
      save = stop or (step + 1) % c.train.checkpoint_every == 0 or step + 1 == num_steps
      if saving and checkpoint.saved(mngr, wait=save):  # a failed save stops training here
        saving = False
      if save:
        last, pending = _record(c, writer, members, *pending), None
        checkpoint.save(mngr, step + 1, state)
        saving = True
      if stop:
        checkpoint.saved(mngr, wait=True)
        raise workdir_lib.Preempted(
            f"{stop}: saved a checkpoint at step {step + 1} of {num_steps} in {workdir} and "
            "stopped; rerun the same command to resume")
    if pending is not None:
      last = _record(c, writer, members, *pending)
  finally:
    batches.close()
    stop_listening()
  return state, last


def _record(c, writer, members, step, metrics, replaced_since_log) -> dict:
  """Reads step's metrics (the next step already runs), stops on a non-finite loss, logs."""
  m = _host_metrics(jax.device_get(metrics), members)
  bad = [k for k, v in m.items() if k.split("/")[0] == "loss" and not math.isfinite(v)]
  if bad:
    raise FloatingPointError(
        f"non-finite loss ({', '.join(f'{k} = {m[k]}' for k in bad)}) at step {step}; training "
        "stopped (the last checkpoint is intact). Lower optim.learning_rate or check the "
        "activations")
  writer.advance(step + 1)
  if (step + 1) % c.train.log_every == 0 or step + 1 == c.train.num_steps:
    if c.data.skip_nonfinite:
      m["nonfinite_rows"] = workdir_lib.process_sum(replaced_since_log)
    writer.write(step + 1, m)
  return {"step": step + 1, **{k: v for k, v in m.items() if k != "nonfinite_rows"}}


def _host_metrics(metrics: dict, members) -> dict:
  """Floats from the step's metrics; an ensemble's [S] arrays become "key/MEMBER" entries."""
  if not members:
    return {k: float(v) for k, v in metrics.items()}
  return {f"{k}/{name}": float(v[i]) for k, v in metrics.items()
          for i, (name, _) in enumerate(members)}


def _histograms(c, members, state: TrainState, x_BxD) -> dict:
  if not members:
    return features.feature_histograms(state.params, x_BxD, state.norm_scale, arch=c.sae.arch,
                                       k=c.sae.k)
  out = {}
  for i, (name, hp) in enumerate(members):
    arrays = features.feature_histograms(sweep.take(state.params, i), x_BxD, state.norm_scale,
                                         arch=c.sae.arch, k=hp["k"])
    out.update({f"{k}/{name}": v for k, v in arrays.items()})
  return out
