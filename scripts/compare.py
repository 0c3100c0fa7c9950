"""The reproduction's seeded comparison: tables with intervals and Pareto plots with error bars.

  python scripts/compare.py --runs runs/repro/runs --out docs/reproduction_results.md \
      --figures docs/figures

--runs holds one directory per run, named RUN_sSEED (scripts/reproduce.sh): a sweep
(members/NAME/eval.json) or one SAE (eval.json), each scored by scripts/evaluate_runs.py on the
same held-out contexts. HEADLINE runs have several seeds; any other run is a variant of JumpReLU.

Equal-L0 comparison. For each point of another architecture (one member, one seed), JumpReLU's
delta LM loss is interpolated linearly in log L0 between the two members of the same seed whose
L0 bracket it, per held-out context (the same weights on each context's summed loss). The
difference is averaged over seeds. Its 95% interval adds two independent sources of spread in
quadrature: which held-out contexts were scored (a bootstrap over contexts, the seeds kept
together) and which seeds were trained (Student's t over the seeds' differences). A variant is
compared at its own L0 with the headline JumpReLU of the same seed (same init, same batches),
the paired differences averaged over its seeds; for a one-seed variant the seed part is √2 ×
the headline's seed sd.
"""
import argparse
import json
import math
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HEADLINE = ("jumprelu", "topk", "batchtopk", "gated")
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}
BOOTSTRAP = 2000


def load(runs_dir: str) -> list[dict]:
  """Every evaluated SAE under runs_dir: eval.json plus run, seed and member names."""
  out = []
  for name in sorted(os.listdir(runs_dir)):
    m = re.fullmatch(r"(.+)_s(\d+)", name)
    if not m:
      continue
    path = os.path.join(runs_dir, name)
    members = os.path.join(path, "members")
    dirs = ([(n, os.path.join(members, n)) for n in sorted(os.listdir(members))]
            if os.path.isdir(members) else [("", path)])
    for member, d in dirs:
      e = os.path.join(d, "eval.json")
      if not os.path.exists(e):
        raise SystemExit(f"{d} has no eval.json: run scripts/evaluate_runs.py on {path} first")
      with open(e) as fh:
        r = json.load(fh)
      if "context_delta_lm_loss" not in r:
        raise SystemExit(f"{e} has no per-context losses: evaluate it again with "
                         "scripts/evaluate_runs.py (it writes them)")
      r.update(run=m.group(1), seed=int(m.group(2)), member=member or "-",
               ctx=np.asarray(r["context_delta_lm_loss"], np.float64),
               ntok=np.asarray(r["context_tokens"], np.float64))
      out.append(r)
  if not out:
    raise SystemExit(f"{runs_dir}: no RUN_sSEED directories with evaluated SAEs")
  lengths = {len(r["ntok"]) for r in out}
  if len(lengths) != 1 or len({tuple(r["ntok"]) for r in out}) != 1:
    raise SystemExit(f"the SAEs were scored on different held-out contexts ({sorted(lengths)} "
                     "contexts): evaluate them together with scripts/evaluate_runs.py")
  return out


def at_l0(rows: list[dict], l0: float, keys) -> dict | None:
  """The rows' `keys` (floats or arrays) interpolated linearly in log L0 at `l0`, between the
  two rows that bracket it; None outside them. A pair of equal L0 brackets nothing."""
  rows = sorted(rows, key=lambda r: r["l0"])
  for lo, hi in zip(rows, rows[1:]):
    if 0 < lo["l0"] <= l0 <= hi["l0"] and hi["l0"] > lo["l0"]:
      w = (math.log(l0) - math.log(lo["l0"])) / (math.log(hi["l0"]) - math.log(lo["l0"]))
      return {k: (1 - w) * lo[k] + w * hi[k] for k in keys}
  return None


def jumprelu_at(curve: list[dict], l0: float):
  """JumpReLU's per-context summed loss and FVU at `l0` (at_l0 between the two members of one
  seed that bracket it), or None outside the curve."""
  at = at_l0(curve, l0, ("ctx", "fvu"))
  return None if at is None else (at["ctx"], at["fvu"])


