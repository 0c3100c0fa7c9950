"""The run directory: which config a run in it was started with, what it holds and where its
activations are, and stopping for a preemption notice."""
import json
import os
import shutil
import signal
import threading

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from configs import base
from jumprelu import data, files

# Keys a resumed run may change: longer runs, other logging, another mesh (checkpoints restore
# onto any mesh), the bad-data policy (so a run stopped by a bad row can go on with
# data.skip_nonfinite=True), the overwrite switch itself, and the evaluation (a finished run
# rerun with other eval.* keys is evaluated again, not retrained).
RESUMABLE_KEYS = ("eval.num_contexts", "eval.skip_contexts",
                  "train.num_steps", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.overwrite", "data.skip_nonfinite",
                  "mesh.data", "mesh.model", "log.tensorboard", "log.wandb_project",
                  "log.histogram_every", "log.progress", "export.saelens", "export.model_name",
                  "export.hook_name", "export.context_size", "export.dataset_path",
                  "export.density_batches",
                  "train.step_impl", "train.sparse_capacity",  # same gradients either way
                  "train.prefetch")
# Everything a run writes into its workdir (logs.py's files too): what train.overwrite deletes.
RUN_OUTPUTS = ("checkpoints", "checkpoints_rejected", "export", "metrics.jsonl",
               "histograms.jsonl", "tensorboard", "wandb_id", "summary.json", "config.json",
               "members", "eval.json")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a preemption notice or Ctrl-C; rerun to resume


class Preempted(Exception):
  """Training stopped on a preemption notice (SIGTERM) or a Ctrl-C after saving a checkpoint."""


def flat(d: dict, prefix="") -> dict:
  out = {}
  for k, v in d.items():
    out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def store_path(c, workdir: str | None) -> str:
  """Where the activations are: data.path, or WORKDIR/activations for a harvested store."""
  if c.data.path or c.data.source == "npy":
    return c.data.path
  return os.path.join(workdir, "activations")


