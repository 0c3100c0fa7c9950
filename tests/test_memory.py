"""The per-device memory report, against sizes worked out by hand."""
import os

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


def _gemma(**overrides):
  """configs/gemma9b_l20.py with --config.KEY=VALUE style overrides (in-process: no ~5 s of
  interpreter and JAX start-up per check)."""
  from configs import gemma9b_l20
  c = gemma9b_l20.get_config()
  for key, value in overrides.items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  return c


def test_script_prints_a_pod_layout():
  # scripts/memory.py --config=configs/gemma9b_l20.py --devices=8 --config.train.batch_size=512
  # prints memory.table(memory.report(c)); the suite already runs on 8 faked devices.
  text = memory.table(memory.report(_gemma(**{"train.batch_size": 512})))
  assert "{'data': 1, 'model': 8}" in text
  # 131072 × 3584 × 2 matrices split 8 ways, float32: 0.4375 GiB of params per device.
  assert "params          0.438 GiB" in text


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
  # train.py --dry_run prints memory.dry_run(c) for the config its flags give
  text = memory.dry_run(_gemma(**{"lm.model_path": str(tmp_path / "gemma"),
                                  "train.batch_size": 256, "mesh.model": 8}))
  assert "42 layers, d_model 3584, 9.24B parameters" in text  # the published 9.24B
  assert "resid_post.20 has width 3584" in text
  assert "params          0.438 GiB" in text
  # bfloat16 weights split over lm.model_parallel=4: embed rows, q/k/v/gate/up columns, o/down
  # rows; the 4 norms per layer and the final norm replicated.
  per_layer = (3584 * 4096 * 2 + 3584 * 2048 * 2 + 3 * 3584 * 14336) // 4 + 4 * 3584
  lm = (256000 * 3584 // 4 + 42 * per_layer + 3584) * 2
  assert f"LM params per device: {lm / 2**30:.2f} GiB (bfloat16, split over lm.model_parallel=4" \
      in text
  # 8B harvested tokens; evaluation reads 2,048 contexts of 1,024 past the first 8M
  # 8B harvested tokens of the train split; 2,048 × 1,024 held-out ones of the validation split
  assert ("text: the run reads up to 8B tokens of split 'train' and 2.1M of eval.split "
          "'validation'; text.source='hf' streams 'monology/pile-uncopyrighted'") in text
