"""Trains a JumpReLU SAE: python experiments/train.py --config=configs/X.py --workdir=DIR."""
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jumprelu import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, export.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.info("JAX %s: process %d/%d, %d local devices of %d: %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("done: %s", summary)


if __name__ == "__main__":
  app.run(main)
