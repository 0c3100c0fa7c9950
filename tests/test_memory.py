"""The per-device memory report, against sizes worked out by hand."""
import os
import subprocess
import sys

from jumprelu import memory
from tests.conftest import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_report_counts_each_devices_share():
  c = tiny(**{"sae.width": 64, "train.batch_size": 64, "mesh.data": 2, "mesh.model": 4})
  d, f = c.data.d_in, 64
  r = memory.report(c)
  # W_enc, W_dec, b_enc and log θ split 4 ways over "model"; b_dec replicated; float32.
  params = 4 * (d * f // 4 + f // 4 + f * d // 4 + f // 4 + d)
  assert r["params"] == params
  assert r["optimizer"] == params + 4 + 4  # Adam's ν (β1 = 0) and two step counters
  assert r["batch"] == 4 * (64 // 2) * d
  assert r["temporaries"] > 0 and r["total"] >= r["params"]


def test_a_sweep_holds_every_members_state():
  one = memory.report(tiny(**{"mesh.data": 2, "mesh.model": 4}))
  three = memory.report(tiny(**{"mesh.data": 2, "mesh.model": 4,
                                "sweep.sparsity_coefficient": (1e-3, 2e-3, 3e-3)}))
  assert three["params"] == 3 * one["params"]
  assert three["optimizer"] == 3 * one["optimizer"]  # step counters included: one per member
  assert three["batch"] == one["batch"]  # the batch is shared


def test_script_prints_a_pod_layout():
  run = subprocess.run(
      [sys.executable, "scripts/memory.py", "--config=configs/gemma9b_l20.py", "--devices=8",
       "--config.train.batch_size=512"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "{'data': 1, 'model': 8}" in run.stdout
  # 131072 × 3584 × 2 matrices split 8 ways, float32: 0.4375 GiB of params per device.
  assert "params          0.438 GiB" in run.stdout


def test_lm_parameter_count_matches_transformers(tmp_path):
  pytest = __import__("pytest")
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from jumprelu.lm import load
  from tests.lm.test_lm_model import tiny_torch_model
  for family in ("gemma2", "llama"):
    ref = tiny_torch_model(family)
    ref.config.save_pretrained(tmp_path / family)  # config.json only: no weights
    expected = sum(p.numel() for p in ref.parameters())
    assert memory.lm_param_count(load.hf_config(str(tmp_path / family))) == expected, family


def test_dry_run_reads_no_weights(tmp_path):
  (tmp_path / "gemma").mkdir()
  # Gemma 2 9B's published architecture, written out: the dry run needs config.json alone.
  (tmp_path / "gemma" / "config.json").write_text(
      '{"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, '
      '"intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16, '
      '"num_key_value_heads": 8, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", '
      '"query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0, '
      '"attn_logit_softcapping": 50.0, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, '
      '"tie_word_embeddings": true, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}')
  run = subprocess.run(
      [sys.executable, "experiments/train.py", "--config=configs/gemma9b_l20.py", "--dry_run",
       f"--config.lm.model_path={tmp_path / 'gemma'}", "--config.train.batch_size=256",
       "--config.mesh.model=8"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert run.returncode == 0, run.stderr[-2000:]
  assert "42 layers, d_model 3584, 9.24B parameters" in run.stdout  # the published 9.24B
  assert "resid_post.20 has width 3584" in run.stdout
  assert "params          0.438 GiB" in run.stdout
