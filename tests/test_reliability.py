"""Fault injection: kill -9 anywhere, preemption, damaged checkpoints, bad data, bad configs and
workdir safety. Each test fails if its guarantee breaks."""
import errno
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import base
from jumprelu import checkpoint, cli, data, export, files, run, sharding, train, validate
from jumprelu import workdir as workdir_lib
from tests.conftest import free_port, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(REPO, "experiments", "train.py")
# The command line of tiny(): a CLI run and an in-process run train the same SAE.
TINY_ARGS = ["--config=" + os.path.join(REPO, "configs", "synthetic.py"),
             "--config.data.d_in=16", "--config.data.synthetic.n_rows=4096",
             "--config.data.synthetic.n_features=32", "--config.data.synthetic.mean_l0=3.0",
             "--config.data.norm_rows=1024", "--config.sae.width=64",
             "--config.train.batch_size=64", "--config.train.num_steps=12",
             "--config.train.log_every=4", "--config.train.checkpoint_every=5",
             "--config.train.keep_checkpoints=5", "--config.mesh.data=1", "--config.mesh.model=1",
             # Faults below fire while step N's batch is read; without the prefetch thread that
             # is while step N runs, so each kill lands at an exact, asserted step.
             "--config.train.prefetch=0"]

# Runs experiments/train.py with one fault injected: process `who` sends itself signal `sig` at
# an exact point ("step" N: reading step N's batch; "save" N: checkpoint N fully written, commit
# marker included, but not yet renamed into place, in orbax's background thread; "export":
# writing params.npz after the final checkpoint). Arguments: where, N, sig, who, then the flags.
INJECT = r"""
import os, runpy, signal, sys
where, at, sig, who = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3]), sys.argv[4]
del sys.argv[1:5]
def die():
  if os.environ["JUMPRELU_TEST_PROCESS"] == who:
    os.kill(os.getpid(), sig)
    if "--distributed" in sys.argv:  # give JAX's notifier time to reach the coordinator
      import time; time.sleep(3)
if where == "step":
  from jumprelu import data
  real_batch = data.ActivationSource.batch
  def batch(self, step, *a, **k):
    if step == at:
      die()
    return real_batch(self, step, *a, **k)
  data.ActivationSource.batch = batch
elif where == "save":  # orbax's last act in a commit is this rename (orbax 0.12)
  from orbax.checkpoint._src.path import async_path
  real_rename = async_path.rename
  async def rename(src, dst, *a, **k):
    if os.path.basename(str(dst)) == str(at):
      die()
    return await real_rename(src, dst, *a, **k)
  async_path.rename = rename
elif where == "export":
  from jumprelu import files
  files.save_npz = lambda *a, **k: die()
sys.argv[0] = os.path.join(os.getcwd(), "experiments", "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env(devices=8, process=0):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JUMPRELU_TEST_PROCESS"] = str(process)
  return env


def _cli(workdir, inject=None):
  """The training command (with a fault injected if given); returns the finished process."""
  cmd = [sys.executable, TRAIN_PY] if inject is None else [
      sys.executable, "-c", INJECT, *map(str, inject), "0"]
  cmd += [*TINY_ARGS, f"--workdir={workdir}"]
  return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _target(c, mesh_shape=(1, 1)):
  mesh = sharding.make_mesh(*mesh_shape)
  abstract = jax.eval_shape(lambda: train.init_state(c, jax.random.key(0), 1.0))
  return checkpoint.abstract_like(abstract, sharding.tree_shardings(mesh, abstract))


def _restore(workdir, step=None, c=None):
  """The checkpoint at `step` read straight from orbax (no checks), or the newest one."""
  mngr = checkpoint.manager(str(workdir), 10)
  step = mngr.latest_step() if step is None else step
  return mngr.restore(step, args=ocp.args.StandardRestore(_target(c or tiny())))


def _assert_same_state(a, b):
  assert int(a.step) == int(b.step)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _steps(workdir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*")
                if os.path.basename(p).isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted tiny run: checkpoints at steps 5, 10 and 12, export and summary."""
  workdir = tmp_path_factory.mktemp("reference")
  run.train_and_evaluate(tiny(), str(workdir))
  return workdir


