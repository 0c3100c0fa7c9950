"""scripts/aot_tpu.py compiles a tiny config's every program for a real TPU topology (libtpu's
compile-only devices: no TPU needed), and its rows add up."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny Gemma 2 (2 layers, 4 query heads over 2 KV heads): config.json alone, no weights.
TINY_GEMMA = {"model_type": "gemma2", "vocab_size": 256, "hidden_size": 16,
              "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 8,
              "query_pre_attn_scalar": 8, "attn_logit_softcapping": 50.0,
              "final_logit_softcapping": 30.0, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0}
ROW = re.compile(r"^(\w+)\s+" + r"\s+".join([r"(-?[\d.]+|nan)"] * 10) + r"\s+(\S+)\s+(.*)$")


def _run(tmp_path, *flags):
  (tmp_path / "lm").mkdir()
  (tmp_path / "lm" / "config.json").write_text(json.dumps(TINY_GEMMA))
  cmd = [sys.executable, os.path.join(REPO, "scripts", "aot_tpu.py"),
         "--config=" + os.path.join(REPO, "configs", "tiny.py") + ":harvest",
         f"--config.lm.model_path={tmp_path / 'lm'}", "--config.lm.model_parallel=2",
         "--config.lm.param_dtype=bfloat16", "--config.mesh.model=4",
         "--config.eval.batch_contexts=2", f"--json={tmp_path / 'rows.json'}", *flags]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no faked CPU devices
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout, json.loads((tmp_path / "rows.json").read_text())


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu is not installed (pip install "libtpu==0.0.42.*", in the test '
                    "extra on Linux x86-64): it compiles for TPU topologies without a TPU")
def test_every_program_compiles_for_a_v5e_topology(tmp_path):
  stdout, rows = _run(tmp_path, "--topology=v5e:2x2", "--sweep=2", "--live")
  lines = stdout.splitlines()
  printed = {m[1]: m for m in map(ROW.match, lines) if m}
  assert list(printed) == ["harvest", "train", "sweep", "live", "eval_clean", "eval_sae"]
  assert [r["program"] for r in rows] == list(printed)
  for r in rows:
    m = printed[r["program"]]
    assert r["temporaries"] >= 0 and r["flops"] > 0 and r["ideal_flops"] > 0, r
    assert r["total"] == r["arguments"] + r["temporaries"] + r["outputs"]
    assert float(m[5]) == pytest.approx(r["total"] / 2**30, abs=1e-3)  # the printed total
    assert r["hbm"] == 16 * 2**30  # a v5e chip, one device per chip
    # XLA pads small arrays to its tiles: never fewer bytes than the shards hold
    assert r["arguments"] >= r["argument_shards"] > 0
  # The LM's bfloat16 params split over lm.model_parallel=2, worked out from config.json by
  # hand: embed 256x16/2; per layer q, o, gate, up, down 16x32/2 each, k, v 16x16/2, 4 norms of
  # 16 (replicated); the final norm 16. Plus the tokens: 4 contexts over "data"=2, 16 int32.
  lm = 256 * 16 // 2 + 2 * (5 * 16 * 32 // 2 + 2 * 16 * 16 // 2 + 4 * 16) + 16
  harvest = rows[0]
  assert harvest["argument_shards"] == 2 * lm + 4 // 2 * 16 * 4
  # The sweep holds two SAEs' state: twice the one SAE's, the batch and scalars aside.
  train, sweep = rows[1], rows[2]
  batch = 64 * 16 * 4
  assert sweep["argument_shards"] - batch == pytest.approx(
      2 * (train["argument_shards"] - batch), abs=64)
  assert sweep["ideal_flops"] == 2 * train["ideal_flops"] == 2 * 12 * 64 * 16 * 64 / 4
  # The layer loop counted once per layer: the harvest (2 layers) > one layer's FLOPs
  assert harvest["flops"] >= harvest["ideal_flops"]
  top = max(r["total"] for r in rows) / 2**30
  assert lines[-1] == f"max_device_GiB={top:.3f} hbm_GiB=16.0 fits=True"
  assert all(not math.isnan(r["cost_model_s"]) for r in rows)


def test_auto_step_picks_per_platform():
  from jumprelu import sparse
  from tests.conftest import tiny
  c = tiny(**{"train.step_impl": "auto"})
  assert sparse.choose_step_impl(c, "cpu")[0] == "sparse"
  impl, why = sparse.choose_step_impl(c, "tpu")
  assert impl == "dense" and "25 minutes" in why
  assert sparse.choose_step_impl(c, "gpu")[0] == "dense"
  # only the single JumpReLU SAE with the paper's loss has a sparse step
  assert sparse.choose_step_impl(tiny(**{"train.step_impl": "auto", "sae.arch": "topk"}),
                                 "cpu")[0] == "dense"
  swept = tiny(**{"train.step_impl": "auto", "sweep.sparsity_coefficient": (1e-3, 2e-3)})
  assert sparse.choose_step_impl(swept, "cpu")[0] == "dense"
  for key, value in (("sae.bandwidth_rule", "adaptive"), ("sae.pre_relu", False)):
    assert sparse.choose_step_impl(tiny(**{"train.step_impl": "auto", key: value}),
                                   "cpu")[0] == "dense", key  # the sparse step has neither
  # a set value is kept; "auto" is replaced in a copy, the config itself untouched
  assert sparse.choose_step_impl(tiny(**{"train.step_impl": "dense"}), "cpu")[0] == "dense"
  resolved = sparse.resolve_step_impl(c, "tpu")
  assert resolved.train.step_impl == "dense" and c.train.step_impl == "auto"
