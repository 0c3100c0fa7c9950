"""Compiles every program a config runs for a TPU topology, on this machine (no TPU needed):

  python scripts/aot_tpu.py --config=configs/gemma9b_l20.py --topology=v5e:2x4 \\
      --config.lm.model_path=tests/data/gemma2_9b [--sweep=4] [--live] [--config.KEY=VALUE]

Needs libtpu (pip install "libtpu==0.0.42.*"). lm.model_path may be a directory holding only a
config.json: no weights are read. Prints one row per program (harvest forward, train step,
sweep, live step, evaluation; see jumprelu/aot.py) with XLA's per-device memory and cost-model
time beside the ideal time, then `max_device_GiB=X hbm_GiB=Y fits=True|False`. These are
compiler predictions (XLA's memory analysis and cost model), not measurements.

--probe_sparse_s=S also compiles the sparse train step in a subprocess killed after S seconds,
and says whether it compiled and how its cost-model time compares with the dense step's.
"""
import json
import os
import subprocess
import sys
import tempfile

# Run from a checkout, use that checkout (not whichever copy pip installed in editable mode).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing; libtpu only compiles

from absl import flags
from ml_collections import config_flags

from jumprelu import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x4, v4:2x2x1, "
                                "v5p:2x2x2, v6e:2x4, v5e:16x16 (a 256-chip pod).")
_SWEEP = flags.DEFINE_integer("sweep", 0, "Also compile a sweep (ensemble) of this many SAEs "
                              "when the config has no sweep axes (0: only the config's own).")
_LIVE = flags.DEFINE_bool("live", None, "Compile the live step (LM forward + SAE step in one "
                          "program); default: when data.source=live.")
_PROGRAMS = flags.DEFINE_list("programs", [], "Only these programs (harvest, train, sweep, "
                              "live, eval_clean, eval_sae); default: all.")
_PROBE = flags.DEFINE_integer("probe_sparse_s", 0, "Also try compiling the sparse train step "
                              "in a subprocess for at most this many seconds (0: no probe).")
_JSON = flags.DEFINE_string("json", None, "Also write the rows (bytes, FLOPs, seconds) to this "
                            "JSON file.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  del argv
  from jumprelu import aot  # imports jax
  c = _CONFIG.value
  print("compiler predictions (XLA cost model / memory analysis), not measurements")
  printed = []

  def log(line):  # the topology first, then each program's row as soon as it compiled
    print(line if printed else line + "\n" + aot.HEADER, flush=True)
    printed.append(line)

  rows = aot.compile_all(c, _TOPOLOGY.value, _SWEEP.value, _LIVE.value, _PROGRAMS.value or None,
                         log=log)
  if _PROBE.value:
    print(_probe_sparse(_PROBE.value, rows))
  if _JSON.value:
    with open(_JSON.value, "w") as fh:
      json.dump(rows, fh, indent=1)
  print(aot.summary(rows))


def _probe_sparse(seconds: int, rows) -> str:
  """Compiles the train step with train.step_impl=sparse in a subprocess under a time limit and
  compares its cost-model time with the dense step's."""
  args = [a for a in sys.argv if not a.startswith(("--probe_sparse_s", "--programs", "--sweep",
                                                    "--live", "--json", "--config.train.step_impl"))]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "rows.json")
    cmd = [sys.executable, *args, "--programs=train", "--config.train.step_impl=sparse",
           f"--json={out}"]
    try:
      run = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
      return (f"sparse step: not compiled within {seconds} s; train.step_impl=auto runs the "
              "dense step on TPU")
    if run.returncode or not os.path.exists(out):
      return f"sparse step: failed to compile: {run.stderr.strip().splitlines()[-1:]}"
    with open(out) as fh:
      sparse = json.load(fh)[0]
  dense = next(r for r in rows if r["program"] == "train")
  faster = 0 < sparse["cost_model_s"] < dense["cost_model_s"]
  return (f"sparse step: compiled in {sparse['compile_s']:.0f} s, {sparse['total'] / 2**30:.3f} "
          f"GiB per device, cost model {sparse['cost_model_s'] * 1e3:.3g} ms against the dense "
          f"step's {dense['cost_model_s'] * 1e3:.3g} ms: "
          + ("sparse is faster here" if faster else "dense is faster (or the model is unsure)"))


if __name__ == "__main__":
  cli.run(main)
