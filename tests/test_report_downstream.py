"""scripts/report.py's downstream table and scripts/plot_probing.py on fake run directories."""
import json

from scripts import plot_probing, report


def _run(tmp_path, name, arch, l0, scalars):
  d = tmp_path / name
  d.mkdir()
  record = {"site": "resid_post.1", "arch": arch, "l0": l0, "fvu": 0.2, "delta_lm_loss": 0.3}
  (d / "eval.json").write_text(json.dumps({**record, **scalars}))
  return str(d)


def _scalars(base):
  return {"absorption_fraction": 0.25, "full_absorption_rate": 0.125,
          "absorption_split_features": 1.5, "sparse_probing_mean_dense": 0.9,
          **{f"sparse_probing_mean_k{k}": base + 0.01 * k for k in (1, 2, 5, 20)}}


def test_downstream_table_reads_eval_json(tmp_path):
  runs = [_run(tmp_path, "jr", "jumprelu", 20.0, _scalars(0.6)),
          _run(tmp_path, "relu", "relu", 21.0, _scalars(0.5)),
          _run(tmp_path, "none", "topk", 22.0, {})]
  text = report.report(report.load_records(runs))
  assert "### resid_post.1: downstream" in text
  table = text.split("### resid_post.1: downstream")[1]
  rows = [line for line in table.splitlines() if line.startswith("| jumprelu") or
          line.startswith("| relu") or line.startswith("| topk")]
  assert len(rows) == 2  # the topk run has no downstream numbers
  assert "| jumprelu |  | 20 | 0.25 | 0.125 | 1.5 | 0.9 | 0.61 | 0.62 | 0.65 | 0.8 |" in rows
  assert rows[1].startswith("| relu |") and "| 0.51 |" in rows[1]


def test_probing_plot_draws_a_line_per_sae(tmp_path):
  runs = [_run(tmp_path, "jr", "jumprelu", 20.0, _scalars(0.6)),
          _run(tmp_path, "relu", "relu", 21.0, _scalars(0.5))]
  out = tmp_path / "probing.png"
  fig = plot_probing.main(["--runs", *runs, "--out", str(out)])
  ax = fig.axes[0]
  solid = [l for l in ax.get_lines() if l.get_linestyle() == "-"]
  assert len(solid) == 2 and list(solid[0].get_ydata()) == [0.61, 0.62, 0.65, 0.8]
  assert len([l for l in ax.get_lines() if l.get_linestyle() == "--"]) == 2
  assert out.read_bytes()[:4] == b"\x89PNG"
