"""notebooks/quickstart.ipynb runs end to end (tiny settings) and writes both exports."""
import os

import numpy as np
import pytest

from jumprelu import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("matplotlib")
  monkeypatch.setenv("JUMPRELU_QUICKSTART_TINY", "1")  # the kernel inherits the environment
  # One CPU device, as a user has; the suite's eight fake devices would only slow compilation.
  monkeypatch.setenv("XLA_FLAGS", "")
  nb = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  printed = "".join(o.get("text", "") for o in outputs)
  assert "dictionary recovery" in printed and "max |f_raw - C·f|" in printed
  figures = [o for o in outputs if "image/png" in o.get("data", {})]
  assert figures  # the loss curve and firing-density histogram, drawn inline
  out = tmp_path / "quickstart_out"
  npz, saelens = export.load(str(out / "params.npz")), export.load(str(out / "saelens"))
  for k in npz:
    np.testing.assert_array_equal(npz[k], saelens[k])
