"""The whole job: harvest activations (if the config asks), train, evaluate with the SAE spliced
into the LM, and print a summary table. Every stage resumes from what is already on disk."""
import json
import os

import jax
from absl import logging

from jumprelu import evaluate, export, harvest, train, validate


def run(c, workdir: str) -> dict:
  """Runs the configured job in `workdir`; returns the training summary (and eval results)."""
  validate.check_config(c)  # before the LM is loaded or anything harvested
  lm = None
  if c.data.source in ("harvest", "live"):
    lm = harvest.load_lm(c)
  if c.data.source == "harvest":
    used = harvest.harvest(c, train.store_path(c, workdir), lm)["next_context"] + 1
  elif c.data.source == "live":
    chunks = -(-c.train.num_steps // c.data.live_chunk_steps)
    used = chunks * c.data.live_chunk_contexts
  summary = train.train_and_evaluate(c, workdir)
  if lm is None or c.eval.num_contexts == 0:
    return summary
  contexts = evaluate.held_out_contexts(c, lm[1], lm[2], used)
  params = export.load_npz(os.path.join(workdir, "export", "params.npz"))
  result = evaluate.evaluate_lm(c, lm, params, contexts)
  summary["eval"] = {k: v for k, v in result.items() if k != "firing_frequency"}
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, "eval.json.tmp")
    with open(tmp, "w") as fh:
      json.dump({"site": c.lm.site, "model": lm[3], **result}, fh)
    os.replace(tmp, os.path.join(workdir, "eval.json"))
    logging.info("evaluation on %d held-out tokens at %s:\n%s", result["tokens"], c.lm.site,
                 evaluate.table(result))
  return summary
