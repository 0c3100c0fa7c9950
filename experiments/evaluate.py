"""Evaluates an SAE with it spliced into the LM: delta LM loss, loss recovered, KL, L0, FVU, ...

  python experiments/evaluate.py --workdir=DIR                 # a finished run (DIR/config.json)
  python experiments/evaluate.py --workdir=DIR --params=SAE --config=configs/smollm2_135m.py
  python experiments/evaluate.py --workdir=DIR --config.eval.num_contexts=64  # other eval keys
  python experiments/evaluate.py --workdir=DIR --downstream=absorption,sparse_probing
SAE is a Gemma Scope params.npz, one of our exports or a SAELens folder (jumprelu, standard,
gated or topk; ours or released ones); it must act on the config's lm.site. Writes DIR/eval.json
(with per-feature firing frequencies) and prints a table. For a sweep's DIR, every member is
evaluated (sharing the clean LM runs) into DIR/members/NAME/eval.json.
"""
import os
import sys

# Run from a checkout, use that checkout (not whichever copy pip installed in editable mode).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

from jumprelu import cli, downstream, evaluate


_CONFIG = cli.define_config_flag(sys.argv)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; eval.json is written there.")
_PARAMS = flags.DEFINE_string("params", None, "params.npz or SAELens folder; default: "
                              "DIR/export/params.npz.")
_DOWNSTREAM = flags.DEFINE_list(
    "downstream", [], f"Also run these downstream evaluations into eval.json: any of "
    f"{','.join(downstream.TASKS)} (SAEBench's definitions; jumprelu/downstream.py; ~3.5 min per "
    "SAE of the default job on 2 CPU cores).")
cli.define_distributed_flags()
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  c = _CONFIG.value
  if c is None:  # define_config_flag found no DIR/config.json
    raise app.UsageError(f"{os.path.join(_WORKDIR.value, 'config.json')} does not exist: give "
                         "--config=configs/X.py")
  unknown = sorted(set(_DOWNSTREAM.value) - set(downstream.TASKS))
  if unknown:  # before any compute
    raise app.UsageError(f"--downstream takes {','.join(downstream.TASKS)}; got {unknown}")
  cli.init_distributed()
  if _PARAMS.value is None:
    evaluate.evaluate_workdir(c, _WORKDIR.value)
    runs = evaluate.runs_of(c, _WORKDIR.value)
  else:
    evaluate.evaluate_sae(c, _WORKDIR.value, _PARAMS.value)
    runs = [(c, _WORKDIR.value)]
  for rc, rdir in runs if _DOWNSTREAM.value else ():
    scalars = downstream.add_to_eval_json(rc, rdir, _PARAMS.value, tasks=_DOWNSTREAM.value)
    logging.info("downstream evaluations of %s (into eval.json):\n%s", rdir, "\n".join(
        f"  {k:<40} {v:.4f}" for k, v in scalars.items()))


if __name__ == "__main__":
  cli.run(main)
