"""Sparse-probing accuracy against k, one line per SAE, its dense probe dashed in the same colour.

  python scripts/plot_probing.py --runs runs/smollm2 runs/relu --out figures/probing.png

Reads each run's eval.json (scripts/report.py's load_records): the keys
sparse_probing_<task>_k<k> and sparse_probing_<task>_dense written by jumprelu/downstream.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scripts import report  # noqa: E402

KS = (1, 2, 5, 20)


def probing_figure(records, task: str = "mean"):
  """The Figure: accuracy vs k (log axis) per SAE that has task's scores."""
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for i, r in enumerate(r for r in records if r.get(f"sparse_probing_{task}_k1") is not None):
    color = f"C{i}"
    label = f"{r['arch']} {r.get('member') or os.path.basename(r['dir'])} (L0 {r['l0']:.3g})"
    ax.plot(KS, [r[f"sparse_probing_{task}_k{k}"] for k in KS], "o-", color=color, label=label)
    dense = r.get(f"sparse_probing_{task}_dense")
    if dense is not None:
      ax.axhline(dense, color=color, ls="--", lw=1)
  ax.set_xscale("log")
  ax.set_xticks(KS, [str(k) for k in KS])
  ax.set_xlabel("k (SAE features in the probe)")
  ax.set_ylabel(f"held-out accuracy ({task})")
  ax.set_title("k-sparse probes on SAE features; dashed: dense probe on the activations",
               fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--runs", nargs="+", required=True)
  p.add_argument("--task", default="mean", help="a task name, or mean (over the tasks)")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  fig = probing_figure(report.load_records(args.runs), args.task)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=130)
  return fig


if __name__ == "__main__":
  main()