@pytest.fixture
def absl_warnings(caplog):
  caplog.set_level(logging.WARNING, logger="absl")
  return lambda: "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ----------------------------------------------------------------------------- kills, preemption

def test_kill_anywhere_then_rerun_ends_bit_identical(tmp_path, reference):
  """kill -9 before the first checkpoint, inside a checkpoint save and during the export, and a
  Ctrl-C in between (exit status 75, like a preemption notice): rerunning the same command each
  time ends where an uninterrupted run does, bit for bit."""
  run_dir = tmp_path / "run"

  killed = _cli(run_dir, inject=("step", 3, "SIGKILL"))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert _steps(run_dir) == []

  killed = _cli(run_dir, inject=("save", 10, "SIGKILL"))  # starts over; dies committing step 10
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert _steps(run_dir) == [5]
  assert glob.glob(f"{run_dir}/checkpoints/10.orbax-checkpoint-tmp*/commit_success.txt")

  preempted = _cli(run_dir, inject=("step", 6, "SIGINT"))  # Ctrl-C stops as SIGTERM does
  assert preempted.returncode == workdir_lib.EXIT_PREEMPTED, preempted.stderr[-3000:]
  assert "skipping the checkpoint of step 10: its save never finished" in preempted.stderr
  assert "resumed from checkpoint at step 5" in preempted.stderr
  assert "Ctrl-C again to abort without saving" in preempted.stderr
  assert "Ctrl-C (SIGINT): saved a checkpoint at step 7 of 12" in preempted.stderr
  assert _steps(run_dir) == [5, 7]
  assert not glob.glob(f"{run_dir}/checkpoints/*tmp*")

  killed = _cli(run_dir, inject=("export", 0, "SIGKILL"))  # after the final checkpoint
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert "resumed from checkpoint at step 7" in killed.stderr
  assert _steps(run_dir) == [5, 7, 10, 12]
  assert not os.path.exists(run_dir / "export" / "params.npz")

  done = _cli(run_dir)
  assert done.returncode == 0, done.stderr[-3000:]
  _assert_same_state(_restore(run_dir), _restore(reference))
  a = export.load_gemma_scope(str(reference / "export" / "params.npz"))
  b = export.load_gemma_scope(str(run_dir / "export" / "params.npz"))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  final = [json.load(open(d / "summary.json"))["final"] for d in (reference, run_dir)]
  assert final[0] == final[1]
  assert [json.loads(l)["step"] for l in open(run_dir / "metrics.jsonl")] == [4, 8, 12]


def _sigterm_when_reading(monkeypatch, at: int):
  """Sends this process a preemption notice (SIGTERM) when step `at`'s batch is read; returns
  the real ActivationSource.batch."""
  real_batch = data.ActivationSource.batch

  def notice(self, step, *a, **k):
    if step == at:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_batch(self, step, *a, **k)

  monkeypatch.setattr(data.ActivationSource, "batch", notice)
  return real_batch


def test_sigterm_saves_at_the_next_step_boundary_and_stops(tmp_path, monkeypatch):
  _sigterm_when_reading(monkeypatch, 8)
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(workdir_lib.Preempted, match="saved a checkpoint at step 9 of 12 .* rerun the "
                                            "same command to resume"):
    # No prefetch thread: reading step 8 then happens while step 8 runs (see TINY_ARGS).
    run.train_and_evaluate(tiny(**{"train.prefetch": 0}), str(tmp_path))
  assert signal.getsignal(signal.SIGTERM) == before  # the handler is only ours while training
  assert _steps(tmp_path) == [5, 9]
  assert int(_restore(tmp_path).step) == 9


