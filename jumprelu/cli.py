"""What the entry points share: flags parsed and errors told in one paragraph, not a traceback.

experiments/*.py call run(main) in place of absl's app.run(main). An error the user can act on
(a flag or config key, bad data, a run directory that cannot be written, a full disk) is printed
to stderr as one paragraph: what went wrong, the key or path, what to do; its traceback too only
with --traceback or --verbosity=1. Exit status 2 for the command line (a flag or config value),
1 for the rest, 130 for Ctrl-C outside training's own handling (train.py adds 75 for a run
stopped by a preemption notice or Ctrl-C after a checkpoint). Other exceptions are bugs and are
raised as usual, traceback and all.
"""
import difflib
import errno
import json
import os
import re
import sys
import traceback

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from configs import base
from jumprelu import workdir as workdir_lib

EXIT_FAILED = 1
EXIT_USAGE = 2  # fix the command line: a flag or a config value
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C

_TRACEBACK = flags.DEFINE_bool("traceback", False, "On an error, print its full traceback too "
                               "(so does --verbosity=1).")
_HINT = "(for the full traceback, rerun with --traceback)"
_KEYS_HINT = ("configs/base.py lists every config key with its meaning (train.py --show_config "
              "prints a config's values)")


def run(main) -> None:
  """absl's app.run(main), with flag and config errors and the project's own errors told in one
  paragraph and an exit status."""
  app.run(guard(main), flags_parser=parse_flags)


def guard(main):
  """main(argv), with an error the user can act on printed as one paragraph and exited on."""
  def guarded(argv):
    try:
      return main(argv)
    except (Exception, KeyboardInterrupt) as e:
      status = report(e, _wants_traceback())
      if status is None:
        raise
      sys.exit(status)
  return guarded


def report(e: BaseException, show_traceback: bool = False) -> int | None:
  """Prints e's paragraph to stderr and returns the exit status; None (printing nothing) for an
  exception that is not one the user can act on."""
  told = explain(e)
  if told is None:
    return None
  _tell(e, told[0], show_traceback)
  return told[1]


def _tell(e, text: str, show_traceback: bool, program: str | None = None) -> None:
  """The traceback if asked for, then the paragraph: the last thing on the screen."""
  if show_traceback:
    traceback.print_exception(e, file=sys.stderr)
  hint = "" if show_traceback else "\n" + _HINT
  sys.stderr.write(f"{os.path.basename(program or sys.argv[0])}: {text}{hint}\n")


def explain(e: BaseException) -> tuple[str, int] | None:
  """(one paragraph for the user, exit status) for an error they can act on, else None."""
  notes = "".join(f" ({n})" for n in getattr(e, "__notes__", ()))
  if isinstance(e, app.UsageError):
    return str(e) + notes, EXIT_USAGE
  if isinstance(e, KeyboardInterrupt):
    return ("interrupted (Ctrl-C): stopped without saving; rerunning the same command resumes "
            "from what is on disk (the last checkpoint, a harvest's finished shards)"), \
        EXIT_INTERRUPTED
  if full := _disk_full(e):
    where = f" writing {full.filename}" if getattr(full, "filename", None) else ""
    return (f"the disk is full: No space left on device{where}{notes}. What was written "
            "before is intact (a file is replaced only by a whole new one, a checkpoint counts "
            "only once complete). Free some space, or give a --workdir on another disk, and "
            "rerun the same command: it resumes from the last checkpoint"), EXIT_FAILED
  if isinstance(e, RuntimeError) and "RESOURCE_EXHAUSTED" in str(e):  # XLA's out of memory
    first = str(e).strip().splitlines()[0][:300]
    return (f"a device ran out of memory ({first}). `train.py --dry_run` with the same flags "
            "prints the memory each device needs; lower train.batch_size or sae.width, or split "
            "the dictionary over more devices (--config.mesh.model)"), EXIT_FAILED
  if isinstance(e, ValueError) and str(e).startswith("invalid config:"):  # validate.py's
    return f"{e}{notes}\nSet it with --config.KEY=VALUE; {_KEYS_HINT}", EXIT_USAGE
  if isinstance(e, OSError) and e.filename is not None:
    return _os_error(e) + notes, EXIT_FAILED
  # The library's own errors are sentences that say what to do; so are its KeyErrors (a bare
  # KeyError('x') is a bug).
  if isinstance(e, (ValueError, FloatingPointError, OSError)) or isinstance(e, KeyError) and (
      len(e.args) == 1 and isinstance(e.args[0], str) and " " in e.args[0]):
    return (e.args[0] if isinstance(e, KeyError) else str(e)) + notes, EXIT_FAILED
  return None


def _chain(e):
  """e and the exceptions it was raised from or while handling, newest first."""
  seen = []
  while e is not None and e not in seen:
    seen.append(e)
    e = e.__cause__ or e.__context__
  return seen


