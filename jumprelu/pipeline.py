"""The whole job: harvest activations (if the config asks), train, evaluate with the SAE spliced
into the LM, and print a summary table. Every stage resumes from what is already on disk."""
import os

import jax
from absl import logging

from jumprelu import data, evaluate, export, harvest, interop, train, validate


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
    result = evaluate_sae(c, workdir, os.path.join(workdir, "export", "params.npz"))
    summary["eval"] = {k: v for k, v in result.items() if k != "firing_frequency"}
  return summary


def evaluate_sae(c, workdir: str, params_path: str) -> dict:
  """Evaluates the SAE at `params_path` (params.npz or a SAELens folder) on c's LM and site,
  on contexts held out from training; writes DIR/eval.json and logs a table."""
  lm = harvest.load_lm(c)
  contexts = evaluate.held_out_contexts(c, lm[1], lm[2], contexts_used(c, workdir))
  params = interop.load(params_path)
  result = evaluate.evaluate_lm(c, lm, params, contexts)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    export.save_json(os.path.join(workdir, "eval.json"),
                     {"site": c.lm.site, "model": lm[3], "params": params_path, **result})
    logging.info("evaluation on %d held-out tokens at %s:\n%s", result["tokens"], c.lm.site,
                 evaluate.table(result))
  return result
