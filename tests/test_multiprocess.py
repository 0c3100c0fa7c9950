"""Two local processes (4 CPU devices each, jax.distributed over loopback) vs one with 8."""
import os
import subprocess
import sys

import numpy as np
import pytest

from jumprelu import export
from tests.conftest import free_port, process_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=" + os.path.join(REPO, "configs", "synthetic.py"),
        "--config.data.d_in=16", "--config.data.synthetic.n_rows=4096",
        "--config.data.synthetic.n_features=32", "--config.data.synthetic.mean_l0=3.0",
        "--config.data.norm_rows=1024", "--config.sae.width=64", "--config.train.batch_size=64",
        "--config.train.num_steps=12", "--config.train.checkpoint_every=6",
        "--config.train.log_every=4",
        "--config.mesh.data=2", "--config.mesh.model=4"]


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
  train_py = os.path.join(REPO, "experiments", "train.py")
  one = subprocess.run([sys.executable, train_py, *ARGS, f"--workdir={tmp_path}/one"],
                       env=process_env(8), capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]

  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, train_py, *ARGS, f"--workdir={tmp_path}/two", "--distributed",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=process_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "process 1/2, 4 local devices of 8" in outs[1][1]

  a = export.load_gemma_scope(f"{tmp_path}/one/export/params.npz")
  b = export.load_gemma_scope(f"{tmp_path}/two/export/params.npz")
  for k in a:  # same mesh, same global batches: only the collectives' transport differs
    np.testing.assert_allclose(b[k], a[k], atol=1e-6, rtol=0, err_msg=k)
  steps = [l for l in open(f"{tmp_path}/two/metrics.jsonl")]
  assert len(steps) == 3  # process 0 alone writes the log
