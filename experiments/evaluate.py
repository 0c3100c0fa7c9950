"""Evaluates an SAE with it spliced into the LM: delta LM loss, loss recovered, KL, L0, FVU, ...

  python experiments/evaluate.py --workdir=DIR                 # a finished run (DIR/config.json)
  python experiments/evaluate.py --workdir=DIR --params=SAE --config=configs/smollm2_135m.py
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

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file; default: the run's DIR/config.json.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; eval.json is written there.")
_PARAMS = flags.DEFINE_string("params", None, "params.npz or SAELens folder; default: "
                              "DIR/export/params.npz.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  c = _CONFIG.value
  if c is None:
    path = os.path.join(_WORKDIR.value, "config.json")
    if not os.path.exists(path):
      raise app.UsageError(f"{path} does not exist: give --config=configs/X.py")
    with open(path) as fh:
      c = ml_collections.ConfigDict(json.load(fh))
  if _PARAMS.value is None:
    evaluate.evaluate_workdir(c, _WORKDIR.value)
  else:
    evaluate.evaluate_sae(c, _WORKDIR.value, _PARAMS.value)


if __name__ == "__main__":
  cli.run(main)
