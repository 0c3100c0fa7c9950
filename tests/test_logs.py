"""Logging: JSON lines, TensorBoard event files, W&B, feature histograms, eval scalars,
progress bars."""
import importlib.machinery
import io
import json
import logging as pylogging
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import tqdm

from jumprelu import features, logs, run, sae, sharding, train, validate, workdir
from tests.conftest import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = {"loss": 0.5, "l0": 12.0, "fvu": 0.1, "dead": 0.0}


class _Tty(io.StringIO):
  def isatty(self):
    return True


def _events(logdir):
  """TensorBoard's own reading of the event files in `logdir`."""
  accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  ea = accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
  ea.Reload()
  return ea


def test_tensorboard_reads_our_event_files_and_purges_on_resume(tmp_path):
  pytest.importorskip("tensorboard")
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

  ea = _events(tmp_path / "tensorboard")
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
  assert len(os.listdir(tmp_path / "a" / "tensorboard")) == 1
  ea = _events(tmp_path / "a" / "tensorboard")
  assert [e.step for e in ea.Scalars("train/loss")] == [4, 8, 12]
  for name in ("log10_firing_density", "threshold"):
    assert [h.step for h in ea.Histograms(f"features/{name}")] == [4, 8, 12]
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
  now = [1000.0]
  monkeypatch.setattr(tqdm.std, "time", lambda: now[0])  # tqdm's clock
  stream = _Tty()
  bar = logs.progress(100, "harvest", "seq", stream=stream)
  now[0] += 10.0
  bar.update(25)
  text = stream.getvalue()
  assert "harvest" in text and " 25%" in text and "25.0/100" in text
  assert "2.50seq/s" in text and "00:10<00:30" in text
  bar.close()
  assert stream.getvalue().endswith("\n")


def test_progress_logs_lines_off_a_terminal_and_is_quiet_elsewhere(monkeypatch, caplog):
  stream = io.StringIO()
  with caplog.at_level(pylogging.INFO):
    with logs.progress(10, "eval", "batch", every_s=0.0, stream=stream) as bar:
      bar.update(5)
  assert stream.getvalue() == ""
  messages = [r.getMessage() for r in caplog.records]
  assert any("eval" in m and "5.00/10.0" in m for m in messages)
  assert not any("\r" in m for m in messages)  # a log file gets lines, not redraws

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


def test_eta_counts_days_past_24_hours(tmp_path, caplog):
  assert logs._duration(300) == "00:05:00"
  assert logs._duration(73 * 86400 + 17 * 3600 + 40 * 60 + 8) == "73d 17:40:08"
  w = logs.MetricWriter(str(tmp_path), 0, 1000 + int(73.5 * 86400), 1, progress=False)
  w.last_time -= 1000.0  # 1000 steps of 1 token in 1000 s (and a few ms): 73.5 days to go
  with caplog.at_level(pylogging.INFO):
    w.write(1000, METRICS)
  w.close()
  assert any("ETA 73d 12:" in r.getMessage() for r in caplog.records)


def test_write_eval_logs_beside_training_and_survives_resume(tmp_path):
  pytest.importorskip("tensorboard")
  w = logs.MetricWriter(str(tmp_path), 0, 20, 8, tensorboard=True, progress=False)
  for step in (10, 20):
    w.write(step, METRICS)
  w.close()
  logs.write_eval(str(tmp_path), 20, {"delta_lm_loss": 0.25, "l0": 12, "arch": "jumprelu",
                                      "threshold_quantiles": {"50": 0.1}, "skipped": None,
                                      "flag": True}, tensorboard=True)
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[-1] == {"step": 20, "eval/delta_lm_loss": 0.25, "eval/l0": 12}
  ea = _events(tmp_path / "tensorboard")
  assert [(e.step, e.value) for e in ea.Scalars("eval/delta_lm_loss")] == [(20, 0.25)]
  assert [(e.step, e.value) for e in ea.Scalars("eval/l0")] == [(20, 12.0)]
  assert [e.step for e in ea.Scalars("train/loss")] == [10, 20]
  # A run resumed at its end reuses the train record at that step, not the eval one after it.
  assert workdir.logged_metrics(str(tmp_path), 20) == {"step": 20, **METRICS}

  logs.MetricWriter(str(tmp_path), 20, 30, 8, progress=False).close()  # keeps step <= 20
  assert len(open(tmp_path / "metrics.jsonl").readlines()) == 3
  logs.MetricWriter(str(tmp_path), 10, 30, 8, progress=False).close()  # drops both at step 20
  assert [json.loads(l) for l in open(tmp_path / "metrics.jsonl")] == [lines[0]]


def test_every_base_config_key_has_a_comment():
  from configs import base
  comments = validate.config_comments(base)
  keys = [k for k, _ in validate._flat_items(base.get_config())]
  assert [k for k in keys if not comments.get(k)] == []


def test_cli_show_config():
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "train.py"), "--show_config",
       "--config=" + os.path.join(REPO, "configs", "synthetic.py"), "--config.sae.width=512"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  lines = run.stdout.splitlines()
  assert "sae.width = 512  [base: 16384]  # dictionary width F" in lines
  assert any(l.startswith("log.histogram_every = 1000  # steps between histograms") for l in lines)
  assert not os.path.exists(os.path.join(REPO, "None"))  # no workdir was needed or made


def test_logged_metrics_skips_eval_records_at_the_same_step(tmp_path):
  # Whatever order the lines at the final step come in, a run resumed at its end must get the
  # train metrics back, not an evaluation's.
  logs.write_eval(str(tmp_path), 20, {"l0": 3.0}, tensorboard=False)
  w = logs.MetricWriter(str(tmp_path), 20, 20, 8, progress=False)
  w.write(20, METRICS)
  w.close()
  assert [sorted(json.loads(l)) for l in open(tmp_path / "metrics.jsonl")][0] == [
      "eval/l0", "step"]
  assert workdir.logged_metrics(str(tmp_path), 20) == {"step": 20, **METRICS}


def test_a_re_evaluation_replaces_the_earlier_eval_record(tmp_path):
  w = logs.MetricWriter(str(tmp_path), 0, 20, 8, progress=False)
  w.write(20, METRICS)
  w.close()
  logs.write_eval(str(tmp_path), 20, {"l0": 3.0}, tensorboard=False)
  logs.write_eval(str(tmp_path), 20, {"l0": 4.0}, tensorboard=False)  # other eval.* keys
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines == [{"step": 20, **lines[0]}, {"step": 20, "eval/l0": 4.0}]
  assert "loss" in lines[0]  # the train record stays
