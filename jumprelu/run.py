"""The job, top to bottom: check the config and the run directory, make the activation source
(harvesting a store first if the config asks), fit the SAE, export it, and evaluate it with the
SAE spliced into the LM. Every stage resumes from what is already on disk."""
import json
import os
import time

import jax
import numpy as np
from absl import logging

from jumprelu import (checkpoint, data, evaluate, export, features, files, harvest, sharding,
                      sweep, train, validate)
from jumprelu import workdir as workdir_lib
from jumprelu.lm import activations as lm_act


def train_and_evaluate(c, workdir: str) -> dict:
  """Runs the configured job in `workdir`; returns its summary (with eval results, if any).

  Raises workdir.Preempted after saving a checkpoint on a preemption notice."""
  validate.check_config(c)  # before the LM is loaded or anything harvested
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.model)
  sharding.check_divisible(mesh, c.sae.width, c.train.batch_size)
  workdir_lib.check_config(c, workdir)
  if c.data.source == "harvest":
    harvest.harvest(c, workdir_lib.store_path(c, workdir), lm_act.load_lm(c))
  source, truth = make_source(c, workdir)
  logging.info("mesh %s over %d devices; data: %d rows of width %d", dict(mesh.shape),
               mesh.size, source.n, source.d)

  t0 = time.time()
  state, last = train.fit(c, workdir, source, mesh)
  base = {"steps": c.train.num_steps, "tokens": c.train.num_steps * c.train.batch_size,
          "seconds": time.time() - t0}
  summary = export_all(c, workdir, state, last, base, source, mesh, truth)
  if c.data.source in ("harvest", "live") and c.eval.num_contexts > 0:
    scalars = [{k: v for k, v in r.items() if k != "firing_frequency"}
               for r in evaluate.evaluate_workdir(c, workdir)]
    if sweep.is_sweep(c):
      for (name, _), r in zip(sweep.grid(c), scalars):
        summary["members"][name]["eval"] = r
    else:
      summary["eval"] = scalars[0]
  return summary


# ----------------------------------------------------------------------------- the source

def make_source(c, workdir: str | None = None) -> tuple[data.ActivationSource, dict | None]:
  """The configured activation source (width, and a harvested store's model and site, checked
  against the config), and for synthetic data the ground truth: the true dictionary and L0."""
  if c.data.source == "live":
    source = harvest.LiveSource(c)
    validate.check_width(c, source.d, source.names[0])
    return source, None
  if c.data.source in ("npy", "harvest"):
    path = workdir_lib.store_path(c, workdir)
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


# ----------------------------------------------------------------------------- export

def export_all(c, workdir: str, state, last: dict, base: dict, source, mesh, truth) -> dict:
  """Exports the run (or each member of a sweep, as a finished run of its own); returns the
  summary that summary.json holds."""
  # Firing densities on batches past the last step, shared by every member; every process reads.
  density_batches = [train.global_batch(c, source, mesh, c.train.num_steps + k)
                     for k in range(c.export.density_batches)] if c.export.saelens else []
  store = workdir_lib.store_path(c, workdir)
  manifest = data.read_manifest(store)  # a harvested store's: model, hook and context length
  members = sweep.grid(c)
  if not members:
    return export_run(c, workdir, state, {**base, "final": last}, truth, density_batches,
                      manifest)
  summary = {**base, "members": {}}
  for i, (name, hp) in enumerate(members):
    mc, mdir = sweep.member_config(c, hp, store), sweep.member_dir(workdir, name)
    mstate = train.member_state(state, i)
    _save_member(mc, workdir, mdir, name, mstate)
    summary["members"][name] = export_run(
        mc, mdir, mstate, {**base, "final": sweep.split_metrics(last, name)}, truth,
        density_batches, manifest)
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


def export_run(c, workdir: str, state, summary: dict, truth, density_batches, manifest) -> dict:
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
                                  density_F, norm_scale, manifest)
    files.save_json(os.path.join(workdir, "summary.json"), summary)
  return summary
