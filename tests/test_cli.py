"""The entry points' errors, in-process: one short paragraph naming the key or path, an exit
status, and the traceback only when asked. (test_train.py runs the real CLI once.)"""
import errno
import os
import re

import pytest
from absl import app, flags
from ml_collections import config_flags

from jumprelu import cli, memory, run, validate
from tests.conftest import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(REPO, "configs", "synthetic.py")


def _parse(capsys, *argv):
  """cli.parse_flags on train.py's flags (a fresh FlagValues): (exit status, stderr)."""
  argv = ["train.py", *argv, "--workdir=/tmp/unused"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)  # where it looks for --config.KEY overrides
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  flags.DEFINE_bool("traceback", False, "", flag_values=fv)
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(argv, fv)
  return e.value.code, capsys.readouterr().err


def _assert_short(err, *wanted):
  assert len(err.splitlines()) < 10 and "Traceback" not in err, err
  assert "rerun with --traceback" in err, err
  for w in wanted:
    assert w in err, err


@pytest.mark.parametrize("args,wanted", [
    (["--config.sae.widht=3"], ["--config.sae.widht", "no config key sae.widht",
                                "did you mean sae.width?", "configs/base.py"]),
    (["--config.sea.width=3"], ["no config key sea.width", "did you mean sae.width?"]),
    (["--config.sae.width=abc"], ["--config.sae.width=abc", "sae.width takes an int", "'abc'"]),
    (["--config.sae.threshold_init=x"], ["sae.threshold_init takes a float"]),
])
def test_bad_config_flag_is_one_short_paragraph_naming_the_key(capsys, args, wanted):
  """Rejected by the locked config while absl parses the flags, before main runs."""
  status, err = _parse(capsys, f"--config={SYNTHETIC}", *args)
  assert status == cli.EXIT_USAGE
  _assert_short(err, *wanted)


def test_missing_config_file_and_unknown_flag_are_usage_errors(capsys):
  status, err = _parse(capsys, "--config=configs/nope.py", "--config.train.num_steps=5")
  assert status == cli.EXIT_USAGE
  _assert_short(err, "--config=configs/nope.py cannot be loaded", "No such file or directory",
                "--config=configs/synthetic.py")
  status, err = _parse(capsys, f"--config={SYNTHETIC}", "--workdr=x")
  assert status == cli.EXIT_USAGE
  _assert_short(err, "Unknown command line flag 'workdr'", "workdir", "--helpshort")


def test_traceback_only_when_asked(capsys):
  status, err = _parse(capsys, f"--config={SYNTHETIC}", "--config.sae.widht=3", "--traceback")
  assert status == cli.EXIT_USAGE and "Traceback" in err
  assert err.strip().splitlines()[-1].startswith("train.py: --config.sae.widht: there is no")
  try:
    validate.check_config(tiny(**{"sae.width": 0}))
  except ValueError as e:
    assert cli.report(e, show_traceback=True) == cli.EXIT_USAGE
  err = capsys.readouterr().err
  assert "Traceback" in err and "validate.py" in err and "rerun with --traceback" not in err


def _guarded(capsys, fn):
  """cli.guard(fn) run as an entry point's main: (exit status, stderr)."""
  with pytest.raises(SystemExit) as e:
    cli.guard(lambda argv: fn())(["train.py"])
  return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("overrides,wanted", [
    ({"sae.width": 0}, ["sae.width must be > 0, got 0", "--config.KEY=VALUE"]),
    ({"sae.width": 0, "optim.b2": 1.0}, ["sae.width must be > 0", "optim.b2 must be in [0, 1)"]),
])
def test_out_of_range_config_is_one_short_paragraph(tmp_path, capsys, overrides, wanted):
  status, err = _guarded(capsys, lambda: run.train_and_evaluate(tiny(**overrides), str(tmp_path)))
  assert status == cli.EXIT_USAGE
  _assert_short(err, "invalid config:", *wanted)


def test_dry_run_checks_the_config_first(capsys):
  """A zero sae.width once reached JAX as a TypeError from tracing."""
  status, err = _guarded(capsys, lambda: memory.dry_run(tiny(**{"sae.width": 0})))
  assert status == cli.EXIT_USAGE
  _assert_short(err, "sae.width must be > 0, got 0")


