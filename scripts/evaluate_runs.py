"""Evaluates many finished runs with each SAE spliced into the LM, sharing the clean LM runs.

  python scripts/evaluate_runs.py --num_contexts 128 runs/repro/runs/*

Each path is a run directory (DIR/config.json; a sweep's members are each evaluated). SAEs at
one LM site are scored in groups of --group on the same held-out contexts (the runs' own eval.*
keys, eval.num_contexts set to --num_contexts), so the clean and zero-ablated LM runs are made
once per group instead of once per run: what experiments/evaluate.py does for one run, for a
whole reproduction. Each SAE's eval.json is written when its group finishes, and an SAE whose
eval.json already scores --num_contexts contexts is skipped, so a rerun resumes.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from jumprelu import evaluate  # noqa: E402
from jumprelu import workdir as workdir_lib  # noqa: E402


def pending(paths: list[str], num_contexts: int) -> list[tuple]:
  """[(config, SAE directory)] of every SAE under paths not yet scored on num_contexts contexts."""
  out = []
  for path in paths:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
      raise SystemExit(f"{path}: expected a run directory holding config.json; train it first")
    with open(config_path) as fh:
      c = workdir_lib.with_defaults(json.load(fh))
    c.eval.num_contexts = num_contexts
    for rc, rdir in evaluate.runs_of(c, path):
      if not os.path.exists(os.path.join(rdir, "export", "params.npz")):
        raise SystemExit(f"{rdir} has no export/params.npz: its training has not finished")
      done = os.path.join(rdir, "eval.json")
      if os.path.exists(done):
        with open(done) as fh:
          if len(json.load(fh).get("context_tokens", ())) == num_contexts:
            continue
      out.append((rc, rdir))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("runs", nargs="+")
  p.add_argument("--num_contexts", type=int, required=True)
  p.add_argument("--group", type=int, default=16, help="SAEs sharing one pass of clean runs")
  args = p.parse_args()
  if args.num_contexts < 1 or args.group < 1:
    raise SystemExit(f"--num_contexts and --group must be >= 1, got {args.num_contexts} and "
                     f"{args.group}")
  logging.set_verbosity(logging.WARNING)
  todo = pending(args.runs, args.num_contexts)
  by_site = {}
  for rc, rdir in todo:
    by_site.setdefault((rc.lm.site, rc.lm.model_path), []).append((rc, rdir))
  print(f"{len(todo)} SAEs to evaluate on {args.num_contexts} held-out contexts", flush=True)
  for runs in by_site.values():
    for start in range(0, len(runs), args.group):
      group = runs[start:start + args.group]
      t = time.time()
      results = evaluate.evaluate_runs(group)
      for (_, rdir), r in zip(group, results):
        print(f"{rdir}: L0 {r['l0']:.1f}, FVU {r['fvu']:.3f}, delta LM loss "
              f"{r['delta_lm_loss']:.4f} ({r['tokens']} tokens)", flush=True)
      print(f"group of {len(group)} in {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
  main()
