"""Figures for evaluated SAEs: sparsity–fidelity Pareto curves, high-frequency features, firing
densities, ε sweeps and training curves (PNG, matplotlib Agg; no jax).

  python scripts/plots.py --runs runs/sweep_jumprelu runs/sweep_topk runs/one_relu --out plots/

Each --runs path is one SAE (a directory holding eval.json) or a sweep (members/<name>/eval.json).
Writes, per site:
  pareto_delta_lm_loss_<site>.png  delta LM loss vs L0 (log), one curve per arch
  pareto_fvu_<site>.png            FVU vs L0 (log), one curve per arch
  high_frequency_<site>.png        fraction of features firing on >10% / >1% of tokens vs delta LM
                                   loss (the JumpReLU paper's Figure 5)
  eps_sweep_<site>.png             delta LM loss and L0 vs ε (only if members named eps* exist)
  firing_density/<site>_<arch>_<member>.png  per SAE: histogram of log10 firing frequency
  training_curves_<site>_<run>.png  per --runs path: loss, L0, FVU, dead features and (JumpReLU)
                                   mean threshold vs step from metrics.jsonl, one line per member
Members whose name starts with "eps" (an ε sweep) are left off the Pareto curves, which vary λ
or k.
"""
import os
import sys

# Run from a checkout, use that checkout (not whichever copy pip installed in editable mode).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json
import re

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scripts import report  # noqa: E402

_LABEL = {"delta_lm_loss": "delta LM loss (nats)", "fvu": "FVU", "l0": "L0"}
# (metrics.jsonl key, panel title, log y): the training-curve panels, left to right.
_TRAIN_PANELS = (("loss", "loss", True), ("l0", "L0", True), ("fvu", "FVU", True),
                 ("dead", "dead features (train window)", False), ("threshold_mean", "mean threshold θ (raw units)", False))


def _name(s: str) -> str:
  """A file-name-safe version of a site, arch or member name."""
  return re.sub(r"[^\w.=+-]", "_", str(s))


def _unique(stem: str, used: set) -> str:
  """`stem`, or `stem_2`, `stem_3`... if an earlier figure took it."""
  name, i = stem, 2
  while name in used:
    name, i = f"{stem}_{i}", i + 1
  used.add(name)
  return name


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def _curve(ax, rs, x_key, y_key, label, scale=1.0):
  ax.plot([r[x_key] for r in rs], [r[y_key] * scale for r in rs], "o-", label=label, ms=4)


def plot_pareto(records, site: str, y_key: str):
  """`y_key` vs L0 (log x) at `site`, one line per arch through its points sorted by L0."""
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for arch in report.archs(records):
    rs = report.pareto_records(records, site, arch)
    if rs:
      _curve(ax, rs, "l0", y_key, arch)
  ax.set_xscale("log")
  ax.set(xlabel="L0 (features active per token)", ylabel=_LABEL[y_key],
         title=f"{_LABEL[y_key]} vs L0 at {site}")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  return fig