def interval(diffs_SxC: np.ndarray, ntok_C: np.ndarray, seed_sd: float | None = None,
             rng=None) -> tuple[float, float, float, float]:
  """(mean, 95% half-width, context part, seed part) of the per-token difference, from [S, C]
  per-context summed differences: contexts bootstrapped (seeds together), seeds by Student's t
  (or `seed_sd`, the spread of one seed, for a one-seed variant)."""
  rng = rng or np.random.default_rng(0)
  per_seed = diffs_SxC.sum(1) / ntok_C.sum()
  mean = float(per_seed.mean())
  idx = rng.integers(0, len(ntok_C), (BOOTSTRAP, len(ntok_C)))
  boot = diffs_SxC.mean(0)[idx].sum(1) / ntok_C[idx].sum(1)
  ctx = 1.96 * float(boot.std(ddof=1))
  S = len(per_seed)
  if seed_sd is not None:  # one seed: its spread as given
    seed = 1.96 * seed_sd
  elif S > 1:
    seed = T_975.get(S - 1, 1.96) * float(per_seed.std(ddof=1)) / math.sqrt(S)
  else:
    seed = float("nan")
  return mean, math.hypot(ctx, seed), ctx, seed


def points(records, run: str) -> dict[str, list[dict]]:
  """{member: [record per seed]} of a run."""
  out = {}
  for r in records:
    if r["run"] == run:
      out.setdefault(r["member"], []).append(r)
  return out


def ms(values, fmt="{:.3f}") -> str:
  """mean ± sd (sd unsigned, as the mean's format without its sign)."""
  v = np.asarray(values, np.float64)
  sd = "" if len(v) < 2 else " ± " + fmt.replace("+", "").format(v.std(ddof=1))
  return fmt.format(v.mean()) + sd


def point_table(records) -> str:
  rows = ["| arch | member | seeds | L0 | FVU | ΔLM loss | % dead | % >10% |",
          "|---|---|---|---|---|---|---|---|"]
  for run in [h for h in HEADLINE if any(r["run"] == h for r in records)]:
    for member, rs in sorted(points(records, run).items(), key=lambda kv: kv[1][0]["l0"]):
      rows.append(f"| {run} | {member} | {len(rs)} | {ms([r['l0'] for r in rs], '{:.1f}')} | "
                  f"{ms([r['fvu'] for r in rs])} | {ms([r['delta_lm_loss'] for r in rs])} | "
                  f"{ms([100 * r['frac_features_dead_on_eval'] for r in rs], '{:.1f}')} | "
                  f"{ms([100 * r['frac_features_over_10pct'] for r in rs], '{:.1f}')} |")
  return "\n".join(rows)


def equal_l0(records) -> tuple[list[dict], dict]:
  """Rows of JumpReLU − other at each other point, and JumpReLU's seed spread per seed curve."""
  curves = {}
  for r in records:
    if r["run"] == "jumprelu":
      curves.setdefault(r["seed"], []).append(r)
  rows = []
  for run in HEADLINE[1:]:
    for member, rs in sorted(points(records, run).items(), key=lambda kv: kv[1][0]["l0"]):
      got = [(r, jumprelu_at(curves.get(r["seed"], []), r["l0"])) for r in rs]
      if not rs or any(g is None for _, g in got):
        rows.append({"arch": run, "member": member, "l0": np.mean([r["l0"] for r in rs]),
                     "outside": True})
        continue
      d = np.stack([j[0] - r["ctx"] for r, j in got])
      mean, half, ctx, seed = interval(d, rs[0]["ntok"])
      rows.append({"arch": run, "member": member, "l0": float(np.mean([r["l0"] for r in rs])),
                   "seeds": len(rs), "d": d, "mean": mean, "half": half, "ctx": ctx,
                   "seed": seed, "fvu": [j[1] - r["fvu"] for r, j in got], "ntok": rs[0]["ntok"],
                   "other": float(np.mean([r["delta_lm_loss"] for r in rs]))})
  return rows, curves


