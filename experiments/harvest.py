"""Harvests LM activations to an .npy store: python experiments/harvest.py --config=... --workdir=DIR.

Writes DIR/activations (or data.path, which may be a bucket URL such as gs://B/store):
shard_NNNNN.npy files and manifest.json. Rerunning resumes an interrupted harvest and repairs a
damaged one; `train.py` with the same config and workdir then trains on the store. A multi-host
job runs it on every host with train.py's flags (--distributed, ...): each process harvests its
share of the contexts (jumprelu/harvest.py says which) into the same store, the one a single
process would write. --dry_run prints the store's size on disk and exits.
"""
import os
import sys

# Run from a checkout, use that checkout (not whichever copy pip installed in editable mode).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging
from ml_collections import config_flags

from jumprelu import cli, harvest, validate
from jumprelu import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; the store goes in DIR/activations.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the store's size on disk (rows × width × "
                             "dtype, and its shards) and exit, before any compute.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  c = _CONFIG.value
  validate.check_config(c)
  if c.data.source != "harvest":
    raise app.UsageError(f"data.source must be 'harvest' to harvest, got {c.data.source!r}")
  if _DRY_RUN.value:
    print(harvest.size_report(c))
    return
  if not _WORKDIR.value and not c.data.path:
    raise app.UsageError("--workdir is required (the store goes in DIR/activations), or give "
                         "--config.data.path=STORE")
  cli.init_distributed()
  manifest = harvest.harvest(c, workdir_lib.store_path(c, _WORKDIR.value))
  logging.info("%d tokens of %s at %s", manifest["tokens"], manifest["spec"]["model"],
               manifest["spec"]["site"])


if __name__ == "__main__":
  cli.run(main)