def plot_high_frequency(records, site: str):
  """Fraction of features firing on >10% and >1% of tokens vs delta LM loss (paper's Fig. 5)."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, pct in zip(axes, ("frac_features_over_10pct", "frac_features_over_1pct"),
                          ("10%", "1%")):
    for arch in report.archs(records):
      rs = sorted(report.pareto_records(records, site, arch), key=lambda r: r["delta_lm_loss"])
      if rs:
        _curve(ax, rs, "delta_lm_loss", key, arch)
    ax.set(xlabel=_LABEL["delta_lm_loss"], ylabel="fraction of features",
           title=f"features firing on >{pct} of tokens at {site}")
    ax.grid(True, alpha=0.3)
    ax.legend()
  return fig


def plot_firing_density(r: dict):
  """Histogram of log10(firing frequency); never-fired features get their own grey bar."""
  if not r.get("firing_frequency"):
    raise ValueError(f"{r['dir']}/eval.json: expected a firing_frequency list (one entry per "
                     "feature), found none; re-run experiments/evaluate.py.")
  freq = np.asarray(r["firing_frequency"], np.float64)
  alive, n_dead = freq[freq > 0], int(np.sum(freq == 0))
  fig, ax = plt.subplots(figsize=(5.5, 4))
  lo = np.floor(np.log10(alive.min())) if alive.size else -6.0
  edges = np.linspace(lo, 0.0, 41)
  if alive.size:
    ax.hist(np.log10(alive), bins=edges, color="C0")
  # log10(0) = -inf: the dead features sit in a bar one unit left of the axis' alive range.
  ax.bar(lo - 0.75, n_dead, width=0.5, color="grey")
  ax.annotate(f"dead: {n_dead}", (lo - 0.75, n_dead), ha="center", va="bottom")
  ax.set_xlim(lo - 1.25, 0.1)
  ax.set(xlabel="log10(fraction of tokens the feature fires on)",
         ylabel=f"features (of {freq.size})",
         title=f"{r['arch']} {r['member'] or ''}  L0={report.fmt(r['l0'])}  "
               f"ΔLM loss={report.fmt(r['delta_lm_loss'])}\n{r['site']}")
  return fig


def plot_eps_sweep(records, site: str):
  """Delta LM loss and L0 vs bandwidth ε (log x) for the members named eps* at `site`."""
  eps = [r for r in records if r["site"] == site and report.is_eps_member(r)]
  no_eps = [r["dir"] for r in eps if r.get("bandwidth") is None]
  if no_eps:
    raise ValueError(f"ε-sweep members {no_eps}: expected a bandwidth in eval.json or "
                     "config.json (sae.bandwidth), found none.")
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key in zip(axes, ("delta_lm_loss", "l0")):
    for arch in report.archs(eps):
      rs = sorted((r for r in eps if r["arch"] == arch), key=lambda r: r["bandwidth"])
      _curve(ax, rs, "bandwidth", key, arch)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # a narrow range crowds them
    ax.set(xlabel="bandwidth ε", ylabel=_LABEL[key], title=f"{_LABEL[key]} vs ε at {site}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  return fig


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------

def _jsonl(path: str) -> list[dict] | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_metrics(run: str, member: str = "") -> list[dict]:
  """The logged steps of a run, or of a sweep's member (plain keys); [] when none were logged.

  A member's own members/NAME/metrics.jsonl is preferred; without it the sweep's metrics.jsonl,
  whose per-member keys read "key/NAME", is split the same way.
  """
  if not member:
    return _jsonl(os.path.join(run, "metrics.jsonl")) or []
  own = _jsonl(os.path.join(run, "members", member, "metrics.jsonl"))
  if own is not None:
    return own
  suffix = "/" + member
  return [{k.removesuffix(suffix): v for k, v in rec.items() if "/" not in k or k.endswith(suffix)}
          for rec in _jsonl(os.path.join(run, "metrics.jsonl")) or []]


def runs_of(records) -> dict[str, dict[str, dict]]:
  """Each run or sweep directory of `records` -> {member name: its record} ("" for a lone run)."""
  runs = {}
  for r in records:
    run_dir = os.path.normpath(r["dir"])
    parent = os.path.dirname(run_dir)
    if os.path.basename(parent) == "members":  # a sweep member: the sweep is the run
      runs.setdefault(os.path.dirname(parent), {})[os.path.basename(run_dir)] = r
    else:
      runs.setdefault(run_dir, {})[""] = r
  return runs


def plot_training_curves(logs: dict[str, list[dict]], title: str):
  """Loss, L0, FVU, dead features and mean threshold (where logged) vs step, one line per member
  of `logs` (member name -> its metrics.jsonl records; "" for a lone run)."""
  panels = [p for p in _TRAIN_PANELS if any(p[0] in rec for recs in logs.values() for rec in recs)]
  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
  for ax, (key, label, log_y) in zip(axes[0], panels):
    for member, recs in logs.items():
      recs = [rec for rec in recs if key in rec]
      if recs:
        ax.plot([rec["step"] for rec in recs], [rec[key] for rec in recs], label=member or None)
    # Early steps are orders of magnitude off the late ones; a log axis keeps both readable.
    if log_y and all(y > 0 for line in ax.lines for y in line.get_ydata()):
      ax.set_yscale("log")
    ax.set(xlabel="step", title=label)
    ax.grid(True, which="both", alpha=0.3)
  if any(logs):  # a sweep: name its members
    axes[0][0].legend(fontsize="small")
  fig.suptitle(title)
  fig.tight_layout()
  return fig


# ---------------------------------------------------------------------------------------------
# All figures
# ---------------------------------------------------------------------------------------------

def write_all(records, out: str) -> list[str]:
  """Every figure for `records` under `out`; returns the paths written."""
  written, used, used_curves = [], set(), set()

  def save(fig, name):
    written.append(_save(fig, os.path.join(out, name)))

  for site in report.sites(records):
    s = _name(site)
    save(plot_pareto(records, site, "delta_lm_loss"), f"pareto_delta_lm_loss_{s}.png")
    save(plot_pareto(records, site, "fvu"), f"pareto_fvu_{s}.png")
    save(plot_high_frequency(records, site), f"high_frequency_{s}.png")
    if any(r["site"] == site and report.is_eps_member(r) for r in records):
      save(plot_eps_sweep(records, site), f"eps_sweep_{s}.png")
  for r in records:
    # A run outside a sweep has no member name: its folder names it instead.
    member = r["member"] or os.path.basename(os.path.normpath(r["dir"]))
    # Two sweeps of one arch can share member names.
    name = _unique(f"{_name(r['site'])}_{_name(r['arch'])}_{_name(member)}", used)
    save(plot_firing_density(r), os.path.join("firing_density", name + ".png"))
  for run, members in runs_of(records).items():
    logs = {m: recs for m in members if (recs := read_metrics(run, m))}
    if not logs:  # e.g. an SAE trained elsewhere and only evaluated here
      print(f"warning: {run}: no metrics.jsonl (one line per logged training step); no "
            "training curves for it.", file=sys.stderr)
      continue
    site = next(iter(members.values()))["site"]
    # The site keeps one sweep name trained at several layers (reproduce.sh) apart.
    name = _unique(f"{_name(site)}_{_name(os.path.basename(run))}", used_curves)
    save(plot_training_curves(logs, f"{run} ({site})"), f"training_curves_{name}.png")
  return written


def main(argv=None) -> list[str]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--runs", nargs="+", required=True, help="Run or sweep directories.")
  p.add_argument("--out", required=True, help="Folder for the PNGs.")
  args = p.parse_args(argv)
  written = write_all(report.load_records(args.runs), args.out)
  print("\n".join(written))
  return written


if __name__ == "__main__":
  main()