def verdict(mean: float, half: float, who: str = "JumpReLU") -> str:
  """Of a difference `who` − other in delta LM loss: lower is better."""
  if math.isnan(half):
    return "one seed"
  if mean + half < 0:
    return f"{who} better"
  if mean - half > 0:
    return f"{who} worse"
  return "tie (within the interval)"


def equal_l0_table(rows) -> str:
  out = ["| other | member | L0 | seeds | other's ΔLM | JumpReLU − other ΔLM (95% CI) | "
         "CI from contexts / seeds | JumpReLU − other FVU | verdict |",
         "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("outside"):
      out.append(f"| {r['arch']} | {r['member']} | {r['l0']:.1f} | | | outside JumpReLU's L0 "
                 "range | | | |")
      continue
    out.append(f"| {r['arch']} | {r['member']} | {r['l0']:.1f} | {r['seeds']} | "
               f"{r['other']:.3f} | {r['mean']:+.4f} ± {r['half']:.4f} | "
               f"±{r['ctx']:.4f} / ±{r['seed']:.4f} | {ms(r['fvu'], '{:+.4f}')} | "
               f"{verdict(r['mean'], r['half'])} |")
  # Each architecture over all its compared points: the per-point differences averaged.
  for arch in HEADLINE[1:]:
    rs = [r for r in rows if r["arch"] == arch and not r.get("outside")]
    if len(rs) < 2:
      continue
    d = np.mean([r["d"] for r in rs], axis=0)
    mean, half, ctx, seed = interval(d, rs[0]["ntok"])
    out.append(f"| **{arch}, mean of {len(rs)} points** | | {rs[0]['l0']:.0f}–{rs[-1]['l0']:.0f} "
               f"| {rs[0]['seeds']} | | **{mean:+.4f} ± {half:.4f}** | ±{ctx:.4f} / ±{seed:.4f} | "
               f"{np.mean([np.mean(r['fvu']) for r in rs]):+.4f} | {verdict(mean, half)} |")
  return "\n".join(out)


def variant_table(records, curves) -> str:
  """Each variant point against the headline JumpReLU of the same seed (same init, same batches)
  at the variant's L0, the paired differences averaged over the variant's seeds."""
  per_seed = [[r["delta_lm_loss"] for r in sorted(c, key=lambda r: r["l0"])]
              for c in curves.values()]
  # The spread of one seed's JumpReLU − JumpReLU-like difference, for one-seed variants: √2 ×
  # the headline's seed sd (two independent seeds), averaged over its members.
  spread = (math.sqrt(2) * float(np.mean(np.std(np.asarray(per_seed), axis=0, ddof=1)))
            if len(per_seed) > 1 else float("nan"))
  out = ["| variant | member | seeds | L0 | FVU | ΔLM loss | JumpReLU ΔLM at this L0 | "
         "variant − JumpReLU ΔLM (95% CI) | % dead | % >10% | verdict |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
  runs = sorted({r["run"] for r in records} - set(HEADLINE))
  for run in runs:
    for member, rs in sorted(points(records, run).items(), key=lambda kv: kv[1][0]["l0"]):
      at = [jumprelu_at(curves.get(r["seed"], []), r["l0"]) for r in rs]
      cells = (f"| {run} | {member} | {len(rs)} | {ms([r['l0'] for r in rs], '{:.1f}')} | "
               f"{ms([r['fvu'] for r in rs])} | {ms([r['delta_lm_loss'] for r in rs])} | ")
      tail = (f" | {ms([100 * r['frac_features_dead_on_eval'] for r in rs], '{:.1f}')} | "
              f"{ms([100 * r['frac_features_over_10pct'] for r in rs], '{:.1f}')} | ")
      if any(a is None for a in at):
        out.append(cells + "outside JumpReLU's L0 range | " + tail + " |")
        continue
      d = np.stack([r["ctx"] - a[0] for r, a in zip(rs, at)])
      ntok = rs[0]["ntok"]
      ref = float(np.mean([a[0].sum() for a in at]) / ntok.sum())
      mean, half, _, _ = interval(d, ntok, seed_sd=spread if len(rs) == 1 else None)
      out.append(cells + f"{ref:.3f} | {mean:+.4f} ± {half:.4f}" + tail +
                 f"{verdict(mean, half, 'variant')} |")
  return "\n".join(out)


def plot(records, figures: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  written = []
  for key, label in (("delta_lm_loss", "delta LM loss (nats/token)"), ("fvu", "FVU")):
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for run in HEADLINE:
      pts = sorted(points(records, run).values(), key=lambda rs: np.mean([r["l0"] for r in rs]))
      if not pts:
        continue
      x = [np.mean([r["l0"] for r in rs]) for rs in pts]
      xe = [np.std([r["l0"] for r in rs], ddof=1) if len(rs) > 1 else 0 for rs in pts]
      y = [np.mean([r[key] for r in rs]) for rs in pts]
      ye = [np.std([r[key] for r in rs], ddof=1) if len(rs) > 1 else 0 for rs in pts]
      ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o-", ms=4, capsize=3,
                  label=f"{run} ({len(pts[0])} seeds)")
    for run in sorted({r["run"] for r in records} - set(HEADLINE)):  # seed means, dashed
      pts = sorted(points(records, run).values(), key=lambda rs: np.mean([r["l0"] for r in rs]))
      ax.plot([np.mean([r["l0"] for r in rs]) for rs in pts],
              [np.mean([r[key] for r in rs]) for rs in pts], "x--", ms=6, lw=0.8,
              label=f"{run} ({len(pts[0])} seed{'s' if len(pts[0]) > 1 else ''})")
    ax.set_xscale("log")
    ax.set_xlabel("L0 (features per token, held out)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs L0, mean ± sd over seeds")
    ax.legend(fontsize=6, ncol=2)
    path = os.path.join(figures, f"repro_pareto_{key}.png")
    os.makedirs(figures, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
  # The paper's Figure 5 analogue: features firing on > 10% of tokens against fidelity.
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for run in HEADLINE:
    pts = list(points(records, run).values())
    if not pts:
      continue
    x = [np.mean([r["delta_lm_loss"] for r in rs]) for rs in pts]
    y = [100 * np.mean([r["frac_features_over_10pct"] for r in rs]) for rs in pts]
    ye = [100 * np.std([r["frac_features_over_10pct"] for r in rs], ddof=1) if len(rs) > 1
          else 0 for rs in pts]
    order = np.argsort(x)
    ax.errorbar(np.asarray(x)[order], np.asarray(y)[order], yerr=np.asarray(ye)[order],
                fmt="o-", ms=4, capsize=3, label=run)
  ax.set_xlabel("delta LM loss (nats/token)")
  ax.set_ylabel("% of features firing on > 10% of tokens")
  ax.set_title("very-high-frequency features, mean ± sd over seeds")
  ax.legend(fontsize=7)
  path = os.path.join(figures, "repro_high_frequency.png")
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return written + [path]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--runs", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--figures", default="")
  args = p.parse_args(argv)
  records = load(args.runs)
  rows, curves = equal_l0(records)
  r0 = records[0]
  text = "\n\n".join([
      "# Reproduction results (written by scripts/compare.py)",
      f"{len(records)} SAEs at {r0['site']}, each scored on the same {len(r0['ntok'])} held-out "
      f"contexts ({int(r0['ntok'].sum())} scored tokens; CE clean {r0['ce_clean']:.3f} nats, "
      f"zero-ablated {r0['ce_zero_ablation']:.3f}). ± in the point table: sd over seeds.",
      "## Headline points (mean ± sd over seeds)", point_table(records),
      "## JumpReLU against each architecture at equal L0",
      "Negative: JumpReLU has the lower delta LM loss. The interval is 95%: contexts "
      "(bootstrap) and seeds (Student's t) in quadrature.", equal_l0_table(rows),
      "## Every other objective and option against the headline JumpReLU",
      "Negative: the variant has the lower delta LM loss than the headline JumpReLU at its L0.",
      variant_table(records, curves)])
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as fh:
    fh.write(text + "\n")
  print(text)
  if args.figures:
    for path in plot(records, args.figures):
      print("wrote", path)


if __name__ == "__main__":
  main()