def test_sigterm_with_the_prefetch_thread_saves_resumes_and_ends_identical(
    tmp_path, monkeypatch, reference):
  """The notice arrives from the prefetch thread, up to train.prefetch steps early: the run
  still saves at a step boundary, stops, and the rerun ends bit-identical."""
  real_batch = _sigterm_when_reading(monkeypatch, 8)
  with pytest.raises(workdir_lib.Preempted, match="saved a checkpoint at step"):
    run.train_and_evaluate(tiny(**{"train.prefetch": 2}), str(tmp_path))
  saved = _steps(tmp_path)[-1]
  assert 6 <= saved <= 9, _steps(tmp_path)
  monkeypatch.setattr(data.ActivationSource, "batch", real_batch)
  run.train_and_evaluate(tiny(**{"train.prefetch": 2}), str(tmp_path))
  a, b = _restore(reference, 12), _restore(tmp_path, 12)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ctrl_c_saves_at_the_next_step_boundary_stops_and_resumes_identical(
    tmp_path, monkeypatch, reference, absl_warnings):
  """The first Ctrl-C (SIGINT) stops like a preemption notice: a checkpoint at the next step
  boundary, workdir.Preempted (exit status 75 in train.py), and the rerun ends bit-identical."""
  real_batch = data.ActivationSource.batch

  def ctrl_c(self, step, *a, **k):
    if step == 8:
      os.kill(os.getpid(), signal.SIGINT)
    return real_batch(self, step, *a, **k)

  monkeypatch.setattr(data.ActivationSource, "batch", ctrl_c)
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(workdir_lib.Preempted, match=r"Ctrl-C \(SIGINT\): saved a checkpoint at step "
                                            "9 of 12 .* rerun the same command to resume"):
    run.train_and_evaluate(tiny(**{"train.prefetch": 0}), str(tmp_path))
  assert "Ctrl-C again to abort without saving" in absl_warnings()
  assert signal.getsignal(signal.SIGINT) == before
  assert _steps(tmp_path) == [5, 9]
  monkeypatch.setattr(data.ActivationSource, "batch", real_batch)
  run.train_and_evaluate(tiny(**{"train.prefetch": 0}), str(tmp_path))
  _assert_same_state(_restore(tmp_path, 12), _restore(reference, 12))


def test_second_ctrl_c_aborts_at_once_without_saving(tmp_path, monkeypatch):
  real_batch = data.ActivationSource.batch
  read = []

  def ctrl_c_twice(self, step, *a, **k):
    read.append(step)
    if step == 6:  # two within one step: the first would save at step 7
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGINT)
    return real_batch(self, step, *a, **k)

  monkeypatch.setattr(data.ActivationSource, "batch", ctrl_c_twice)
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    run.train_and_evaluate(tiny(**{"train.prefetch": 0}), str(tmp_path))
  assert max(read) == 6 and _steps(tmp_path) == [5]  # no checkpoint at step 7
  assert signal.getsignal(signal.SIGINT) == before


