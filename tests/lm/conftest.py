"""Session fixtures: SmolLM2-135M loaded once by our loader and once by transformers."""

import functools
import os
from unittest import mock

import pytest

from jumprelu.lm import gguf_file, load


@pytest.fixture(scope="session")
def smollm2_path():
  try:
    return load.default_model_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
  """(params, cfg, tokenizer) from our GGUF loader."""
  return gguf_file.load_gguf(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_path):
  """transformers' own fp32 load of the same GGUF: the parity reference."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate")  # transformers needs it to load a GGUF.
  gguf = pytest.importorskip("gguf")
  folder, name = os.path.split(smollm2_path)
  # SmolLM2-135M's published config, written out rather than read from the GGUF: it is
  # independent of our loader and spares transformers a second slow parse of the file.
  config = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
      rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
      tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
  # transformers rebuilds the same (pure) tensor-name table for every submodule; memoising it
  # cuts ~8 s from the load and changes nothing else.
  with mock.patch.object(
      gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map)):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, config=config, dtype=torch.float32)
  return model.eval()
