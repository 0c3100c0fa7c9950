"""Metric logging on process 0: JSON lines (always), TensorBoard and W&B (when asked), feature
histograms, evaluation scalars, and progress bars with rate and ETA.

Files in the run directory: metrics.jsonl (one line per logged step, and one per evaluation),
histograms.jsonl (one line per histogram: step, name, bin edges and counts), tensorboard/
(event files), wandb_id.
"""
import io
import json
import os
import sys
import time
import uuid
import warnings

import jax
import numpy as np
import tqdm
from absl import logging

from jumprelu import files

with warnings.catch_warnings():
  # Without ipywidgets tqdm.auto warns and falls back to the terminal bar, which Jupyter redraws
  # on "\r" just as well: nothing for a user to do.
  warnings.simplefilter("ignore")
  import tqdm.auto

HISTOGRAM_BINS = 64


# ----------------------------------------------------------------------------- progress

class _LogLines(io.TextIOBase):
  """A file for tqdm that logs each redraw as a line, so a log file never fills with "\r"."""

  def write(self, text: str) -> int:
    if text.strip():
      logging.info("%s", text.strip())
    return len(text)


def progress(total: int | None, desc: str = "", unit: str = "it", *, start: int = 0,
             every_s: float | None = 60.0, bar: bool = True, stream=None) -> tqdm.tqdm:
  """A tqdm bar for a loop of `total` units on process 0's terminal (or notebook); elsewhere a
  log line every `every_s` seconds instead (none if every_s is None); other processes are quiet.

  The first update (compilation) is not left out of the rate and ETA but fades out of tqdm's
  moving average (weight x0.7 per redraw): a minute of it is gone ~2.5 s into 10 Hz redraws."""
  stream = sys.stderr if stream is None else stream
  quiet = jax.process_index() != 0
  # miniters=1: redraw by time alone, never "every N updates" (tqdm's guess from past rates).
  kw = dict(total=total, desc=desc, unit=unit, initial=start, unit_scale=True, miniters=1)
  # Jupyter and Colab streams are no TTY, yet draw a bar (a widget, or a line redrawn on "\r").
  if bar and (getattr(stream, "isatty", lambda: False)() or
              type(stream).__module__.startswith("ipykernel")):
    return tqdm.auto.tqdm(file=stream, disable=quiet, **kw)
  return tqdm.tqdm(file=_LogLines(), mininterval=every_s or 0.0,
                   disable=quiet or every_s is None, **kw)


_progress = progress  # for MetricWriter, whose `progress` flag hides the name


def _duration(seconds: float) -> str:
  """'17:40:08', or '73d 17:40:08' past a day."""
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  d, h = divmod(h, 24)
  return f"{d}d {h:02d}:{m:02d}:{s:02d}" if d else f"{h:02d}:{m:02d}:{s:02d}"


# ----------------------------------------------------------------------------- writers

def _tensorboard(workdir: str, purge_step: int | None = None):
  # Imported here: tensorboardX imports torch whenever it is installed (seconds).
  from tensorboardX import SummaryWriter
  # tensorboardX names an event file by the second and opens it with "wb", so a run resumed in
  # the same second would overwrite the last one's; TensorBoard reads a folder's files in name
  # order (purge_step relies on it), so the suffix keeps names unique and in time order.
  return SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step,
                       filename_suffix=f".{time.time_ns()}")


def _rewrite(path: str, keep, extra=()) -> None:
  """Rewrites a JSON-lines file with the records `keep` accepts, then `extra`."""
  records = []
  if os.path.exists(path):
    with open(path) as fh:
      records = [json.loads(line) for line in fh if line.strip()]
  elif not extra:
    return
  files.save_jsonl(path, [r for r in records if keep(r)] + list(extra))


def _truncate(path: str, resume_step: int) -> None:
  """Drops the lines of a JSON-lines file logged after `resume_step` (they will be redone)."""
  _rewrite(path, lambda r: r["step"] <= resume_step)


def _append(path: str, record: dict) -> None:
  with open(path, "a") as fh:
    fh.write(json.dumps(record) + "\n")


def _wandb(wandb, workdir: str, project: str, config: dict | None):
  # A resumed run continues the same W&B run: its id is kept in the workdir.
  id_path = os.path.join(workdir, "wandb_id")
  if os.path.exists(id_path):
    with open(id_path) as fh:
      run_id = fh.read().strip()
  else:
    run_id = uuid.uuid4().hex[:12]
    files.save_text(id_path, run_id)
  return wandb.init(project=project, id=run_id, resume="allow", dir=workdir, config=config,
                    name=os.path.basename(os.path.abspath(workdir)))