def test_usage_errors_bad_data_and_bugs(capsys):
  def usage():
    raise app.UsageError("--workdir is required")
  assert _guarded(capsys, usage)[0] == cli.EXIT_USAGE
  def bad_data():
    raise FloatingPointError("non-finite loss (loss = inf) at step 0; lower optim.learning_rate")
  status, err = _guarded(capsys, bad_data)
  assert status == cli.EXIT_FAILED
  _assert_short(err, "non-finite loss (loss = inf) at step 0")
  def bug():
    raise TypeError("unsupported operand")
  with pytest.raises(TypeError):  # not the user's to fix: the traceback, as ever
    cli.guard(lambda argv: bug())(["train.py"])
  with pytest.raises(KeyError):
    cli.guard(lambda argv: {}["x"])(["train.py"])


def test_unwritable_workdir_is_one_paragraph(tmp_path, capsys, monkeypatch):
  """A --workdir under a regular file (tests run as root, where a chmod blocks nothing), and
  one where creating a directory is refused."""
  (tmp_path / "file").write_text("")
  workdir = tmp_path / "file" / "run"
  status, err = _guarded(capsys, lambda: run.train_and_evaluate(tiny(), str(workdir)))
  assert status == cli.EXIT_FAILED
  _assert_short(err, f"cannot create {workdir}", "Not a directory", "--workdir")

  real_makedirs = os.makedirs

  def refused(path, *a, **k):
    if str(path).startswith(str(tmp_path / "ro")):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real_makedirs(path, *a, **k)

  monkeypatch.setattr(os, "makedirs", refused)
  status, err = _guarded(capsys, lambda: run.train_and_evaluate(tiny(), str(tmp_path / "ro")))
  assert status == cli.EXIT_FAILED
  _assert_short(err, f"permission denied on {tmp_path / 'ro'}", "--workdir")


def test_full_disk_and_ctrl_c_messages():
  """(The full disk itself is simulated mid-export and mid-checkpoint in test_reliability.py.)"""
  e = OSError(errno.ENOSPC, "No space left on device", "/w/export/params.npz.tmp.npz")
  text, status = cli.explain(e)
  assert status == cli.EXIT_FAILED
  assert text.startswith("the disk is full: No space left on device writing /w/export/params.npz")
  assert "rerun the same command" in text
  # tensorstore's error from inside an orbax save, raised from another one
  try:
    try:
      raise ValueError("RESOURCE_EXHAUSTED: Failed to write 184 bytes to file 7: No space left "
                       "on device [os_error_code='28']")
    except ValueError:
      raise RuntimeError("Save Finalize thread failed")
  except RuntimeError as wrapped:
    assert cli.explain(wrapped)[0].startswith("the disk is full")
  text, status = cli.explain(KeyboardInterrupt())
  assert status == cli.EXIT_INTERRUPTED and "stopped without saving" in text


def test_every_entry_point_runs_main_through_cli():
  for name in ("train", "harvest", "evaluate"):
    source = open(os.path.join(REPO, "experiments", f"{name}.py")).read()
    assert re.search(r'if __name__ == "__main__":\n  cli\.run\(main\)\n$', source), name


def test_device_out_of_memory_points_at_dry_run():
  import jax.numpy as jnp
  with pytest.raises(RuntimeError) as e:
    jnp.zeros((2**42,), jnp.float32).block_until_ready()  # 16 TiB: a real XLA allocation failure
  text, status = cli.explain(e.value)
  assert status == cli.EXIT_FAILED and text.startswith("a device ran out of memory")
  assert "--dry_run" in text and "train.batch_size" in text


def test_multi_host_flags_without_distributed_are_a_usage_error():
  fv = flags.FlagValues()
  cli.define_distributed_flags(fv)
  fv(["train.py", "--num_processes=2", "--process_id=1"])
  with pytest.raises(app.UsageError, match="--num_processes, --process_id given without "
                                           "--distributed"):
    cli.init_distributed(fv)
