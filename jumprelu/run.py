"""The job, top to bottom: check the config and the run directory, make the activation source
(harvesting a store first if the config asks), fit the SAE, export it, and evaluate it with the
SAE spliced into the LM. Every stage resumes from what is already on disk."""
import json
import os
import time

import jax
import numpy as np
from absl import logging

from jumprelu import (checkpoint, data, evaluate, export, features, files, harvest, live,
                      sharding, sweep, train, validate)
from jumprelu import workdir as workdir_lib
from jumprelu.lm import activations as lm_act


def train_and_evaluate(c, workdir: str) -> dict:
  """Runs the configured job in `workdir`; returns its summary (with eval results, if any).

  Raises workdir.Preempted after saving a checkpoint on a preemption notice."""
  validate.check_config(c)  # before the LM is loaded or anything harvested
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.model)
  sharding.check_divisible(mesh, c.sae.width, c.train.batch_size)
  workdir_lib.check_config(c, workdir)
  evaluating = evaluate.check_inputs(c, workdir)  # the eval.* keys, before hours of work
  if c.data.source == "harvest":
    harvest.harvest(c, workdir_lib.store_path(c, workdir))  # its LM on harvest.mesh
  source, truth = make_source(c, workdir, mesh)
  logging.info("mesh %s over %d devices; data: %d rows of width %d", dict(mesh.shape),
               mesh.size, source.n, source.d)

  t0 = time.time()
  state, last = train.fit(c, workdir, source, mesh)
  base = {"steps": c.train.num_steps, "tokens": c.train.num_steps * c.train.batch_size,
          "seconds": time.time() - t0}
  summary = export_all(c, workdir, state, last, base, source, mesh, truth)
  if evaluating:
    scalars = [{k: v for k, v in r.items() if k != "firing_frequency"}
               for r in evaluate.evaluate_workdir(c, workdir)]
    if sweep.is_sweep(c):
      for (name, _), r in zip(sweep.grid(c), scalars):
        summary["members"][name]["eval"] = r
    else:
      summary["eval"] = scalars[0]
  return summary


# ----------------------------------------------------------------------------- the source

def make_source(c, workdir: str | None = None, mesh=None
                ) -> tuple[data.ActivationSource, dict | None]:
  """The configured activation source (width, and a harvested store's model and site, checked
  against the config), and for synthetic data the ground truth: the true dictionary and L0.
  A live source computes its activations on `mesh` (default: the config's)."""
  if c.data.source == "live":
    source = live.LiveSource(c, mesh=mesh)
    validate.check_width(c, source.d, source.names[0])
    return source, None
  if c.data.source in ("npy", "harvest"):
    path = workdir_lib.store_path(c, workdir)
    manifest = data.read_manifest(path)
    if manifest is not None:
      harvest.check_store(c, manifest["spec"], path)
    source = data.open_npy(path, c.seed, c.data.sampler, c.data.block_rows, c.data.buffer_blocks)
    validate.check_width(c, source.d, path)
    return source, None
  s = c.data.synthetic
  x, true_GxD, facts = data.synthetic(s.n_rows, c.data.d_in, s.n_features, s.mean_l0,
                                      seed=s.seed, noise_std=s.noise_std,
                                      freq_exponent=s.freq_exponent,
                                      magnitude_sigma=s.magnitude_sigma)
  truth = {"dictionary": true_GxD, "true_l0": facts["true_l0"]}
  return data.ActivationSource([x], ["synthetic"], c.seed, data.resolve_sampler(c.data.sampler, ""),
                               c.data.block_rows, c.data.buffer_blocks), truth


# ----------------------------------------------------------------------------- export

def export_all(c, workdir: str, state, last: dict, base: dict, source, mesh, truth) -> dict:
  """Exports the run (or each member of a sweep, as a finished run of its own); returns the
  summary that summary.json holds."""
  # Firing densities on batches past the last step, shared by every member; every process reads.
  density_batches = [train.global_batch(c, source, mesh, c.train.num_steps + k)
                     for k in range(c.export.density_batches)] if c.export.saelens else []
  store = workdir_lib.store_path(c, workdir)
  manifest = data.read_manifest(store)  # a harvested store's: model, hook and context length
  lm_info = _lm_info(c, manifest)
  members = sweep.grid(c)
  if not members:
    return export_run(c, workdir, state, {**base, "final": last}, truth, density_batches,
                      manifest, lm_info)
  summary = {**base, "members": {}}
  for i, (name, hp) in enumerate(members):
    mc, mdir = sweep.member_config(c, hp, store), sweep.member_dir(workdir, name)
    mstate = train.member_state(state, i)
    _save_member(mc, workdir, mdir, name, mstate)
    summary["members"][name] = export_run(
        mc, mdir, mstate, {**base, "final": sweep.split_metrics(last, name)}, truth,
        density_batches, manifest, lm_info)
  if jax.process_index() == 0:
    files.save_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def _save_member(mc, workdir: str, mdir: str, name: str, mstate) -> None:
  """Makes WORKDIR/members/NAME a finished run of its own: its config, its final checkpoint
  (restorable by train.py with that config) and its lines of the ensemble's metrics."""
  workdir_lib.save_config(mc, mdir)
  if jax.process_index() == 0:
    records = []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as fh:
        records = [sweep.split_metrics(json.loads(line), name) for line in fh if line.strip()]
    files.save_jsonl(os.path.join(mdir, "metrics.jsonl"), records)
  mngr = checkpoint.manager(mdir, mc.train.keep_checkpoints)
  if mngr.latest_step() != int(mstate.step):  # not already saved by an earlier, resumed call
    checkpoint.save(mngr, int(mstate.step), mstate)
  mngr.wait_until_finished()


