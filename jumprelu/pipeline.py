"""The whole job: harvest activations (if the config asks), train, evaluate with the SAE spliced
into the LM, and print a summary table. Every stage resumes from what is already on disk."""
import json
import os

import jax
from absl import logging

from jumprelu import arch, data, evaluate, export, harvest, interop, sweep, train, validate


def contexts_used(c, workdir: str) -> int:
  """How many contexts of the packed text training saw (held-out evaluation starts after)."""
  if c.data.source == "live":
    return -(-c.train.num_steps // c.data.live_chunk_steps) * c.data.live_chunk_contexts
  manifest = data.read_manifest(train.store_path(c, workdir)) if workdir else None
  return 0 if manifest is None else manifest["next_context"] + 1


def run(c, workdir: str) -> dict:
  """Runs the configured job in `workdir`; returns the training summary (and eval results)."""
  validate.check_config(c)  # before the LM is loaded or anything harvested
  if c.data.source == "harvest":
    harvest.harvest(c, train.store_path(c, workdir), harvest.load_lm(c))
  summary = train.train_and_evaluate(c, workdir)
  if c.data.source in ("harvest", "live") and c.eval.num_contexts > 0:
    scalars = [{k: v for k, v in r.items() if k != "firing_frequency"}
               for r in evaluate_workdir(c, workdir)]
    if sweep.is_sweep(c):
      for (name, _), r in zip(sweep.grid(c), scalars):
        summary["members"][name]["eval"] = r
    else:
      summary["eval"] = scalars[0]
  return summary


def evaluate_workdir(c, workdir: str) -> list[dict]:
  """Evaluates the finished run in `workdir` (every member of a sweep, together)."""
  if not sweep.is_sweep(c):
    return evaluate_runs([(c, workdir)])
  store = train.store_path(c, workdir)
  return evaluate_runs([(sweep.member_config(c, hp, store), sweep.member_dir(workdir, name))
                        for name, hp in sweep.grid(c)])


def evaluate_sae(c, workdir: str, params_path: str) -> dict:
  """Evaluates the SAE at `params_path` (params.npz or a SAELens folder) on c's LM and site,
  on contexts held out from training; writes DIR/eval.json and logs a table."""
  own = os.path.abspath(params_path) == os.path.abspath(
      os.path.join(workdir, "export", "params.npz"))
  return evaluate_runs([(c, workdir)], params_paths=[params_path], describe=[own])[0]


def evaluate_runs(runs, params_paths=None, describe=None) -> list[dict]:
  """Evaluates the finished runs [(config, workdir)] at one LM site together (the clean runs are
  shared), each on its DIR/export/params.npz unless params_paths says otherwise, and writes
  each DIR/eval.json. describe[i]: record run i's λ, ε and k (off for a foreign SAE)."""
  c = runs[0][0]
  for rc, rdir in runs:
    if (rc.lm.site, rc.lm.model_path) != (c.lm.site, c.lm.model_path):
      raise ValueError(f"{rdir}: evaluated together runs must share lm.site and lm.model_path; "
                       f"got {rc.lm.site!r} vs {c.lm.site!r}")
  params_paths = params_paths or [os.path.join(d, "export", "params.npz") for _, d in runs]
  describe = describe or [True] * len(runs)
  lm = harvest.load_lm(c)
  contexts = evaluate.held_out_contexts(
      c, lm[1], lm[2], max(contexts_used(rc, rdir) for rc, rdir in runs))
  saes = [interop.load(p) for p in params_paths]
  half_windows = [_half_window(rc, rdir) if own else 0.0
                  for (rc, rdir), own in zip(runs, describe)]
  results = []
  for (rc, rdir), path, own, result in zip(runs, params_paths, describe, evaluate.evaluate_many(
      c, lm, saes, contexts, half_windows=half_windows)):
    meta = {"site": rc.lm.site, "model": lm[3], "params": path,
            "member": os.path.basename(rdir) if os.path.basename(
                os.path.dirname(os.path.abspath(rdir))) == "members" else "",
            **{a: rc.sae[a] if own and a in arch.USES[result["arch"]] else None
               for a in ("sparsity_coefficient", "bandwidth")}}
    result = {**meta, **result, "k": result.get("k")}
    results.append(result)
    if jax.process_index() == 0:
      os.makedirs(rdir, exist_ok=True)
      export.save_json(os.path.join(rdir, "eval.json"), result)
      logging.info("evaluation of %s on %d held-out tokens at %s:\n%s", rdir, result["tokens"],
                   rc.lm.site, evaluate.table(result))
  return results


def _half_window(c, workdir: str) -> float:
  """ε·C/2 in raw units for a JumpReLU run (C from its summary.json), else 0 (not reported)."""
  path = os.path.join(workdir, "summary.json")
  if c.sae.arch != "jumprelu" or not os.path.exists(path):
    return 0.0
  with open(path) as fh:
    scale = json.load(fh).get("norm_scale")
  return 0.0 if scale is None else 0.5 * c.sae.bandwidth * scale
