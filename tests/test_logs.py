"""Logging: JSON lines, TensorBoard event files, W&B, feature histograms, progress bars."""
import importlib.machinery
import io
import json
import logging as pylogging
import os
import struct
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from jumprelu import features, logs, run, sae, sharding, train, validate
from tests.conftest import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = {"loss": 0.5, "l0": 12.0, "fvu": 0.1, "dead": 0.0}


class _Tty(io.StringIO):
  def isatty(self):
    return True


def _records(path):
  """The TFRecords of an event file, their checksums verified."""
  data, out, i = open(path, "rb").read(), [], 0
  while i < len(data):
    header = data[i:i + 8]
    (n,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[i + 8:i + 12])[0] == logs.masked_crc32c(header)
    body = data[i + 12:i + 12 + n]
    assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == logs.masked_crc32c(body)
    out.append(body)
    i += 16 + n
  return out


def test_crc32c_matches_the_standard_check_value():
  crc = 0xE3069283  # CRC-32C of b"123456789" (RFC 3720, appendix B.4)
  masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  assert logs.masked_crc32c(b"123456789") == masked


def test_tensorboard_reads_our_event_files_and_purges_on_resume(tmp_path):
  accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  w = logs.MetricWriter(str(tmp_path), 0, 100, 64, tensorboard=True, progress=False)
  for step in (10, 20, 30):
    w.write(step, {**METRICS, "loss": 1.0 / step})
  values = np.random.default_rng(0).normal(size=1000)
  w.histograms(20, {"threshold": values})
  w.close()
  # Resumed from a checkpoint at step 20: what was logged after it is dropped everywhere.
  w = logs.MetricWriter(str(tmp_path), 20, 100, 64, tensorboard=True, progress=False)
  w.write(30, {**METRICS, "loss": 7.0})
  w.close()

  ea = accumulator.EventAccumulator(str(tmp_path / "tensorboard"),
                                    size_guidance={"scalars": 0, "histograms": 0})
  ea.Reload()
  assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [
      (10, pytest.approx(0.1)), (20, pytest.approx(0.05)), (30, 7.0)]
  assert "train/tokens_per_s" in ea.Tags()["scalars"]
  (h,) = ea.Histograms("features/threshold")
  assert h.step == 20 and h.histogram_value.num == 1000
  assert h.histogram_value.min == pytest.approx(values.min())
  assert sum(h.histogram_value.bucket) == 1000
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [(l["step"], l["loss"]) for l in lines] == [(10, 0.1), (20, 0.05), (30, 7.0)]