class MetricWriter:
  """Logs metrics and histograms on process 0 to JSON lines and, when asked, TensorBoard and
  W&B; shows a progress bar on a terminal. A resumed run first drops what it logged past its
  checkpoint."""

  def __init__(self, workdir: str, resume_step: int, total_steps: int, tokens_per_step: int, *,
               tensorboard: bool = False, wandb_project: str = "", config: dict | None = None,
               progress: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.hist_path = os.path.join(workdir, "histograms.jsonl")
    self.is_main = jax.process_index() == 0
    self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
    self.last_step, self.last_time = resume_step, time.time()
    self.tb = self.wandb = self.wandb_lib = None
    # Training logs its own lines (write), so the bar is silent when stderr is not a terminal.
    self.bar = _progress(total_steps, "train", "step", start=resume_step, every_s=None,
                         bar=progress)
    if not self.is_main:
      return
    os.makedirs(workdir, exist_ok=True)
    _truncate(self.path, resume_step)
    _truncate(self.hist_path, resume_step)
    if tensorboard:
      # TensorBoard hides what earlier event files hold from this step on: what a crashed run
      # logged past the checkpoint this one resumes from.
      self.tb = _tensorboard(workdir, purge_step=resume_step + 1 if resume_step else None)
    if wandb_project:
      import wandb  # validate.check_config has made sure it is installed
      self.wandb_lib, self.wandb = wandb, _wandb(wandb, workdir, wandb_project, config)

  def advance(self, step: int) -> None:
    """Moves the progress bar to `step` optimiser steps done."""
    self.bar.update(step - self.bar.n)

  def write(self, step: int, metrics: dict) -> None:
    """Logs the metrics after `step` optimiser steps, with throughput since the last call."""
    now = time.time()
    rate = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
    eta = _duration((self.total_steps - step) * self.tokens_per_step / max(rate, 1e-9))
    self.last_step, self.last_time = step, now
    if not self.is_main:
      return
    record = {"step": step, **metrics, "tokens": step * self.tokens_per_step,
              "tokens_per_s": rate}
    _append(self.path, record)
    scalars = {f"train/{k}": v for k, v in record.items() if k != "step"}
    if self.tb is not None:
      for tag, v in scalars.items():
        self.tb.add_scalar(tag, v, step)
    if self.wandb is not None:
      self.wandb.log(scalars, step=step)
    self.bar.clear()
    tok_s = tqdm.tqdm.format_sizeof(rate)
    if "loss" in metrics:
      self.bar.set_postfix_str(
          f"loss {metrics['loss']:.4g} | L0 {metrics['l0']:.1f} | {tok_s} tok/s", refresh=False)
      logging.info("step %d/%d | %.0f tok/s | ETA %s | loss %.5f | L0 %.1f | FVU %.4f | dead %d",
                   step, self.total_steps, rate, eta, metrics["loss"], metrics["l0"],
                   metrics["fvu"], metrics["dead"])
      return
    # An ensemble (sweep.py): "key/MEMBER" entries, one short line per member.
    members = [k.split("/", 1)[1] for k in metrics if k.startswith("loss/")]
    self.bar.set_postfix_str(f"{len(members)} SAEs | {tok_s} tok/s", refresh=False)
    logging.info("step %d/%d | %.0f tok/s (per SAE) | ETA %s\n%s", step, self.total_steps, rate,
                 eta, "\n".join(f"  {m}: loss {metrics['loss/' + m]:.5f} | L0 "
                                f"{metrics['l0/' + m]:.1f} | FVU {metrics['fvu/' + m]:.4f} | "
                                f"dead {metrics['dead/' + m]:.0f}" for m in members))

  def histograms(self, step: int, arrays: dict) -> None:
    """Logs a histogram of each named array (e.g. feature_histograms) after `step` steps."""
    if not self.is_main:
      return
    for name, values in arrays.items():
      values = np.asarray(values, np.float64).ravel()
      counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
      _append(self.hist_path, {"step": step, "name": name, "edges": edges.tolist(),
                               "counts": counts.tolist()})
      if self.tb is not None:  # TensorBoard names each bucket by its upper edge
        self.tb.add_histogram_raw(
            f"features/{name}", min=values.min(), max=values.max(), num=values.size,
            sum=values.sum(), sum_squares=np.sum(values**2), bucket_limits=edges[1:].tolist(),
            bucket_counts=counts.tolist(), global_step=step)
      if self.wandb is not None:
        hist = self.wandb_lib.Histogram(np_histogram=(counts, edges))
        self.wandb.log({f"features/{name}": hist}, step=step)

  def close(self) -> None:
    self.bar.close()
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


def write_eval(workdir: str, step: int, scalars: dict, *, tensorboard: bool) -> None:
  """Logs the number-valued entries of `scalars` (an evaluation after `step` steps) as
  "eval/<key>": one metrics.jsonl record and, when asked, TensorBoard scalars."""
  if jax.process_index() != 0:
    return
  values = {f"eval/{k}": v for k, v in scalars.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
  # A re-evaluation (other eval.* keys) replaces the earlier evaluation's record at this step.
  stale = lambda r: r["step"] == step and any(k.startswith("eval/") for k in r)
  _rewrite(os.path.join(workdir, "metrics.jsonl"), lambda r: not stale(r),
           [{"step": step, **values}])
  if tensorboard:
    with _tensorboard(workdir) as tb:
      for tag, v in values.items():
        tb.add_scalar(tag, v, step)
