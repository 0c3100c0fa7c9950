"""scripts/plots.py and scripts/report.py on small fake run and sweep directories."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scripts import plots, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = "resid_post.14"
F = 32


def _freq(l0, n_dead):
  """F firing frequencies: shares of l0 (each capped at 1, every token), then n_dead zeros."""
  w = np.linspace(1.0, 3.0, F - n_dead) ** 4
  return [0.0] * n_dead + list(np.minimum(w / w.sum() * l0, 1.0))


def _write_run(run_dir, arch, member, l0, delta, fvu, lam=None, eps=None, k=None, n_dead=4):
  """config.json and eval.json of one evaluated SAE, with self-consistent derived numbers."""
  os.makedirs(run_dir)
  freq = np.array(_freq(l0, n_dead))
  ce_clean, ce_zero = 2.0, 10.0
  ev = {"site": SITE, "arch": arch, "member": member, "sparsity_coefficient": lam,
        "bandwidth": eps, "k": k, "tokens": 4096, "ce_clean": ce_clean, "ce_sae": ce_clean + delta,
        "ce_zero_ablation": ce_zero, "delta_lm_loss": delta,
        "loss_recovered": (ce_zero - ce_clean - delta) / (ce_zero - ce_clean),
        "kl_clean_sae": delta * 0.9, "l0": l0, "fvu": fvu, "shrinkage_gamma": 0.95,
        "frac_features_over_10pct": float(np.mean(freq > 0.1)),
        "frac_features_over_1pct": float(np.mean(freq > 0.01)),
        "frac_features_dead_on_eval": float(np.mean(freq == 0)),
        "firing_frequency": freq.tolist()}
  if arch == "jumprelu":
    ev["threshold_quantiles"] = {q: 0.01 * int(q) for q in ("0", "5", "25", "50", "75", "95",
                                                               "100")}
    ev["frac_preacts_in_window"] = 0.002
  config = {"sae": {"arch": arch, "sparsity_coefficient": lam or 0.001, "bandwidth": eps or 0.001,
                    "k": k or 32, "width": F}, "lm": {"site": SITE}}
  for name, obj in (("eval.json", ev), ("config.json", config)):
    with open(os.path.join(run_dir, name), "w") as f:
      json.dump(obj, f)


@pytest.fixture
def runs(tmp_path):
  """A JumpReLU sweep (two λ members, two ε members), a TopK sweep and a lone ReLU run.

  JumpReLU's λ points: L0 10 → (ΔLM 0.2, FVU 0.3), L0 100 → (0.1, 0.1). Its ε members sit at
  L0 10**1.5 with ΔLM 0.5: were they on the curve, the equal-L0 comparison would change.
  """
  jr = tmp_path / "sweep_jumprelu" / "members"
  _write_run(jr / "lam=0.001", "jumprelu", "lam=0.001", 10.0, 0.2, 0.3, lam=1e-3, eps=1e-3)
  _write_run(jr / "lam=0.0001", "jumprelu", "lam=0.0001", 100.0, 0.1, 0.1, lam=1e-4, eps=1e-3)
  _write_run(jr / "eps=0.0005", "jumprelu", "eps=0.0005", 10 ** 1.5, 0.5, 0.5, lam=3e-4, eps=5e-4)
  _write_run(jr / "eps=0.004", "jumprelu", "eps=0.004", 25.0, 0.6, 0.5, lam=3e-4, eps=4e-3)
  tk = tmp_path / "sweep_topk" / "members"
  _write_run(tk / "k=32", "topk", "k=32", 10 ** 1.5, 0.2, 0.25, k=32, n_dead=0)
  _write_run(tk / "k=300", "topk", "k=300", 300.0, 0.05, 0.05, k=300)  # outside JumpReLU's range
  _write_run(tmp_path / "relu_run", "relu", "", 1000.0, 0.04567, 0.03, lam=3e-4)  # no overlap
  return [str(tmp_path / "sweep_jumprelu"), str(tmp_path / "sweep_topk"),
          str(tmp_path / "relu_run")]


def _assert_png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", path
  assert len(data) > 2000, (path, len(data))


def test_plots_writes_every_figure(runs, tmp_path):
  out = tmp_path / "plots"
  written = plots.main(["--runs", *runs, "--out", str(out)])
  density = ["jumprelu_lam=0.001", "jumprelu_lam=0.0001", "jumprelu_eps=0.0005",
             "jumprelu_eps=0.004", "topk_k=32", "topk_k=300", "relu_relu_run"]
  expected = ([f"{k}_{SITE}.png" for k in ("pareto_delta_lm_loss", "pareto_fvu",
                                           "high_frequency", "eps_sweep")] +
              [f"firing_density/{SITE}_{d}.png" for d in density])
  assert sorted(os.path.relpath(p, out) for p in written) == sorted(expected)
  for name in expected:
    _assert_png(out / name)


def _row(text, arch, member):
  """The cells of the markdown row of (arch, member)."""
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if cells[:2] == [arch, member]:
      return cells
  raise AssertionError(f"no row for {arch} {member!r} in\n{text}")


def test_report_table(runs, tmp_path):
  out = tmp_path / "report.md"
  text = report.main(["--runs", *runs, "--out", str(out)])
  assert out.read_text() == text
  table = text.split(f"## {SITE}")[1].split("## At the same L0")[0]
  rows = [l for l in table.splitlines() if l.startswith("| ") and not l.startswith("| arch")]
  assert len(rows) == 7  # one per SAE
  # Sorted by arch, then L0.
  assert [r.split("|")[1].strip() for r in rows] == ["jumprelu"] * 4 + ["relu"] + ["topk"] * 2
  assert [r.split("|")[2].strip() for r in rows[:4]] == ["lam=0.001", "eps=0.004", "eps=0.0005",
                                                         "lam=0.0001"]
  header = [h for h, _, _ in report.COLUMNS]
  relu = dict(zip(header, _row(table, "relu", "")))
  # 4 of 32 features never fire: 12.5% dead; a ReLU SAE has no ε and no k.
  assert relu == {**relu, "λ": "0.0003", "ε": "-", "k": "-", "L0": "1000", "FVU": "0.03",
                  "ΔLM loss": "0.04567", "loss rec.": "0.9943", "KL": "0.0411", "γ": "0.95",
                  "% dead": "12.5"}
  topk = dict(zip(header, _row(table, "topk", "k=32")))
  assert topk == {**topk, "λ": "-", "k": "32", "L0": "31.62", "% dead": "0"}


def test_compare_at_equal_l0_by_hand(runs):
  rows = {r["arch"]: r for r in report.compare_at_equal_l0(report.load_records(runs))}
  # TopK's L0 10**1.5 (31.62) is halfway between 10 and 100 in log(L0): JumpReLU interpolates to
  # ΔLM (0.2 + 0.1) / 2 = 0.15 and FVU (0.3 + 0.1) / 2 = 0.2; TopK has 0.2 and 0.25 there.
  # Its L0-300 point lies outside JumpReLU's [10, 100], so one point is compared.
  assert rows["topk"]["n"] == 1
  assert rows["topk"]["d_delta_lm_loss"] == pytest.approx(0.15 - 0.2, abs=1e-12)
  assert rows["topk"]["d_fvu"] == pytest.approx(0.2 - 0.25, abs=1e-12)
  assert rows["relu"]["n"] == 0 and rows["relu"]["d_delta_lm_loss"] is None
  text = report.comparison_table(list(rows.values()))
  assert f"| {SITE} | relu | 0 | no overlap | - | - |" in text
  assert f"| {SITE} | topk | 1 | 31.62–31.62 | -0.05 | -0.05 |" in text


def test_config_fills_what_eval_json_lacks(tmp_path):
  """An eval.json from before arch/member/hyperparameters were written: config.json supplies
  them, and only those that apply to the arch."""
  run = tmp_path / "sweep" / "members" / "k=16"
  _write_run(run, "topk", "k=16", 16.0, 0.1, 0.2, k=16)
  ev = json.loads((run / "eval.json").read_text())
  for key in ("arch", "member", "sparsity_coefficient", "bandwidth", "k"):
    del ev[key]
  (run / "eval.json").write_text(json.dumps(ev))
  (r,) = report.load_records([str(tmp_path / "sweep")])
  assert (r["arch"], r["member"], r["k"], r["sparsity_coefficient"], r["bandwidth"]) == (
      "topk", "k=16", 16, None, None)


def test_directory_without_eval_json_is_a_clear_error(tmp_path):
  empty = tmp_path / "not_evaluated"
  empty.mkdir()
  for main in (plots.main, report.main):
    with pytest.raises(FileNotFoundError, match="not_evaluated.*eval.json.*members/"):
      main(["--runs", str(empty), "--out", str(tmp_path / "o")])


def test_scripts_run_from_the_repo_root(runs, tmp_path):
  out = {}
  for script, extra in (("plots.py", ["--out", str(tmp_path / "p")]), ("report.py", [])):
    proc = subprocess.run([sys.executable, f"scripts/{script}", "--runs", runs[2], *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out[script] = proc.stdout
  assert "| relu |" in out["report.py"]
  # One ReLU run: no ε-sweep members, so no ε figure; the printed list is what was written.
  written = out["plots.py"].split()
  assert len(written) == 4 and not any("eps_sweep" in p for p in written)
  for p in written:
    _assert_png(p)
