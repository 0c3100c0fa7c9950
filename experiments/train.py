"""Trains a JumpReLU SAE: python experiments/train.py --config=configs/X.py --workdir=DIR."""
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jumprelu import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, export.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("JUMPRELU_DISTRIBUTED") == "1",
    "Multi-host: call jax.distributed.initialize(). On TPU pods and SLURM the cluster supplies "
    "the details; elsewhere give the three flags below (also JUMPRELU_DISTRIBUTED=1).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info("JAX %s: process %d/%d, %d local devices of %d: %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("done: %s", summary)


if __name__ == "__main__":
  app.run(main)
