"""Metric logging: JSON lines in DIR/metrics.jsonl and a progress line, on process 0 only."""
import json
import os
import time

import jax
from absl import logging


class MetricWriter:
  """Appends one JSON line per logged step; a resumed run first drops lines past its checkpoint."""

  def __init__(self, workdir: str, resume_step: int, total_steps: int, tokens_per_step: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.is_main = jax.process_index() == 0
    self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
    self.last_step, self.last_time = resume_step, time.time()
    if self.is_main and os.path.exists(self.path):
      with open(self.path) as fh:
        kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path + ".tmp", "w") as fh:
        fh.writelines(kept)
      os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, metrics: dict) -> None:
    """Logs the metrics after `step` optimiser steps, with throughput since the last call."""
    now = time.time()
    rate = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
    eta = (self.total_steps - step) * self.tokens_per_step / max(rate, 1e-9)
    self.last_step, self.last_time = step, now
    if not self.is_main:
      return
    record = {"step": step, **metrics, "tokens": step * self.tokens_per_step,
              "tokens_per_s": rate}
    with open(self.path, "a") as fh:
      fh.write(json.dumps(record) + "\n")
    logging.info("step %d/%d | %.0f tok/s | ETA %s | loss %.5f | L0 %.1f | FVU %.4f | dead %d",
                 step, self.total_steps, rate, time.strftime("%H:%M:%S", time.gmtime(eta)),
                 metrics["loss"], metrics["l0"], metrics["fvu"], metrics["dead"])

  def close(self) -> None:
    pass
