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
STEPS = [4, 8, 12]  # the logged steps of every fake run


@pytest.fixture(autouse=True)
def _close_figures():
  """The plot builders return open figures; close them after each test."""
  yield
  plots.plt.close("all")


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


def _metrics(arch, i, step):
  """The training metrics logged at `step` by member i of a run (0 for a lone run)."""
  m = {"loss": 10.0 / step + i, "l0": 400.0 / step + 10 * i, "fvu": 1.0 / step + 0.01 * i,
       "dead": float(step // 4 + i), "learning_rate": 7e-5}
  if arch == "jumprelu":
    m["threshold_mean"] = 0.001 * step + 0.01 * i
  return m


def _write_metrics(run_dir, arch, members=(), own_files=True):
  """metrics.jsonl as training writes it: a lone run's plain keys, or a sweep's "key/MEMBER"
  keys, plus (own_files) each member's plain-key members/NAME/metrics.jsonl."""
  lines = []
  for step in STEPS:
    shared = {"step": step, "tokens": 256 * step, "tokens_per_s": 1e4}
    if not members:
      lines.append({**shared, **_metrics(arch, 0, step)})
      continue
    lines.append({**shared, **{f"{k}/{name}": v for i, name in enumerate(members)
                               for k, v in _metrics(arch, i, step).items()}})
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  for i, name in enumerate(members if own_files else ()):
    with open(os.path.join(run_dir, "members", name, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps({"step": step, "tokens": 256 * step, "tokens_per_s": 1e4,
                               **_metrics(arch, i, step)}) + "\n" for step in STEPS)


JR_MEMBERS = ["eps=0.0005", "eps=0.004", "lam=0.0001", "lam=0.001"]  # sorted, as members/ lists
TK_MEMBERS = ["k=300", "k=32"]


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
  # Training logs: JumpReLU's members have their own files, TopK's only the sweep's file.
  _write_metrics(tmp_path / "sweep_jumprelu", "jumprelu", JR_MEMBERS)
  _write_metrics(tmp_path / "sweep_topk", "topk", TK_MEMBERS, own_files=False)
  _write_metrics(tmp_path / "relu_run", "relu")
  return [str(tmp_path / "sweep_jumprelu"), str(tmp_path / "sweep_topk"),
          str(tmp_path / "relu_run")]


def _assert_png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", path
  assert len(data) > 2000, (path, len(data))


def _assert_lines(ax, expected):
  """The axes draw exactly `expected` ({label: (x, y)}, in drawing order), none of them empty."""
  lines = [(line.get_label(), line.get_xdata(), line.get_ydata()) for line in ax.lines]
  assert [label for label, _, _ in lines] == list(expected), ax.get_title()
  for (label, x, y), (x_want, y_want) in zip(lines, expected.values()):
    assert len(x) > 0 and len(x) == len(y), (ax.get_title(), label, "empty curve")
    np.testing.assert_allclose(x, x_want, rtol=1e-12, err_msg=f"{ax.get_title()} {label}")
    np.testing.assert_allclose(y, y_want, rtol=1e-12, err_msg=f"{ax.get_title()} {label}")


def test_plots_writes_every_figure(runs, tmp_path):
  out = tmp_path / "plots"
  written = plots.main(["--runs", *runs, "--out", str(out)])
  density = ["jumprelu_lam=0.001", "jumprelu_lam=0.0001", "jumprelu_eps=0.0005",
             "jumprelu_eps=0.004", "topk_k=32", "topk_k=300", "relu_relu_run"]
  expected = ([f"{k}_{SITE}.png" for k in ("pareto_delta_lm_loss", "pareto_fvu",
                                           "high_frequency", "eps_sweep")] +
              [f"firing_density/{SITE}_{d}.png" for d in density] +
              [f"training_curves_{SITE}_{r}.png" for r in ("sweep_jumprelu", "sweep_topk",
                                                           "relu_run")])
  assert sorted(os.path.relpath(p, out) for p in written) == sorted(expected)
  for name in expected:
    _assert_png(out / name)


def test_sweep_figures_draw_each_arch(runs):
  """Pareto, Fig. 5 and ε-sweep figures plot each arch's numbers from eval.json (see `runs`)."""
  records = report.load_records(runs)
  l0_tk = 10 ** 1.5
  ax = plots.plot_pareto(records, SITE, "delta_lm_loss").axes[0]
  _assert_lines(ax, {"jumprelu": ([10, 100], [0.2, 0.1]), "relu": ([1000], [0.04567]),
                     "topk": ([l0_tk, 300], [0.2, 0.05])})  # ε members left off
  ax = plots.plot_pareto(records, SITE, "fvu").axes[0]
  _assert_lines(ax, {"jumprelu": ([10, 100], [0.3, 0.1]), "relu": ([1000], [0.03]),
                     "topk": ([l0_tk, 300], [0.25, 0.05])})

  # Fig. 5: x is delta LM loss, sorted; y the fraction of features over 10% (1%) of tokens.
  def frac(l0, over, n_dead=4):
    return float(np.mean(np.array(_freq(l0, n_dead)) > over))

  ax10, ax1 = plots.plot_high_frequency(records, SITE).axes
  for ax, over in ((ax10, 0.1), (ax1, 0.01)):
    _assert_lines(ax, {"jumprelu": ([0.1, 0.2], [frac(100, over), frac(10, over)]),
                       "relu": ([0.04567], [frac(1000, over)]),
                       "topk": ([0.05, 0.2], [frac(300, over), frac(l0_tk, over, 0)])})
  ax_lm, ax_l0 = plots.plot_eps_sweep(records, SITE).axes
  _assert_lines(ax_lm, {"jumprelu": ([5e-4, 4e-3], [0.5, 0.6])})
  _assert_lines(ax_l0, {"jumprelu": ([5e-4, 4e-3], [l0_tk, 25.0])})


def test_firing_density_counts_every_feature(runs):
  (r,) = [r for r in report.load_records(runs) if r["member"] == "lam=0.001"]
  ax = plots.plot_firing_density(r).axes[0]
  *bins, dead = ax.patches  # the histogram's bars, then the dead features' bar
  heights = [b.get_height() for b in bins]
  assert sum(heights) == F - 4 and sum(h > 0 for h in heights) > 1
  assert dead.get_height() == 4


@pytest.mark.parametrize("run, arch, members", [(0, "jumprelu", JR_MEMBERS),
                                                (1, "topk", TK_MEMBERS), (2, "relu", [""])])
def test_training_curves_draw_every_logged_step(runs, run, arch, members):
  """One panel per logged metric, one line per member through every logged step. JumpReLU's
  members are read from their own files, TopK's from the sweep's "key/MEMBER" lines."""
  by_run = plots.runs_of(report.load_records(runs))
  logs = {m: plots.read_metrics(runs[run], m) for m in by_run[os.path.normpath(runs[run])]}
  fig = plots.plot_training_curves(logs, runs[run])
  panels = {"loss": "loss", "L0": "l0", "FVU": "fvu", "dead features (train window)": "dead"}
  if arch == "jumprelu":
    panels["mean threshold θ (raw units)"] = "threshold_mean"
  assert [ax.get_title() for ax in fig.axes] == list(panels)
  for ax in fig.axes:
    key = panels[ax.get_title()]
    expected = {m: (STEPS, [_metrics(arch, i, s)[key] for s in STEPS])
                for i, m in enumerate(members)}
    if members == [""]:  # a lone run's line has no label: matplotlib names it
      expected = {ax.lines[0].get_label(): expected[""]}
    _assert_lines(ax, expected)
    assert ax.get_yscale() == ("log" if key in ("loss", "l0", "fvu") else "linear")


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
  assert len(written) == 5 and not any("eps_sweep" in p for p in written)
  assert os.path.basename(written[-1]) == f"training_curves_{SITE}_relu_run.png"
  for p in written:
    _assert_png(p)


def test_run_without_training_log_is_skipped_with_a_warning(tmp_path, capsys):
  _write_run(tmp_path / "imported", "jumprelu", "", 50.0, 0.1, 0.1, lam=1e-3, eps=1e-3)
  written = plots.main(["--runs", str(tmp_path / "imported"), "--out", str(tmp_path / "p")])
  assert written and not any("training_curves" in p for p in written)
  assert "imported: no metrics.jsonl" in capsys.readouterr().err