def _lm_info(c, manifest: dict | None) -> dict | None:
  """lm.activations.model_info of the LM the activations came from, when the config names it:
  a harvest, live training, or a store harvested from the config's LM; else None."""
  if c.data.source == "synthetic":
    return None
  try:
    if c.data.source == "npy" and (manifest or {}).get("spec", {}).get(
        "model") != lm_act.model_name(c):
      return None
    return lm_act.model_info(c)
  except FileNotFoundError:  # lm.model_path="" and the default model is not installed
    return None


def export_run(c, workdir: str, state, summary: dict, truth, density_batches, manifest,
               lm_info=None) -> dict:
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
  params = export.raw_params(c.sae.arch, sharding.to_host(state.params), norm_scale, c.sae.k)
  if c.export.saelens:
    density_F = features.mean_firing_density(state.params, density_batches, state.norm_scale,
                                             arch=c.sae.arch, k=c.sae.k)
  if jax.process_index() == 0:
    files.save_npz(os.path.join(workdir, "export", "params.npz"), params)
    if c.export.saelens:  # a harvested store's manifest supplies model, hook and context
      export.save_saelens_for_run(c, os.path.join(workdir, "export", "saelens"), params,
                                  density_F, norm_scale, manifest, lm_info)
    files.save_json(os.path.join(workdir, "summary.json"), summary)
  return summary


# ----------------------------------------------------------------------------- the report

# (label with unit, where the value is: "final" (the last train step) or "eval", its key, factor)
REPORT_ROWS = (
    ("L0, last train batch [features/token]", "final", "l0", 1),
    ("L0, eval [features/token]", "eval", "l0", 1),
    ("FVU, last train batch [fraction of variance]", "final", "fvu", 1),
    ("FVU, eval [fraction of variance]", "eval", "fvu", 1),
    ("delta LM loss, eval [nats/token]", "eval", "delta_lm_loss", 1),
    ("loss recovered, eval [%]", "eval", "loss_recovered", 100),
    ("dead [features]", "final", "dead", 1),
    ("dead on eval [% of features]", "eval", "frac_features_dead_on_eval", 100),
    ("threshold mean [raw activation units]", "final", "threshold_mean", 1),
    ("true L0 [features/row]", "", "true_l0", 1),
    ("dictionary recovery [mean best cosine]", "", "dictionary_recovery", 1),
)
# What a run directory holds, in the order the report lists it.
OUTPUTS = (
    ("checkpoints", "orbax checkpoints: rerun the same command to resume or extend the run"),
    ("export/params.npz", "the SAE in raw activation units (Gemma Scope layout)"),
    ("export/saelens", "SAELens 6 folder: cfg.json, sae_weights.safetensors, sparsity"),
    ("eval.json", "the evaluation, with each feature's firing frequency"),
    ("metrics.jsonl", "training metrics every train.log_every steps, and the evaluation's"),
    ("tensorboard", "TensorBoard event files (tensorboard --logdir DIR/tensorboard)"),
    ("summary.json", "this summary"),
    ("members", "a sweep's members, each a run of its own with the files above"),
)


def report(c, workdir: str, summary: dict) -> str:
  """The end of a run, for people: a table of its metrics with units, a legend, its outputs."""
  runs = summary["members"] if "members" in summary else {"": summary}
  table = []
  for label, where, key, factor in REPORT_ROWS:
    cells = [(r.get(where, {}) if where else r).get(key) for r in runs.values()]
    if any(isinstance(v, int | float) for v in cells):
      table.append([label] + [_cell(v, factor) for v in cells])
  header = ["metric"] + (list(runs) if "members" in summary else ["value"])
  widths = [max(len(row[i]) for row in [header] + table) for i in range(len(header))]
  lines = [f"done: {summary['steps']} steps of train.batch_size={c.train.batch_size} "
           f"({summary['tokens']:,} tokens) in {summary['seconds']:.0f} s"]
  lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in [header] + table]
  has_eval = any("eval" in r for r in runs.values())
  lines.append("legend:")
  lines.append(f"  last train batch: the final step's {c.train.batch_size} activations")
  if has_eval:
    tokens = next(r["eval"]["tokens"] for r in runs.values() if "eval" in r)
    lines.append(f"  eval: {tokens:,} tokens of eval.num_contexts={c.eval.num_contexts} held-out "
                 f"contexts, the SAE spliced into the LM at lm.site={c.lm.site}")
  lines.append(f"  dead: features that did not fire in the last train.dead_window_tokens="
               f"{c.train.dead_window_tokens:,} training tokens")
  if has_eval:
    lines.append("  dead on eval: features that never fired on the eval tokens")
  if c.sae.arch == "jumprelu":
    lines.append("  threshold mean: the mean JumpReLU threshold θ·C in raw activation units "
                 "(C: the input normalisation scale, summary.json's norm_scale)")
  lines.append(f"outputs in {workdir}:")
  present = [(p, what) for p, what in OUTPUTS if os.path.exists(os.path.join(workdir, p))]
  width = max([len(p) for p, _ in present] + [0]) + 1
  lines += [f"  {p + ('/' if os.path.isdir(os.path.join(workdir, p)) else ''):<{width}}  {what}"
            for p, what in present]
  return "\n".join(lines)


def _cell(v, factor) -> str:
  if isinstance(v, bool) or not isinstance(v, int | float):
    return "-"
  v *= factor
  return str(int(v)) if float(v).is_integer() and abs(v) >= 1 else f"{v:.4g}"
