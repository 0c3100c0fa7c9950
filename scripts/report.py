"""Markdown tables of evaluated SAEs, one per site, and JumpReLU against each other arch at equal L0.

  python scripts/report.py --runs runs/sweep_jumprelu runs/sweep_topk runs/one_relu [--out report.md]

Each --runs path is one SAE (a directory holding eval.json, written by experiments/evaluate.py) or
a sweep (a directory holding members/<name>/eval.json). Reads json only: no jax, no matplotlib.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

# Arch -> the hyperparameters that mean something for it; only these are read back from
# config.json when an older eval.json lacks them (config.json holds every key for every arch).
_HYPERS = {"jumprelu": ("sparsity_coefficient", "bandwidth"), "relu": ("sparsity_coefficient",),
           "gated": ("sparsity_coefficient",), "topk": ("k",), "batchtopk": ("k",)}
_REQUIRED = ("site", "arch", "l0", "fvu", "delta_lm_loss")
# (header, record key, scale): the report's columns, left to right.
COLUMNS = (("arch", "arch", None), ("member", "member", None), ("λ", "sparsity_coefficient", None),
           ("ε", "bandwidth", None), ("k", "k", None), ("L0", "l0", None), ("FVU", "fvu", None),
           ("ΔLM loss", "delta_lm_loss", None), ("loss rec.", "loss_recovered", None),
           ("KL", "kl_clean_sae", None), ("γ", "shrinkage_gamma", None),
           ("% >10%", "frac_features_over_10pct", 100.0),
           ("% >1%", "frac_features_over_1pct", 100.0),
           ("% dead", "frac_features_dead_on_eval", 100.0))

# Downstream evaluations (jumprelu/downstream.py, SAEBench's definitions), in eval.json when
# experiments/evaluate.py ran with --downstream.
DOWNSTREAM_COLUMNS = (("arch", "arch", None), ("member", "member", None), ("L0", "l0", None),
                      ("absorption", "absorption_fraction", None),
                      ("full absorption", "full_absorption_rate", None),
                      ("split feats", "absorption_split_features", None),
                      ("probe: dense", "sparse_probing_mean_dense", None),
                      ("k=1", "sparse_probing_mean_k1", None),
                      ("k=2", "sparse_probing_mean_k2", None),
                      ("k=5", "sparse_probing_mean_k5", None),
                      ("k=20", "sparse_probing_mean_k20", None))
_DOWNSTREAM_KEYS = tuple(key for _, key, _ in DOWNSTREAM_COLUMNS[3:])


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------

def run_dirs(path: str) -> list[str]:
  """The SAE directories `path` names: itself if it holds eval.json, else each evaluated member."""
  if os.path.isfile(os.path.join(path, "eval.json")):
    return [path]
  members = os.path.join(path, "members")
  if not os.path.isdir(members):
    raise FileNotFoundError(
        f"{path}: expected an eval.json (one SAE) or a members/ folder (a sweep), found neither; "
        f"evaluate the run first (experiments/evaluate.py --workdir={path}).")
  names = sorted(os.listdir(members))
  dirs = [os.path.join(members, n) for n in names
          if os.path.isfile(os.path.join(members, n, "eval.json"))]
  if not dirs:
    raise FileNotFoundError(f"{members}: expected members/<name>/eval.json, found none among "
                            f"{len(names)} members; evaluate the sweep first.")
  if len(dirs) < len(names):  # a sweep still being evaluated: report what is there, say so
    print(f"warning: {members}: {len(names) - len(dirs)} of {len(names)} members have no "
          "eval.json yet; skipped.", file=sys.stderr)
  return dirs


def load_record(run_dir: str) -> dict:
  """One SAE's eval.json, with arch/hyperparameters from config.json where eval.json lacks them."""
  with open(os.path.join(run_dir, "eval.json")) as f:
    r = json.load(f)
  config_path = os.path.join(run_dir, "config.json")
  config = {}
  if os.path.isfile(config_path):
    with open(config_path) as f:
      config = json.load(f)
  sae, lm = config.get("sae", {}), config.get("lm", {})
  if "arch" not in r and "arch" in sae:
    r["arch"] = sae["arch"]
  if "site" not in r and "site" in lm:
    r["site"] = lm["site"]
  for key in ("sparsity_coefficient", "bandwidth", "k"):
    if key not in r:
      r[key] = sae.get(key) if key in _HYPERS.get(r.get("arch"), ()) else None
  if "member" not in r:  # a sweep member is named by its folder under members/
    parent = os.path.basename(os.path.dirname(os.path.normpath(run_dir)))
    r["member"] = os.path.basename(os.path.normpath(run_dir)) if parent == "members" else ""
  missing = [k for k in _REQUIRED if r.get(k) is None]
  if missing:
    raise ValueError(f"{run_dir}/eval.json: expected keys {list(_REQUIRED)}, missing {missing} "
                     "(and not found in config.json); re-run experiments/evaluate.py.")
  r["dir"] = run_dir
  return r


def load_records(paths) -> list[dict]:
  """Every SAE under the given run or sweep directories."""
  return [load_record(d) for p in paths for d in run_dirs(p)]


def is_eps_member(r: dict) -> bool:
  """Members of an ε sweep: kept off the Pareto curves, which vary λ (or k) at one ε."""
  return r.get("member", "").startswith("eps")


