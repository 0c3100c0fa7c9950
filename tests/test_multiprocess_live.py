"""Live training and evaluation over two processes (4 CPU devices each, jax.distributed over
loopback) equal one process with 8 devices: the same mesh, each process running the LM on its
half of every chunk and scoring its half of the eval contexts."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jumprelu import export
from tests.conftest import REPO, free_port, process_env
from tests.tiny_lm import write_hf_checkpoint

MEMBERS = ("lam=0.001", "lam=0.01")


def _args(tmp_path):
  ckpt = str(tmp_path / "lm")
  write_hf_checkpoint(ckpt, "llama")  # d_model 32, 2 blocks, words w3..w255
  rng = np.random.RandomState(0)
  with open(tmp_path / "docs.jsonl", "w") as fh:
    for _ in range(40):
      fh.write(json.dumps({"text": " ".join(f"w{i}" for i in rng.randint(3, 256, 100))}) + "\n")
  return ["--config=" + os.path.join(REPO, "configs", "tiny.py") + ":live",
          f"--config.lm.model_path={ckpt}", "--config.data.d_in=32",
          "--config.text.source=files", f"--config.text.path={tmp_path}/docs.jsonl",
          "--config.mesh.data=4", "--config.mesh.model=2",  # each process: 2 rows of "data"
          "--config.lm.model_parallel=2",  # the LM: tensor parallel over 2 of its devices
          "--config.train.num_steps=6", "--config.train.checkpoint_every=6",  # 2 chunks
          "--config.sweep.sparsity_coefficient=(0.001, 0.01)",  # a sweep shares the LM pass
          "--config.eval.num_contexts=8", "--config.eval.batch_contexts=4",
          "--config.eval.skip_contexts=20", "--config.export.saelens=False"]


@pytest.mark.multiprocess
def test_live_training_and_evaluation_on_two_processes_match_one(tmp_path):
  train_py = os.path.join(REPO, "experiments", "train.py")
  args = _args(tmp_path)
  port = free_port()
  # All three processes at once: the one-process run beside the two-process one.
  procs = [subprocess.Popen([sys.executable, train_py, *args, f"--workdir={tmp_path}/one"],
                            env=process_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)]
  procs += [subprocess.Popen(
      [sys.executable, train_py, *args, f"--workdir={tmp_path}/two", "--distributed",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=process_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  failed = [f"process {i}: {err[-2000:]}" for i, (p, (_, err)) in enumerate(zip(procs, outs))
            if p.returncode]
  assert not failed, "\n".join(failed)

  # Each of the two ran the LM on half of each chunk's 8 contexts; the one process on all.
  ran = [re.findall(r"live chunk 1: \d+ rows; this process ran the LM on contexts (\d+)\.\.(\d+)",
                    err) for _, err in outs]
  assert ran == [[("8", "15")], [("8", "11")], [("12", "15")]]
  for name in MEMBERS:
    one, two = (f"{tmp_path}/{w}/members/{name}" for w in ("one", "two"))
    a = export.load_gemma_scope(f"{one}/export/params.npz")
    b = export.load_gemma_scope(f"{two}/export/params.npz")
    for k in a:  # same mesh, same global batches: only the collectives' transport differs
      np.testing.assert_allclose(b[k], a[k], atol=1e-6, rtol=0, err_msg=f"{name} {k}")
    ea, eb = (json.load(open(f"{d}/eval.json")) for d in (one, two))
    assert ea["tokens"] == eb["tokens"] > 0
    for k, v in ea.items():  # per-process sums added: equal up to float32 summation order
      if isinstance(v, float):  # (delta LM loss, a difference of ~5-nat CEs: 1e-6 absolute)
        assert eb[k] == pytest.approx(v, rel=1e-5, abs=2e-6), f"{name} {k}"
    np.testing.assert_allclose(eb["firing_frequency"], ea["firing_frequency"], atol=1e-7)
    # Per-context sums are gathered in context order: the same lists from 1 or 2 processes.
    assert eb["context_tokens"] == ea["context_tokens"] and len(ea["context_tokens"]) > 1
    np.testing.assert_allclose(eb["context_delta_lm_loss"], ea["context_delta_lm_loss"],
                               rtol=1e-5, atol=1e-5)
