"""Evaluates an SAE with it spliced into the LM: delta LM loss, loss recovered, KL, L0, FVU, ...

  python experiments/evaluate.py --workdir=DIR                 # a finished run (DIR/config.json)
  python experiments/evaluate.py --workdir=DIR --params=SAE --config=configs/smollm2_135m.py
  python experiments/evaluate.py --workdir=DIR --config.eval.num_contexts=64  # other eval keys
SAE is a Gemma Scope params.npz, one of our exports or a SAELens folder (jumprelu, standard,
gated or topk; ours or released ones); it must act on the config's lm.site. Writes DIR/eval.json
(with per-feature firing frequencies) and prints a table. For a sweep's DIR, every member is
evaluated (sharing the clean LM runs) into DIR/members/NAME/eval.json.
"""
import os
import sys

# Run from a checkout, use that checkout (not whichever copy pip installed in editable mode).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from jumprelu import cli, evaluate


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
    return ml_collections.ConfigDict(json.load(fh))


def define_config_flag(argv: list[str], flag_values=flags.FLAGS):
  """--config: the run's saved config (overridable key by key) or else a config file."""
  saved = saved_config(argv)
  if saved is None:
    return config_flags.DEFINE_config_file(
        "config", None, "Config file; default: the run's DIR/config.json.",
        flag_values=flag_values, lock_config=True, sys_argv=argv)
  return config_flags.DEFINE_config_dict(
      "config", saved, "The run's DIR/config.json; override keys with --config.KEY=VALUE.",
      flag_values=flag_values, lock_config=True, sys_argv=argv)


_CONFIG = define_config_flag(sys.argv)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; eval.json is written there.")
_PARAMS = flags.DEFINE_string("params", None, "params.npz or SAELens folder; default: "
                              "DIR/export/params.npz.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  c = _CONFIG.value
  if c is None:  # define_config_flag found no DIR/config.json
    raise app.UsageError(f"{os.path.join(_WORKDIR.value, 'config.json')} does not exist: give "
                         "--config=configs/X.py")
  if _PARAMS.value is None:
    evaluate.evaluate_workdir(c, _WORKDIR.value)
  else:
    evaluate.evaluate_sae(c, _WORKDIR.value, _PARAMS.value)


if __name__ == "__main__":
  cli.run(main)