def sites(records) -> list[str]:
  return sorted({r["site"] for r in records})


def pareto_records(records, site: str, arch: str) -> list[dict]:
  """One arch's points on the sparsity–fidelity curve at `site`, sorted by L0."""
  # L0 = 0 (an SAE that never fires) has no place on a log-L0 axis; the tables still list it.
  rs = [r for r in records if r["site"] == site and r["arch"] == arch and not is_eps_member(r)
        and r["l0"] > 0]
  return sorted(rs, key=lambda r: r["l0"])


def archs(records) -> list[str]:
  """Archs present, JumpReLU first (it is what the others are compared against)."""
  return sorted({r["arch"] for r in records}, key=lambda a: (a != "jumprelu", a))


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def fmt(x) -> str:
  """4 significant digits for floats; '-' for a value that does not apply (null)."""
  if x is None:
    return "-"
  if isinstance(x, bool) or isinstance(x, (int, np.integer)):
    return str(int(x))
  if isinstance(x, (float, np.floating)):
    return "nan" if math.isnan(x) else f"{float(x):.4g}"
  return str(x)


def _markdown(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def site_table(records, site: str) -> str:
  """One row per SAE at `site`, sorted by arch then L0."""
  rs = sorted((r for r in records if r["site"] == site), key=lambda r: (r["arch"], r["l0"]))
  rows = [[fmt(r.get(key) * scale if scale and r.get(key) is not None else r.get(key))
           for _, key, scale in COLUMNS] for r in rs]
  return _markdown([h for h, _, _ in COLUMNS], rows)


def downstream_table(records, site: str) -> str | None:
  """Absorption and mean sparse-probing accuracy per SAE at `site` (None if none has them)."""
  rs = sorted((r for r in records if r["site"] == site and
               any(r.get(k) is not None for k in _DOWNSTREAM_KEYS)),
              key=lambda r: (r["arch"], r["l0"]))
  if not rs:
    return None
  rows = [[fmt(r.get(key)) for _, key, _ in DOWNSTREAM_COLUMNS] for r in rs]
  return _markdown([h for h, _, _ in DOWNSTREAM_COLUMNS], rows)


def compare_at_equal_l0(records) -> list[dict]:
  """JumpReLU minus each other arch, at that arch's L0 points inside JumpReLU's L0 range.

  JumpReLU's delta LM loss and FVU are interpolated linearly in log(L0) along its Pareto points
  (ε-sweep members excluded). Per (site, arch): n points compared, their L0 range, and the mean
  differences d_delta_lm_loss, d_fvu (negative: JumpReLU better; None when n == 0).
  """
  out = []
  for site in sites(records):
    jr = pareto_records(records, site, "jumprelu")
    if not jr:
      continue
    log_l0 = np.log([r["l0"] for r in jr])
    for arch in [a for a in archs(records) if a != "jumprelu"]:
      points = pareto_records(records, site, arch)
      if not points:  # this arch was not trained at this site
        continue
      other = [r for r in points if log_l0[0] <= math.log(r["l0"]) <= log_l0[-1]]
      row = {"site": site, "arch": arch, "n": len(other), "l0_lo": None, "l0_hi": None,
             "d_delta_lm_loss": None, "d_fvu": None}
      if other:
        x = np.log([r["l0"] for r in other])
        for key in ("delta_lm_loss", "fvu"):
          jr_at_x = np.interp(x, log_l0, [r[key] for r in jr])
          row["d_" + key] = float(np.mean(jr_at_x - np.array([r[key] for r in other])))
        row["l0_lo"], row["l0_hi"] = other[0]["l0"], other[-1]["l0"]
      out.append(row)
  return out


def comparison_table(rows) -> str:
  """The compare_at_equal_l0 rows as markdown; 'no overlap' where the L0 ranges are disjoint."""
  header = ["site", "vs arch", "points", "L0 range", "JumpReLU − arch: ΔLM loss",
            "JumpReLU − arch: FVU"]
  body = [[r["site"], r["arch"], str(r["n"]),
           f"{fmt(r['l0_lo'])}–{fmt(r['l0_hi'])}" if r["n"] else "no overlap",
           fmt(r["d_delta_lm_loss"]), fmt(r["d_fvu"])] for r in rows]
  return _markdown(header, body)


def report(records) -> str:
  """The whole markdown report: a table per site, then the equal-L0 comparison."""
  parts = []
  for site in sites(records):
    parts += [f"## {site}", "", site_table(records, site), ""]
    downstream = downstream_table(records, site)
    if downstream:
      parts += [f"### {site}: downstream (SAEBench definitions; absorption: lower is better; "
                "probing: held-out accuracy, mean over tasks)", "", downstream, ""]
  rows = compare_at_equal_l0(records)
  if rows:
    parts += ["## At the same L0: JumpReLU minus each arch (mean over that arch's points; "
              "negative = JumpReLU better)", "", comparison_table(rows), ""]
  return "\n".join(parts)


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--runs", nargs="+", required=True, help="Run or sweep directories.")
  p.add_argument("--out", default=None, help="Also write the markdown here.")
  args = p.parse_args(argv)
  text = report(load_records(args.runs))
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)
  return text


if __name__ == "__main__":
  main()
