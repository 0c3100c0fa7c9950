"""Trains an SAE: python experiments/train.py --config=configs/X.py --workdir=DIR.

JumpReLU by default (--config.sae.arch=relu|gated|topk for the baselines); non-empty sweep.*
tuples train the grid as one vmapped ensemble into DIR/members/NAME/. Override any key with
--config.section.key=value; --show_config prints every key with its value and meaning and exits.
"""
import os
import sys

# Run from a checkout, use that checkout (not whichever copy pip installed in editable mode).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging
from ml_collections import config_flags

from configs import base
from jumprelu import cli, harvest, memory, run, validate
from jumprelu import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, export.")
_SHOW_CONFIG = flags.DEFINE_bool("show_config", False,
                                 "Print the resolved config, each key with its comment, and exit.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Build the LM (from lm.model_path's config.json) and the SAE train step "
    "abstractly, print parameters and per-device memory (and a harvest's store size on disk), "
    "and exit: no weights are read.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  if _SHOW_CONFIG.value:
    print(validate.describe_config(_CONFIG.value, base))
    return
  if _DRY_RUN.value:
    print(memory.dry_run(_CONFIG.value))
    if _CONFIG.value.data.source == "harvest":
      print(harvest.size_report(_CONFIG.value))
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: the run directory (checkpoints, metrics, "
                         "export)")
  cli.init_distributed()
  try:
    summary = run.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except workdir_lib.Preempted as e:  # a checkpoint is saved; schedulers may requeue on this
    logging.warning("%s (exit status %d)", e, workdir_lib.EXIT_PREEMPTED)
    sys.exit(workdir_lib.EXIT_PREEMPTED)
  logging.info("%s", run.report(_CONFIG.value, _WORKDIR.value, summary))


if __name__ == "__main__":
  cli.run(main)
