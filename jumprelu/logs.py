"""Metric logging on process 0: JSON lines (always), TensorBoard and W&B (when asked), feature
histograms, and progress bars with rate and ETA.

Files in the run directory: metrics.jsonl (one line per logged step), histograms.jsonl (one
line per histogram: step, name, bin edges and counts), tensorboard/ (event files), wandb_id.
"""
import json
import math
import os
import socket
import struct
import sys
import time
import uuid

import jax
import numpy as np
from absl import logging

HISTOGRAM_BINS = 64


# ----------------------------------------------------------------------------- progress

def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _si(x: float) -> str:
  for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{prefix}"
  return str(int(x)) if float(x).is_integer() else f"{x:.3g}"


class Progress:
  """A progress bar with rate and ETA on process 0's terminal (or notebook). Elsewhere a log line
  every `every_s` seconds instead (none if every_s is None); other processes are quiet."""

  def __init__(self, total: int | None, desc: str = "", unit: str = "it", *, start: int = 0,
               every_s: float | None = 60.0, bar: bool = True, stream=None):
    self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
    self.n = self.start = start
    self.postfix = ""
    self.stream = sys.stderr if stream is None else stream
    main = jax.process_index() == 0
    # Jupyter and Colab streams are no TTY but redraw a line on "\r" as a terminal does.
    tty = (getattr(self.stream, "isatty", lambda: False)() or
           type(self.stream).__module__.startswith("ipykernel"))
    self.is_bar = main and tty and bar
    self.is_lines = main and not tty and every_s is not None
    self.t0 = self.last_shown = time.time()
    self.mark = None  # (time, n) after the first update: the rate leaves out compilation
    self.width = 0  # of the last drawn bar, to blank it out
    self.closed = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def update(self, n: int = 1) -> None:
    """Counts n more units done."""
    self.n += n
    now = time.time()
    if self.mark is None:
      self.mark = (now, self.n)
    if self.is_bar and now - self.last_shown >= 0.1:  # redrawing costs; 10 Hz looks smooth
      self.last_shown = now
      self._draw()
    elif self.is_lines and now - self.last_shown >= self.every_s:
      self.last_shown = now
      logging.info("%s", self.text())

  def text(self) -> str:
    """'desc  42%|████    | 420/1000 [00:10<00:14, 40.1 it/s] postfix'."""
    now = time.time()
    elapsed = now - self.t0
    if self.mark is not None and self.n > self.mark[1] and now > self.mark[0]:
      rate = (self.n - self.mark[1]) / (now - self.mark[0])
    else:
      rate = (self.n - self.start) / elapsed if elapsed > 0 else 0.0
    done = f"{_si(self.n)}/{_si(self.total)}" if self.total else _si(self.n)
    times = _duration(elapsed)
    bar = ""
    if self.total:
      frac = min(self.n / self.total, 1.0)
      eta = (self.total - self.n) / rate if rate > 0 else float("inf")
      times += "<" + _duration(eta)
      filled = int(frac * 20)
      bar = f"{100 * frac:3.0f}%|{'█' * filled}{' ' * (20 - filled)}| "
    head = f"{self.desc} " if self.desc else ""
    tail = f" {self.postfix}" if self.postfix else ""
    return f"{head}{bar}{done} [{times}, {_si(rate)} {self.unit}/s]{tail}"

  def _draw(self) -> None:
    text = self.text()
    self.stream.write("\r" + text + " " * (self.width - len(text)))
    self.width = len(text)
    self.stream.flush()

  def clear(self) -> None:
    """Blanks the bar so a log line can be printed; the next update redraws it."""
    if self.is_bar and self.width:
      self.stream.write("\r" + " " * self.width + "\r")
      self.width = 0
      self.stream.flush()

  def close(self) -> None:
    if self.closed:
      return
    self.closed = True
    if self.is_bar:
      self._draw()
      self.stream.write("\n")
      self.stream.flush()
    elif self.is_lines:
      logging.info("%s", self.text())


def progress(total: int | None, desc: str = "", unit: str = "it", **kw) -> Progress:
  """A progress bar for a loop of `total` units (harvesting, evaluation): update(n), close()."""
  return Progress(total, desc, unit, **kw)


# ----------------------------------------------------------------------------- TensorBoard

# An event file is a sequence of TFRecords, each holding one `Event` protocol buffer. The few
# fields we need are encoded by hand (field numbers from TensorFlow's event.proto and
# summary.proto), so neither TensorFlow nor a protobuf package is needed.

def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # the Castagnoli polynomial, reflected
    table.append(c)
  return table


