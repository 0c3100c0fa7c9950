"""Per-device memory of a config's train step on a mesh, before launching.

  python scripts/memory.py --config=configs/gemma9b_l20.py --devices=8 [--config.sae.width=1048576]

--devices fakes that many CPU devices, so a pod's layout can be checked from a laptop.
"""
import os
import sys

# Run from a checkout, use that checkout (not whichever copy pip installed in editable mode).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 0, "Fake this many CPU devices (0: use the real ones).")


def main(argv):
  del argv
  from jumprelu import memory  # imports jax: after XLA_FLAGS is set below
  r = memory.report(_CONFIG.value)
  c = _CONFIG.value
  print(f"B={c.train.batch_size} D={c.data.d_in} F={c.sae.width}, per device:")
  print(memory.table(r))


if __name__ == "__main__":
  for arg in sys.argv:  # the fake device count must be set before jax is imported
    if arg.startswith("--devices=") and int(arg.split("=")[1]) > 0:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={arg.split('=')[1]}")
      os.environ["JAX_PLATFORMS"] = "cpu"
  app.run(main)
