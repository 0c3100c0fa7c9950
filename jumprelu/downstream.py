"""Downstream evaluations that need no hub (SAEBench's definitions, Karvonen et al. 2025,
arXiv 2503.09532): feature absorption on the first-letter task (absorption.py) and sparse
probing on tasks labelled offline (sparse_probing.py), for one SAE at the config's lm.site.

  result = downstream.evaluate(c, workdir)      # {"absorption": {...}, "sparse_probing": {...}}
  eval_json.update(downstream.scalars(result))  # flat numbers for eval.json and report tables
  downstream.add_to_eval_json(c, workdir)       # both, into DIR/eval.json
"""
import json
import os
import time

from absl import logging

from jumprelu import absorption, feature_acts, files, sparse_probing
from jumprelu import workdir as workdir_lib
from jumprelu.lm import activations as lm_act

TASKS = ("absorption", "sparse_probing")


def evaluate(c, workdir: str | None, params_path: str | None = None, *, tasks=TASKS,
             num_contexts: int = 128, skip_contexts: int | None = None, lm=None,
             words_per_letter: int = 40, docs_per_family: int = 80, seed: int = 0) -> dict:
  """The chosen downstream evaluations of the SAE at params_path (default
  DIR/export/params.npz). Token-level probing reads num_contexts held-out contexts from
  skip_contexts on (default: the first context training did not read)."""
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown:
    raise ValueError(f"unknown downstream evaluations {unknown}; choose from {TASKS}")
  params_path = params_path or os.path.join(workdir, "export", "params.npz")
  lm = lm_act.load_lm(c) if lm is None else lm
  sae = feature_acts.load_sae(params_path)
  feature_acts.check_site(c, lm[1], sae[2], f"the SAE at {params_path}")
  out = {}
  if "absorption" in tasks:
    start = time.perf_counter()
    out["absorption"] = absorption.evaluate(c, lm, sae, words_per_letter=words_per_letter,
                                            seed=seed)
    logging.info("absorption of %s: mean absorption fraction %.3f, full absorption rate %.3f "
                 "over %d letters (%.0f s)", params_path,
                 out["absorption"]["mean_absorption_fraction"],
                 out["absorption"]["mean_full_absorption_rate"],
                 out["absorption"]["letters_scored"], time.perf_counter() - start)
  if "sparse_probing" in tasks:
    start = time.perf_counter()
    first = workdir_lib.contexts_used(c, workdir) if skip_contexts is None else skip_contexts
    contexts = feature_acts.held_out(c, lm[1], lm[2], first, num_contexts)
    out["sparse_probing"] = sparse_probing.evaluate(c, lm, sae, contexts, seed=seed,
                                                    docs_per_family=docs_per_family)
    logging.info("sparse probing of %s (%.0f s):\n%s", params_path,
                 time.perf_counter() - start, table(out["sparse_probing"]))
  return out


def table(probing: dict) -> str:
  """Held-out accuracy per task: the dense probe and each k."""
  cols = ["dense"] + [f"k={k}" for k in sparse_probing.KS]
  lines = [f"{'task':<16}" + "".join(f"{c:>8}" for c in cols)]
  for task, r in probing.items():
    if "dense" in r:
      lines.append(f"{task:<16}" + "".join(f"{r[c]:>8.3f}" for c in cols))
  return "\n".join(lines)


def scalars(result: dict) -> dict:
  """Flat eval.json keys: absorption_fraction, full_absorption_rate, and
  sparse_probing_<task>_<dense|kN> accuracies."""
  out = {}
  if "absorption" in result:
    a = result["absorption"]
    out["absorption_fraction"] = a["mean_absorption_fraction"]
    out["full_absorption_rate"] = a["mean_full_absorption_rate"]
    out["absorption_split_features"] = a["mean_split_features"]
  for task, r in result.get("sparse_probing", {}).items():
    for key, v in r.items():
      if key == "dense" or key.startswith("k="):
        out[f"sparse_probing_{task}_{key.replace('=', '')}"] = v
  return out


def add_to_eval_json(c, workdir: str, params_path: str | None = None, *, tasks=TASKS,
                     **kw) -> dict:
  """Runs evaluate and merges its scalars (and the full results, under "downstream") into
  DIR/eval.json (created if absent); returns the scalars."""
  result = evaluate(c, workdir, params_path, tasks=tasks, **kw)
  path = os.path.join(workdir, "eval.json")
  record = {}
  if os.path.exists(path):
    with open(path) as fh:
      record = json.load(fh)
  flat = scalars(result)
  files.save_json(path, {**record, **flat, "downstream": result})
  return flat