def _disk_full(e):
  """The exception in e's chain that says the disk is full (an OSError, or tensorstore's
  ValueError from an orbax save), or None."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno == errno.ENOSPC or "os_error_code='28'" in str(x):
      return x
  return None


def _os_error(e: OSError) -> str:
  path, why = e.filename, e.strerror or str(e)
  if e.errno in (errno.EACCES, errno.EPERM):
    return (f"permission denied on {path}: give a --workdir (and data paths) this user can "
            "write to, or change its permissions")
  if e.errno == errno.EROFS:
    return f"{path} is on a read-only file system: give a --workdir on a writable disk"
  if e.errno in (errno.ENOTDIR, errno.EEXIST):
    return (f"cannot create {path} ({why}): a part of that path is a file, not a directory; "
            "give a --workdir that is a directory, or a new path")
  if e.errno == errno.ENOENT:
    return (f"{path} does not exist: check the path given (--workdir, data.path, "
            "lm.model_path, --params)")
  return f"{path}: {why}"


# ----------------------------------------------------------------------------- flags

def saved_config(argv: list[str]) -> ml_collections.ConfigDict | None:
  """DIR/config.json of --workdir=DIR when argv gives no --config=FILE, read before the flags
  are parsed so that --config.KEY=VALUE can override its keys; else None."""
  workdir = None
  for i, arg in enumerate(argv[1:], 1):
    name, eq, value = arg.lstrip("-").partition("=")
    if not arg.startswith("-"):
      continue
    if name == "config":
      return None
    if name == "workdir":
      workdir = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
  path = os.path.join(workdir, "config.json") if workdir else None
  if path is None or not os.path.exists(path):
    return None
  with open(path) as fh:
    return workdir_lib.with_defaults(json.load(fh))


def define_config_flag(argv: list[str], flag_values=None):
  """--config: the run's saved config (overridable key by key) or else a config file."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  saved = saved_config(argv)
  if saved is None:
    return config_flags.DEFINE_config_file(
        "config", None, "Config file; default: the run's DIR/config.json.",
        flag_values=flag_values, lock_config=True, sys_argv=argv)
  return config_flags.DEFINE_config_dict(
      "config", saved, "The run's DIR/config.json; override keys with --config.KEY=VALUE.",
      flag_values=flag_values, lock_config=True, sys_argv=argv)


def define_distributed_flags(flag_values=None) -> None:
  """The multi-host flags train.py, harvest.py and evaluate.py share (read by init_distributed)."""
  fv = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_bool(
      "distributed", os.environ.get("JUMPRELU_DISTRIBUTED") == "1",
      "Multi-host: call jax.distributed.initialize(). On TPU pods and SLURM the cluster supplies "
      "the details; elsewhere give the three flags below (also JUMPRELU_DISTRIBUTED=1).",
      flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Processes in the job.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index.", flag_values=fv)


def init_distributed(flag_values=None) -> None:
  """jax.distributed.initialize() for --distributed (before any other JAX call), then logs
  where this process stands in the job."""
  fv = flags.FLAGS if flag_values is None else flag_values
  given = [f"--{k}" for k in ("coordinator_address", "num_processes", "process_id")
           if fv[k].value is not None]
  if given and not fv.distributed:
    raise app.UsageError(f"{', '.join(given)} given without --distributed: add --distributed "
                         "(or JUMPRELU_DISTRIBUTED=1) for a multi-host job, or drop them")
  if fv.distributed:
    jax.distributed.initialize(coordinator_address=fv.coordinator_address,
                               num_processes=fv.num_processes, process_id=fv.process_id)
  logging.info("JAX %s: process %d/%d, %d local devices of %d: %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)


def parse_flags(argv, flag_values=flags.FLAGS):
  """absl's flag parsing (for app.run), its errors told in one paragraph with exit status 2.

  The config is locked, so a misspelled config key fails here, before main runs; so does a
  config file that cannot be loaded (ml_collections itself would wait until it is first read)."""
  names = _config_flags(flag_values)
  try:
    rest = flag_values(argv)
    for name in names:
      getattr(flag_values[name].value, "keys", None)  # a config file that failed to load raises
  except (flags.Error, KeyError, AttributeError, OSError) as e:  # Key/AttributeError: no such key
    _usage_exit(argv, e, _flag_error(e, argv, names))
  return rest


def _usage_exit(argv, e, text):
  show = any(a in ("--traceback", "-traceback") or re.fullmatch(r"--?(v|verbosity)=[1-9]\d*", a)
             for a in argv)  # the flags themselves could not be parsed
  _tell(e, text, show, argv[0])
  sys.exit(EXIT_USAGE)


def _config_flags(flag_values) -> list[str]:
  """The names of the config-file flags (their overrides are --NAME.KEY=VALUE)."""
  return [name for name in flag_values  # only ml_collections' config flags have this property
          if hasattr(type(flag_values[name]), "config_filename")]


def _flag_error(e, argv, names) -> str:
  """What is wrong with the command line, naming the flag or config key."""
  leaves = workdir_lib.flat(base.get_config().to_dict())
  known = set(leaves) | {k.rsplit(".", i)[0] for k in leaves for i in range(k.count(".") + 1)}
  for name in names:
    if isinstance(e, OSError):  # ml_collections' error: the config file failed to load
      cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
      given = [a.split("=", 1)[1] for a in argv if re.match(rf"--?{name}=", a)]
      return (f"--{name}={given[-1] if given else ''} cannot be loaded ({cause}); give a config "
              f"file, such as --{name}=configs/synthetic.py")
    if m := re.match(rf"flag --{name}\.([\w.]+)=(.*?): ", str(e)):  # a value of the wrong type
      key, value = m.groups()
      want = leaves.get(key)
      kind = type(want).__name__ if want is not None else "value of another kind"
      return (f"--{name}.{key}={value}: {key} takes {'an' if kind[0] in 'aeiou' else 'a'} "
              f"{kind} (configs/base.py sets {want!r}); {value!r} is not one")
    for arg in argv[1:]:
      m = re.match(rf"--?{name}\.([\w.]+)(=|$)", arg)
      if m and m.group(1) not in known:
        key = m.group(1)
        close = difflib.get_close_matches(key, list(leaves), n=1)
        guess = f" (did you mean {close[0]}?)" if close else ""
        return f"--{name}.{key}: there is no config key {key}{guess}. {_KEYS_HINT}"
  return f"{e} (--helpshort lists the flags)"


def _wants_traceback() -> bool:
  return flags.FLAGS.is_parsed() and (_TRACEBACK.value or flags.FLAGS["verbosity"].value >= 1)