def test_histograms_jsonl_and_feature_statistics(tmp_path):
  p = sae.init(jax.random.key(0), 8, 32, threshold_init=0.2)
  x = np.asarray(jax.random.normal(jax.random.key(1), (256, 8)))
  arrays = features.feature_histograms(p, 2.0 * x, 2.0)
  pre = np.asarray(sae.pre_activations(p, x))
  np.testing.assert_allclose(10 ** arrays["log10_firing_density"] - 1e-10,
                             np.mean(pre > 0.2, axis=0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(arrays["threshold"], 0.2, rtol=1e-6)

  w = logs.MetricWriter(str(tmp_path), 0, 10, 8, progress=False)
  w.histograms(5, arrays)
  w.close()
  lines = [json.loads(l) for l in open(tmp_path / "histograms.jsonl")]
  assert [(l["step"], l["name"]) for l in lines] == [(5, "log10_firing_density"),
                                                      (5, "threshold")]
  assert all(sum(l["counts"]) == 32 and len(l["edges"]) == len(l["counts"]) + 1 for l in lines)


def test_training_logs_histograms_and_tensorboard_at_intervals(tmp_path):
  run.train_and_evaluate(tiny(**{"log.histogram_every": 4}), str(tmp_path / "a"))
  lines = [json.loads(l) for l in open(tmp_path / "a" / "histograms.jsonl")]
  assert [(l["step"], l["name"]) for l in lines] == [
      (s, n) for s in (4, 8, 12) for n in ("log10_firing_density", "threshold")]
  assert all(sum(l["counts"]) == 64 for l in lines)  # one count per feature (sae.width)
  (events,) = os.listdir(tmp_path / "a" / "tensorboard")
  # file version, metrics at 3 steps, 2 histograms at each
  assert len(_records(tmp_path / "a" / "tensorboard" / events)) == 1 + 3 + 6
  run.train_and_evaluate(tiny(**{"log.tensorboard": False, "log.histogram_every": 0}),
                           str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "tensorboard")
  assert not os.path.exists(tmp_path / "b" / "histograms.jsonl")


def test_firing_density_on_a_sharded_mesh_matches_one_device():
  c = tiny(**{"mesh.data": 2, "mesh.model": 4})
  mesh = sharding.make_mesh(2, 4)
  state, _ = train.sharded_init(c, mesh, jax.random.key(0), 1.5)
  x = run.make_source(c)[0].batch(0, c.train.batch_size)
  expected = features.mean_firing_density(jax.device_get(state.params), [x, 2 * x], 1.5)
  got = features.mean_firing_density(
      state.params, [sharding.global_batch(mesh, b, len(b)) for b in (x, 2 * x)], 1.5)
  np.testing.assert_allclose(got, expected, atol=1e-7)
  assert 0 < got.mean() < 1


def test_wandb_gets_metrics_histograms_and_keeps_the_run_id(tmp_path, monkeypatch):
  calls = []
  fake = types.ModuleType("wandb")
  fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
  fake.Histogram = lambda np_histogram: ("hist", len(np_histogram[0]))
  fake.init = lambda **kw: calls.append(("init", kw)) or fake
  fake.log = lambda d, step: calls.append(("log", step, sorted(d)))
  fake.finish = lambda: calls.append(("finish",))
  monkeypatch.setitem(sys.modules, "wandb", fake)

  for resume in (0, 4):
    w = logs.MetricWriter(str(tmp_path), resume, 10, 8, wandb_project="proj",
                          config={"a": 1}, progress=False)
    w.write(4, METRICS)
    w.histograms(4, {"threshold": np.ones(5)})
    w.close()
  inits = [c[1] for c in calls if c[0] == "init"]
  assert inits[0]["project"] == "proj" and inits[0]["config"] == {"a": 1}
  assert inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"
  logged = [c for c in calls if c[0] == "log"]
  assert logged[0] == ("log", 4, ["train/dead", "train/fvu", "train/l0", "train/loss",
                                  "train/tokens", "train/tokens_per_s"])
  assert logged[1] == ("log", 4, ["features/threshold"])
  assert calls[-1] == ("finish",)


def test_asking_for_wandb_without_it_names_the_key(monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import fails, find_spec says missing
  with pytest.raises((ValueError, ModuleNotFoundError)) as e:
    validate.check_config(tiny(**{"log.wandb_project": "p"}))
  assert "log.wandb_project" in str(e.value)


def test_progress_bar_shows_rate_and_eta_on_a_terminal(monkeypatch):
  stream = _Tty()
  bar = logs.progress(100, "harvest", "seq", stream=stream)
  monkeypatch.setattr(bar, "last_shown", 0.0)
  bar.t0 -= 10.0  # as if 10 s had passed
  bar.update(25)
  text = stream.getvalue()
  assert "harvest" in text and " 25%" in text and "25/100" in text
  assert "2.5 seq/s" in text and "00:10<00:30" in text
  bar.close()
  assert stream.getvalue().endswith("\n")


def test_progress_logs_lines_off_a_terminal_and_is_quiet_elsewhere(monkeypatch, caplog):
  stream = io.StringIO()
  with caplog.at_level(pylogging.INFO):
    with logs.progress(10, "eval", "batch", every_s=0.0, stream=stream) as bar:
      bar.update(5)
  assert stream.getvalue() == ""
  assert any("eval" in r.getMessage() and "5/10" in r.getMessage() for r in caplog.records)

  caplog.clear()
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  tty = _Tty()
  with caplog.at_level(pylogging.INFO):
    with logs.progress(10, "eval", every_s=0.0, stream=tty) as bar:
      bar.update(5)
    bar = logs.progress(10, "eval", every_s=0.0, stream=io.StringIO())
    bar.update(5)
    bar.close()
  assert tty.getvalue() == "" and not caplog.records


def test_every_base_config_key_has_a_comment():
  from configs import base
  comments = validate.config_comments(base)
  keys = [k for k, _ in validate._flat_items(base.get_config())]
  assert [k for k in keys if not comments.get(k)] == []


def test_cli_show_config_and_help():
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "train.py"), "--show_config",
       "--config=" + os.path.join(REPO, "configs", "synthetic.py"), "--config.sae.width=512"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  lines = run.stdout.splitlines()
  assert "sae.width = 512  [base: 16384]  # dictionary width F" in lines
  assert any(l.startswith("log.histogram_every = 1000  # steps between histograms") for l in lines)
  assert not os.path.exists(os.path.join(REPO, "None"))  # no workdir was needed or made
  run = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "train.py"), "--help"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
  assert "--show_config" in run.stdout  # (absl exits 1 after --help)