def contexts_used(c, workdir: str | None) -> int:
  """How many contexts of the packed text training saw (held-out evaluation starts after)."""
  if c.data.source == "live":
    return -(-c.train.num_steps // c.data.live_chunk_steps) * c.data.live_chunk_contexts
  manifest = data.read_manifest(store_path(c, workdir)) if workdir else None
  return 0 if manifest is None else manifest["next_context"] + 1


def save_config(c, workdir: str) -> None:
  """DIR/config.json: what check_config compares a later run with (and evaluate.py reads)."""
  if jax.process_index() == 0:
    files.save_json(os.path.join(workdir, "config.json"), json.loads(c.to_json_best_effort()))


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A saved config.json with the keys it lacks (added to configs/base.py after the run was
  made) at their defaults, so that an older run still resumes, evaluates and exports."""
  def merge(default, ours):
    if not isinstance(default, dict) or not isinstance(ours, dict):
      return ours
    return {**default, **{k: merge(default.get(k), v) for k, v in ours.items()}}
  return ml_collections.ConfigDict(merge(base.get_config().to_dict(), saved))


def check_config(c, workdir: str) -> None:
  """Refuses to continue a run in `workdir` that was started with a different (or unknown)
  config, unless train.overwrite=True, which deletes that run's outputs first. (config.json is
  written by save_config once its checkpoint is known to fit.)"""
  path = os.path.join(workdir, "config.json")
  new = flat(json.loads(c.to_json_best_effort()))
  problem = None
  if os.path.exists(path):
    try:
      with open(path) as fh:  # keys added to configs/base.py since: their defaults
        old = flat(with_defaults(json.load(fh)).to_dict())
    except (OSError, ValueError) as e:
      problem = f"a run whose config.json cannot be read ({e})"
    else:
      changed = sorted(k for k in set(old) | set(new)
                       if old.get(k) != new.get(k) and k not in RESUMABLE_KEYS)
      if changed:
        problem = "a run with a different config (" + ", ".join(
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed) + ")"
  elif any(os.path.isfile(p) or os.path.isdir(p) and os.listdir(p)
           for p in (os.path.join(workdir, name) for name in RUN_OUTPUTS)):
    problem = "a run without a config.json, so it cannot be checked"
  if problem and not c.train.overwrite:
    raise ValueError(f"{workdir} holds {problem}; use a new --workdir, or set "
                     "--config.train.overwrite=True to delete that run and start over")
  if jax.process_index() == 0 and problem:
    doomed = [p for p in RUN_OUTPUTS if os.path.lexists(os.path.join(workdir, p))]
    logging.warning("train.overwrite=True: %s holds %s; deleting %s", workdir, problem, doomed)
    for p in doomed:
      p = os.path.join(workdir, p)
      shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
  if jax.process_count() > 1:  # nobody opens the checkpoints before process 0 is done here
    multihost_utils.sync_global_devices("jumprelu_workdir_checked")


def preemption_notice():
  """(reason, stop): reason(step) turns from "" to why training stops (every process at the same
  step boundary, after saving) once a preemption notice (SIGTERM) or a first Ctrl-C (SIGINT)
  came; a second Ctrl-C raises KeyboardInterrupt at once. stop() stops listening."""
  on_main = threading.current_thread() is threading.main_thread()  # signals reach it alone
  if jax.process_count() > 1:
    # JAX's preemption service catches SIGTERM on any host and picks one step for all of them;
    # a Ctrl-C on any host becomes such a notice.
    if not on_main:
      return _sync_point, lambda: None
    return _sync_point, _on_first_ctrl_c(lambda: os.kill(os.getpid(), signal.SIGTERM))
  if not on_main:
    logging.warning("train_and_evaluate is not on the main thread, so a SIGTERM (preemption "
                    "notice) or Ctrl-C cannot be caught: it kills the run, which resumes from the "
                    "last checkpoint")
    return lambda step: "", lambda: None
  received = []
  previous = signal.signal(signal.SIGTERM,
                           lambda signum, frame: received.append("preemption notice (SIGTERM)"))
  restore = previous if previous is not None else signal.SIG_DFL
  stop_ctrl_c = _on_first_ctrl_c(lambda: received.append("Ctrl-C (SIGINT)"))

  def stop():
    signal.signal(signal.SIGTERM, restore)
    stop_ctrl_c()
  return lambda step: received[0] if received else "", stop


def _sync_point(step: int) -> str:
  reached = multihost_utils.reached_preemption_sync_point(step)
  return "preemption notice (SIGTERM, or Ctrl-C on a process)" if reached else ""


def _on_first_ctrl_c(notice):
  """Calls notice() on the first Ctrl-C and gives SIGINT back to its handler (Python's raises
  KeyboardInterrupt), so a second one aborts at once; returns a function that stops listening."""
  previous = signal.getsignal(signal.SIGINT)
  if previous in (signal.SIG_IGN, None):  # ignored (a background job), or not set from Python
    return lambda: None

  def first(signum, frame):
    signal.signal(signal.SIGINT, previous)
    logging.warning("Ctrl-C: saving a checkpoint at the next step boundary, then stopping (rerun "
                    "the same command to resume); Ctrl-C again to abort without saving")
    notice()
  signal.signal(signal.SIGINT, first)
  return lambda: signal.signal(signal.SIGINT, previous)


def process_sum(n: int) -> int:
  if jax.process_count() == 1:
    return n
  return int(np.sum(multihost_utils.process_allgather(np.asarray(n, np.int32))))


def logged_metrics(workdir: str, step: int) -> dict:
  """The train metrics logged at `step` by an earlier run (for a run resumed at its end)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as fh:
    records = [json.loads(line) for line in fh if line.strip()]
  # logs.write_eval's records ("eval/KEY") share the final step; they are not train metrics.
  record = next((r for r in records if r["step"] == step and
                 not any(k.startswith("eval/") for k in r)), {})
  added = ("tokens", "tokens_per_s", "nonfinite_rows")  # not train metrics: the log adds them
  return {k: v for k, v in record.items() if k not in added}