@pytest.mark.multiprocess
def test_multihost_preemption_agrees_on_one_step(tmp_path):
  """A Ctrl-C reaches one of two processes and becomes a SIGTERM (a preemption notice) there:
  JAX's preemption sync point makes both save the same step and stop; rerunning both resumes
  and finishes. (A Ctrl-C takes SIGTERM's whole path, so one run tests both.)"""
  def launch(inject):
    port = free_port()
    procs = []
    for i in range(2):
      cmd = [sys.executable, "-c", INJECT, *inject] if inject else [sys.executable, TRAIN_PY]
      cmd += [*TINY_ARGS, f"--workdir={tmp_path}", "--config.mesh.data=2",
              "--config.mesh.model=4", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2", f"--process_id={i}"]
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(4, process=i), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return [(p, p.communicate(timeout=300)[1]) for p in procs]

  outs = launch(("step", "6", "SIGINT", "1"))  # only process 1 gets the notice
  for p, err in outs:
    assert p.returncode == workdir_lib.EXIT_PREEMPTED, err[-3000:]
  saved = [err.split("saved a checkpoint at step ")[1].split(" ")[0] for _, err in outs]
  assert saved[0] == saved[1] and int(saved[0]) in _steps(tmp_path)

  for p, err in launch(None):
    assert p.returncode == 0, err[-3000:]
  assert _steps(tmp_path)[-1] == 12
  assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [4, 8, 12]


# ----------------------------------------------------------------------------- damaged checkpoints

def _largest_data_file(step_dir):
  return max(glob.glob(f"{step_dir}/default/ocdbt.process_0/d/*"), key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as fh:
    fh.truncate(os.path.getsize(path) // 2)


def _garbage(step_dir):  # restores without any error from orbax: only the fingerprint sees it
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as fh:
    fh.seek(os.path.getsize(path) // 2)
    fh.write(np.random.default_rng(0).bytes(64))


def _no_commit_marker(step_dir):
  os.remove(step_dir / checkpoint.COMMIT_MARKER)


def _garbage_metadata(step_dir):
  (step_dir / "_CHECKPOINT_METADATA").write_text("{garbage")


def _left_as_tmp(step_dir):  # what a kill in the middle of an async save leaves
  os.rename(step_dir, f"{step_dir}.orbax-checkpoint-tmp-1234")


@pytest.mark.parametrize("damage,reason", [
    (_truncate, "it cannot be read"),
    (_garbage, "its data does not match the fingerprint saved with it"),
    (_no_commit_marker, "it has no commit marker"),
    (_garbage_metadata, "its metadata .* is missing or damaged"),
    (_left_as_tmp, "its save never finished"),
])
def test_damaged_checkpoint_is_skipped_with_a_warning(tmp_path, reference, absl_warnings,
                                                     damage, reason):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  damage(tmp_path / "checkpoints" / "12")
  state = checkpoint.restore_latest(checkpoint.manager(str(tmp_path), 5), _target(tiny()))
  _assert_same_state(state, _restore(reference, 10))
  assert f"skipping the checkpoint {'of' if damage is _left_as_tmp else 'at'} step 12" in \
      absl_warnings()
  assert re.search(reason, absl_warnings())
  if damage is not _left_as_tmp:
    assert "falling back to step 10" in absl_warnings()
    assert os.path.isdir(tmp_path / "checkpoints_rejected" / "12")  # kept, not deleted
  assert _steps(tmp_path) == [5, 10]


def test_training_goes_on_from_the_last_good_checkpoint(tmp_path, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  _garbage(tmp_path / "checkpoints" / "12")
  _truncate(tmp_path / "checkpoints" / "10")
  summary = run.train_and_evaluate(tiny(), str(tmp_path))  # resumes at 5, retrains 10 and 12
  assert summary["final"]["step"] == 12
  _assert_same_state(_restore(tmp_path), _restore(reference))
  assert sorted(os.listdir(tmp_path / "checkpoints_rejected")) == ["10", "12"]


def test_checkpoint_of_another_layout_is_an_error_not_damage(reference):
  with pytest.raises(ValueError, match="holds a train state of another layout"):
    checkpoint.restore_latest(checkpoint.manager(str(reference), 5),
                              _target(tiny(**{"sae.width": 32})))
  assert _steps(reference) == [5, 10, 12]


def test_fingerprint_is_the_same_on_any_mesh(reference):
  state = _restore(reference)
  moved = jax.device_put(state, jax.tree.map(lambda x: x.sharding, _target(tiny(), (2, 4))))
  assert checkpoint.fingerprint(moved) == checkpoint.fingerprint(state)
  nudged = state.replace(norm_scale=np.nextafter(state.norm_scale, np.float32(2)))
  assert checkpoint.fingerprint(nudged) != checkpoint.fingerprint(state)


# ----------------------------------------------------------------------------- bad data

def _npy_store(tmp_path, x, name="shard_00000.npy"):
  store = tmp_path / "store"
  store.mkdir(exist_ok=True)
  np.save(store / name, x)
  return str(store)


def _acts(n=512, d=16, seed=0):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_non_finite_rows_are_named(tmp_path):
  x = _acts()
  x[300, 5] = np.nan
  store = _npy_store(tmp_path, x)
  c = tiny(**{"data.source": "npy", "data.path": store, "data.norm_rows": 512})
  with pytest.raises(FloatingPointError, match=r"shard_00000\.npy at row 300 \(sampled for "
                                               r"the input normalisation\).*skip_nonfinite"):
    run.train_and_evaluate(c, str(tmp_path / "a"))
  c = tiny(**{"data.source": "npy", "data.path": store, "data.normalize": False})
  with pytest.raises(FloatingPointError, match=r"shard_00000\.npy at row 300 \(batch of step"):
    run.train_and_evaluate(c, str(tmp_path / "b"))


def test_skip_nonfinite_replaces_rows_counts_them_and_resumes_exactly(tmp_path, monkeypatch):
  x = _acts()
  bad_rows = [7, 300, 301, 511]
  x[bad_rows, 3] = [np.nan, np.inf, -np.inf, np.nan]
  c = tiny(**{"data.source": "npy", "data.path": _npy_store(tmp_path, x),
              "data.skip_nonfinite": True, "data.norm_rows": 512})
  source = data.open_npy(c.data.path, seed=c.seed)
  rows, replaced = source.batch_skipping_nonfinite(0, 512)  # one epoch: every row once
  assert sorted(replaced) == sorted(f"{c.data.path}/shard_00000.npy at row {r}"
                                    for r in bad_rows)
  assert rows.shape == (512, 16) and np.isfinite(rows).all()
  # a process's slice of the batch gets the same stand-ins as the whole batch
  np.testing.assert_array_equal(source.batch_skipping_nonfinite(0, 512, 256, 512)[0], rows[256:])

  summary = run.train_and_evaluate(c, str(tmp_path / "whole"))
  assert np.isfinite(summary["final"]["loss"])
  lines = [json.loads(l) for l in open(tmp_path / "whole" / "metrics.jsonl")]
  expected = [sum(int((~np.isfinite(x[source.batch_indices(s, 64)]).all(axis=1)).sum())
                  for s in range(a, b)) for a, b in ((0, 4), (4, 8), (8, 12))]
  assert [l["nonfinite_rows"] for l in lines] == expected and sum(expected) > 0

  real_batch = data.ActivationSource.batch_skipping_nonfinite

  def dies_at_step_7(self, step, *a, **k):
    if step == 7:
      raise KeyboardInterrupt("simulated kill")
    return real_batch(self, step, *a, **k)

  monkeypatch.setattr(data.ActivationSource, "batch_skipping_nonfinite", dies_at_step_7)
  with pytest.raises(KeyboardInterrupt):
    run.train_and_evaluate(c, str(tmp_path / "resumed"))
  monkeypatch.setattr(data.ActivationSource, "batch_skipping_nonfinite", real_batch)
  run.train_and_evaluate(c, str(tmp_path / "resumed"))
  _assert_same_state(_restore(tmp_path / "resumed", c=c), _restore(tmp_path / "whole", c=c))
  again = [json.loads(l) for l in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert [l["nonfinite_rows"] for l in again] == expected


@pytest.mark.parametrize("dtype", ["int32", "float64", "uint8"])
def test_store_of_another_dtype_is_refused_before_compiling(tmp_path, dtype):
  c = tiny(**{"data.source": "npy", "data.path": _npy_store(tmp_path, _acts().astype(dtype))})
  with pytest.raises(ValueError, match=rf"shard_00000\.npy holds {dtype}; only \('float32', "
                                       r"'float16', 'bfloat16'\)"):
    run.train_and_evaluate(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_stores_are_read(tmp_path, dtype):
  x = _acts().astype(dtype)
  source = data.open_npy(_npy_store(tmp_path, x))
  assert isinstance(source.arrays[0], np.memmap)
  expected = x[source.batch_indices(0, 8)].astype(np.float32)
  np.testing.assert_array_equal(source.batch(0, 8), expected)


def test_empty_or_foreign_store_is_refused_before_compiling(tmp_path):
  c = tiny(**{"data.source": "npy", "data.path": _npy_store(tmp_path, np.zeros((0, 16), "f4"))})
  with pytest.raises(ValueError, match="holds 0 rows"):
    run.train_and_evaluate(c, str(tmp_path / "run"))
  # activations of another model or site: another width
  c.data.path = _npy_store(tmp_path, _acts(d=24), name="shard_00000.npy")
  with pytest.raises(ValueError, match="width 24, but data.d_in=16"):
    run.train_and_evaluate(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------- bad configs

def _numeric_keys():
  flat = dict(validate._flat_items(base.get_config()))
  return [k for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


@pytest.mark.parametrize("key", _numeric_keys())
def test_every_numeric_key_is_range_checked(key):
  """A key is checked under the data.source that uses it (harvest keys under "harvest", ...)."""
  messages = []
  for source in validate.DATA_SOURCES:
    c = tiny(**{"data.source": source})
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = float("nan") if isinstance(node[leaf], float) else -2  # wrong for every key
    try:
      validate.check_config(c)
    except ValueError as e:
      messages.append(str(e))
  assert any(f"{key} must be" in m for m in messages), messages


@pytest.mark.parametrize("key,value,message", [
    ("optim.learning_rate", float("inf"), "optim.learning_rate must be finite and > 0, got inf"),
    ("train.dead_window_tokens", 2**31, r"train.dead_window_tokens must be in \[1, 2\*\*30\]"),
    ("seed", 2**32, r"seed must be in \[0, 2\*\*32\)"),
    ("optim.b2", 1.0, r"optim.b2 must be in \[0, 1\), got 1.0"),
])
def test_out_of_range_values_name_the_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    validate.check_config(tiny(**{key: value}))


def test_unlocked_config_with_unknown_or_mistyped_keys_fails_naming_them(tmp_path):
  d = tiny().to_dict()
  d["train"]["num_step"] = 100  # misspelled
  d["extra"] = {"x": 1}
  d["train"]["batch_size"] = 64.0
  with pytest.raises(ValueError) as e:
    run.train_and_evaluate(ml_collections.ConfigDict(d), str(tmp_path))  # unlocked
  assert "unknown key train.num_step (did you mean train.num_steps?)" in str(e.value)
  assert "unknown key extra.x" in str(e.value)
  assert "train.batch_size must be of type int, got 64.0" in str(e.value)
  del d["train"]["batch_size"]
  with pytest.raises(ValueError, match="missing key train.batch_size"):
    run.train_and_evaluate(ml_collections.ConfigDict(d), str(tmp_path))
  assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- workdir and export

def _snapshot(workdir):
  return {os.path.relpath(p, workdir): open(p, "rb").read()
          for p in glob.glob(f"{workdir}/**", recursive=True) if os.path.isfile(p)}


def test_finished_run_of_another_config_is_kept_unless_overwrite(tmp_path, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  before = _snapshot(tmp_path)
  other = tiny(**{"sae.sparsity_coefficient": 0.5})
  with pytest.raises(ValueError, match=r"sae.sparsity_coefficient: 0.02 -> 0.5.*"
                                       r"--config.train.overwrite=True"):
    run.train_and_evaluate(other, str(tmp_path))
  with pytest.raises(ValueError, match=r"checkpoint at step 12, past train.num_steps=8"):
    run.train_and_evaluate(tiny(**{"train.num_steps": 8}), str(tmp_path))
  assert _snapshot(tmp_path) == before  # nothing written, nothing lost

  # train.overwrite=True on the same config resumes (a preempted run reruns its command) ...
  same = tiny(**{"train.overwrite": True})
  run.train_and_evaluate(same, str(tmp_path))
  after = _snapshot(tmp_path)
  assert {k: v for k, v in after.items() if k.startswith("checkpoints/")} == {
      k: v for k, v in before.items() if k.startswith("checkpoints/")}
  # ... and replaces a run of another config
  other.train.overwrite = True
  other.train.num_steps = 5
  run.train_and_evaluate(other, str(tmp_path))
  assert _steps(tmp_path) == [5]
  assert json.load(open(tmp_path / "config.json"))["sae"]["sparsity_coefficient"] == 0.5
  assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [4, 5]


def test_workdir_with_foreign_or_unreadable_run_is_refused(tmp_path):
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  with pytest.raises(ValueError, match="holds a run without a config.json"):
    run.train_and_evaluate(tiny(), str(tmp_path))
  (tmp_path / "config.json").write_text('{"seed": 0, "da')  # torn by an older, non-atomic write
  with pytest.raises(ValueError, match="config.json cannot be read"):
    run.train_and_evaluate(tiny(), str(tmp_path))


def test_json_and_npz_writes_are_atomic(tmp_path, monkeypatch, reference):
  path = str(tmp_path / "summary.json")
  files.save_json(path, {"a": 1})

  def dies_halfway(obj, fh, **kw):
    fh.write('{"a": ')
    raise OSError("No space left on device")

  monkeypatch.setattr(export.json, "dump", dies_halfway)
  with pytest.raises(OSError):
    files.save_json(path, {"a": 2})
  assert json.load(open(path)) == {"a": 1}
  monkeypatch.undo()

  npz = str(tmp_path / "params.npz")
  files.save_npz(npz, {"w": np.ones(3)})

  def savez_dies_halfway(path, **arrays):
    with open(path, "wb") as fh:
      fh.write(b"PK\x03")
    raise OSError("No space left on device")

  monkeypatch.setattr(export.np, "savez", savez_dies_halfway)
  with pytest.raises(OSError):
    files.save_npz(npz, {"w": np.zeros(3)})
  np.testing.assert_array_equal(np.load(npz)["w"], np.ones(3))
  assert sorted(os.listdir(tmp_path)) == ["params.npz", "summary.json"]  # the parts are removed
  # a finished run leaves no temporary files behind
  assert not [p for p in glob.glob(f"{reference}/**", recursive=True) if ".tmp" in p]


def _guarded(fn) -> int:
  """fn() run as an entry point's main: its exit status (the message goes to stderr)."""
  with pytest.raises(SystemExit) as e:
    cli.guard(lambda argv: fn())(["train.py"])
  return e.value.code


def test_full_disk_during_export_is_one_paragraph_and_keeps_the_previous_files(
    tmp_path, monkeypatch, capsys, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  before = _snapshot(tmp_path)

  def disk_full(path, **arrays):
    with open(path, "wb") as fh:
      fh.write(b"PK\x03")
    raise OSError(errno.ENOSPC, "No space left on device", path)

  monkeypatch.setattr(export.np, "savez", disk_full)
  # a finished run rerun: it resumes at its last checkpoint and exports again
  assert _guarded(lambda: run.train_and_evaluate(tiny(), str(tmp_path))) == cli.EXIT_FAILED
  err = capsys.readouterr().err
  assert len(err.splitlines()) < 10 and "Traceback" not in err, err
  assert "the disk is full: No space left on device writing " + str(tmp_path / "export") in err
  assert "rerun the same command" in err and "--traceback" in err
  after = _snapshot(tmp_path)
  assert {k: after.get(k) for k in before} == before  # every file it had is still whole


def test_failed_checkpoint_save_stops_training_at_once(tmp_path, monkeypatch, capsys, reference):
  """The disk fills while step 10 is saved, in orbax's background thread: training stops at the
  next step boundary with the reason (not 5 steps later, when the next save waits on it), step
  5 is intact, and the rerun resumes from it and ends bit-identical."""
  from orbax.checkpoint._src.path import async_path  # orbax's last act in a commit (0.12)
  real_rename, real_batch, real_manager = async_path.rename, data.ActivationSource.batch, \
      checkpoint.manager
  managers, read = [], []

  async def disk_full(src, dst, *a, **k):
    if os.path.basename(str(dst)) == "10":
      raise OSError(errno.ENOSPC, "No space left on device", str(src))
    return await real_rename(src, dst, *a, **k)

  def batch(self, step, *a, **k):
    read.append(step)
    if step == 11:  # let the failure happen, however slow the machine
      for _ in range(3000):
        if not managers[0].is_saving_in_progress():
          break
        time.sleep(0.01)
    return real_batch(self, step, *a, **k)

  monkeypatch.setattr(async_path, "rename", disk_full)
  monkeypatch.setattr(data.ActivationSource, "batch", batch)
  monkeypatch.setattr(checkpoint, "manager", lambda *a: managers.append(real_manager(*a)) or
                      managers[-1])
  c = tiny(**{"train.num_steps": 20, "train.prefetch": 0})
  assert _guarded(lambda: run.train_and_evaluate(c, str(tmp_path))) == cli.EXIT_FAILED
  err = capsys.readouterr().err
  assert max(s for s in read if s < 20) <= 12, read  # the next save (15) would read up to 14
  assert len(err.splitlines()) < 10 and "Traceback" not in err, err
  assert "the disk is full" in err and f"while saving a checkpoint into {tmp_path}" in err
  assert _steps(tmp_path) == [5]

  monkeypatch.undo()
  run.train_and_evaluate(tiny(), str(tmp_path))  # resumes from step 5
  _assert_same_state(_restore(tmp_path, 12), _restore(reference, 12))