_CRC32C_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC-32C, rotated right by 15 bits plus a constant."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7F:
    out.append(n & 0x7F | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  """One protobuf field; wire 0: varint, 1: 64-bit, 2: length-delimited, 5: 32-bit."""
  key = _varint(number << 3 | wire)
  return key + _varint(len(payload)) + payload if wire == 2 else key + payload


def _double(x) -> bytes:
  return struct.pack("<d", float(x))


class EventWriter:
  """Appends TensorBoard scalars and histograms to an event file in `logdir`."""

  def __init__(self, logdir: str, purge_step: int | None = None):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self.fh = open(self.path, "ab")
    self._write(0, _field(3, 2, b"brain.Event:2"))  # Event.file_version
    if purge_step:
      # Event.session_log{status: START}: TensorBoard then hides the events at or after this
      # step from earlier files (those a crashed run logged past the checkpoint it resumes from).
      self._write(purge_step, _field(7, 2, _field(1, 0, _varint(1))))

  def _write(self, step: int, what: bytes) -> None:
    event = _field(1, 1, _double(time.time())) + _field(2, 0, _varint(step)) + what
    header = struct.pack("<Q", len(event))
    self.fh.write(header + struct.pack("<I", masked_crc32c(header)) + event +
                  struct.pack("<I", masked_crc32c(event)))
    self.fh.flush()

  def scalars(self, step: int, values: dict) -> None:
    """Event.summary with one Summary.Value{tag, simple_value} per entry."""
    summary = b"".join(
        _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
        for tag, v in values.items())
    self._write(step, _field(5, 2, summary))

  def histogram(self, step: int, tag: str, values, counts, edges) -> None:
    """Event.summary with one Summary.Value{tag, histo}; bucket i is (edges[i], edges[i+1]]."""
    values = np.asarray(values, np.float64)
    histo = (_field(1, 1, _double(values.min())) + _field(2, 1, _double(values.max())) +
             _field(3, 1, _double(values.size)) + _field(4, 1, _double(values.sum())) +
             _field(5, 1, _double(np.sum(values**2))) +
             _field(6, 2, np.asarray(edges[1:], "<f8").tobytes()) +  # bucket_limit, packed
             _field(7, 2, np.asarray(counts, "<f8").tobytes()))  # bucket, packed
    self._write(step, _field(5, 2, _field(1, 2, _field(1, 2, tag.encode()) + _field(5, 2, histo))))

  def close(self) -> None:
    self.fh.close()


# ----------------------------------------------------------------------------- writer

def _truncate(path: str, resume_step: int) -> None:
  """Drops the lines of a JSON-lines file logged after `resume_step` (they will be redone)."""
  if not os.path.exists(path):
    return
  with open(path) as fh:
    kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= resume_step]
  with open(path + ".tmp", "w") as fh:
    fh.writelines(kept)
  os.replace(path + ".tmp", path)


def _wandb(wandb, workdir: str, project: str, config: dict | None):
  # A resumed run continues the same W&B run: its id is kept in the workdir.
  id_path = os.path.join(workdir, "wandb_id")
  if os.path.exists(id_path):
    with open(id_path) as fh:
      run_id = fh.read().strip()
  else:
    run_id = uuid.uuid4().hex[:12]
    with open(id_path, "w") as fh:
      fh.write(run_id)
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
    self.bar = Progress(total_steps, "train", "step", start=resume_step, every_s=None,
                        bar=progress)
    if not self.is_main:
      return
    os.makedirs(workdir, exist_ok=True)
    _truncate(self.path, resume_step)
    _truncate(self.hist_path, resume_step)
    if tensorboard:
      self.tb = EventWriter(os.path.join(workdir, "tensorboard"),
                            purge_step=resume_step + 1 if resume_step else None)
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
    eta = (self.total_steps - step) * self.tokens_per_step / max(rate, 1e-9)
    self.last_step, self.last_time = step, now
    if not self.is_main:
      return
    record = {"step": step, **metrics, "tokens": step * self.tokens_per_step,
              "tokens_per_s": rate}
    with open(self.path, "a") as fh:
      fh.write(json.dumps(record) + "\n")
    if self.tb is not None:
      self.tb.scalars(step, {f"train/{k}": v for k, v in record.items() if k != "step"})
    if self.wandb is not None:
      self.wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
    eta = time.strftime("%H:%M:%S", time.gmtime(eta))
    self.bar.clear()
    if "loss" in metrics:
      self.bar.postfix = f"loss {metrics['loss']:.4g} | L0 {metrics['l0']:.1f} | {_si(rate)} tok/s"
      logging.info("step %d/%d | %.0f tok/s | ETA %s | loss %.5f | L0 %.1f | FVU %.4f | dead %d",
                   step, self.total_steps, rate, eta, metrics["loss"], metrics["l0"],
                   metrics["fvu"], metrics["dead"])
      return
    # An ensemble (sweep.py): "key/MEMBER" entries, one short line per member.
    members = [k.split("/", 1)[1] for k in metrics if k.startswith("loss/")]
    self.bar.postfix = f"{len(members)} SAEs | {_si(rate)} tok/s"
    logging.info("step %d/%d | %.0f tok/s (per SAE) | ETA %s\n%s", step, self.total_steps, rate,
                 eta, "\n".join(f"  {m}: loss {metrics['loss/' + m]:.5f} | L0 "
                                f"{metrics['l0/' + m]:.1f} | FVU {metrics['fvu/' + m]:.4f} | "
                                f"dead {metrics['dead/' + m]:.0f}" for m in members))

  def histograms(self, step: int, arrays: dict) -> None:
    """Logs a histogram of each named array (e.g. feature_histograms) after `step` steps."""
    if not self.is_main:
      return
    with open(self.hist_path, "a") as fh:
      for name, values in arrays.items():
        values = np.asarray(values, np.float64).ravel()
        counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
        fh.write(json.dumps({"step": step, "name": name, "edges": edges.tolist(),
                             "counts": counts.tolist()}) + "\n")
        if self.tb is not None:
          self.tb.histogram(step, f"features/{name}", values, counts, edges)
        if self.wandb is not None:
          hist = self.wandb_lib.Histogram(np_histogram=(counts, edges))
          self.wandb.log({f"features/{name}": hist}, step=step)

  def close(self) -> None:
    self.bar.close()
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()
