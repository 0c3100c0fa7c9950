"""Downstream evaluations of a finished run's SAE, no hub needed: first-letter absorption and
sparse probing (SAEBench's definitions; jumprelu/downstream.py).

  python scripts/downstream.py --workdir=DIR [--params=SAE] [--tasks=absorption,sparse_probing]

Reads DIR/config.json (LM, site, text) and DIR/export/params.npz (or --params); writes
DIR/downstream.json (the full results, and under "scalars" the numbers scripts/report.py
tabulates) and prints the probing table.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from jumprelu import downstream, files  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--params", default=None, help="default: DIR/export/params.npz")
  ap.add_argument("--tasks", default=",".join(downstream.TASKS))
  ap.add_argument("--num_contexts", type=int, default=128,
                  help="held-out contexts for the token-level probing tasks")
  args = ap.parse_args()
  with open(os.path.join(args.workdir, "config.json")) as fh:
    c = ml_collections.ConfigDict(json.load(fh))
  start = time.perf_counter()
  result = downstream.evaluate(c, args.workdir, args.params, tasks=args.tasks.split(","),
                               num_contexts=args.num_contexts)
  result["seconds"] = time.perf_counter() - start
  result["scalars"] = downstream.scalars(result)  # what scripts/report.py reads
  files.save_json(os.path.join(args.workdir, "downstream.json"), result)
  for key, value in result["scalars"].items():
    print(f"{key:<40} {value:.4f}")
  if "sparse_probing" in result:
    print(downstream.table(result["sparse_probing"]))
  print(f"{result['seconds']:.0f} s; {os.path.join(args.workdir, 'downstream.json')}")


if __name__ == "__main__":
  main()
