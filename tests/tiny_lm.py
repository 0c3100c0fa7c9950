"""A tiny random LM and word-level tokenizer, so harvest and evaluation tests run in seconds."""
import functools

import jax
import numpy as np
import tokenizers

from jumprelu.lm import model, text

VOCAB = 300


@functools.cache  # one build per test session: the tokenizer reads the stdlib docstrings
def tiny_lm():
  """A 2-layer random Llama-family LM and a word-level tokenizer over the stdlib docstrings."""
  words = {}
  for doc in list(text.stdlib_docstrings())[:400]:
    for w in doc.split():
      words[w] = words.get(w, 0) + 1
  top = sorted(words, key=lambda w: (-words[w], w))[:VOCAB - 3]
  vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(top)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  cfg = model.LMConfig(family="llama", vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2,
                       n_kv_heads=1, head_dim=8, d_ff=32, bos_id=1, eos_id=2, pad_id=2)
  shapes = {"pre_attn_norm_D": (16,), "q_DxHDh": (16, 16), "k_DxKDh": (16, 8),
            "v_DxKDh": (16, 8), "o_HDhxD": (16, 16), "pre_mlp_norm_D": (16,),
            "gate_DxF": (16, 32), "up_DxF": (16, 32), "down_FxD": (32, 16)}
  keys = iter(jax.random.split(jax.random.key(0), 20))
  layers = {k: (1.0 + 0.1 * jax.random.normal(next(keys), (2, *s))) if len(s) == 1 else
            0.3 * jax.random.normal(next(keys), (2, *s)) for k, s in shapes.items()}
  params = {"embed_VxD": jax.random.normal(next(keys), (VOCAB, 16)),
            "final_norm_D": np.ones(16, np.float32), "layers": layers}
  return params, cfg, tok, "tiny-random"


def write_hf_checkpoint(path, family: str = "llama", seed: int = 0, dtype=np.float32):
  """A tiny random Gemma 2 or (untied) Llama checkpoint directory as transformers lays it out
  (config.json, model.safetensors with torch's [out, in] weights, tokenizer.json), written
  without torch; returns its LMConfig. 4 query heads over 2 KV heads, vocabulary 256."""
  import json
  import os

  from safetensors.numpy import save_file

  from jumprelu.lm import load

  config = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, rope_theta=500.0, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if family == "gemma2":
    config |= dict(model_type="gemma2", num_hidden_layers=3, query_pre_attn_scalar=8,
                   sliding_window=5, attn_logit_softcapping=5.0, final_logit_softcapping=8.0,
                   hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
  else:
    config |= dict(model_type="llama", num_hidden_layers=2, hidden_act="silu",
                   tie_word_embeddings=False)
  cfg = load._hf_config(config)
  rng = np.random.RandomState(seed)
  tensors = {}
  for key, name in jax.tree_util.tree_leaves_with_path(load.hf_names(cfg)):
    shape = model.param_shapes(cfg)
    for k in key:
      shape = shape[k.key]
    names = [name.format(i=i) for i in range(cfg.n_layers)] if "{i}" in name else [name]
    for n in names:
      one = shape[1:] if "{i}" in name else shape
      if len(one) == 1:  # norms: Gemma stores an offset from 1
        w = (0.0 if family == "gemma2" else 1.0) + 0.3 * rng.randn(*one)
      elif n == "model.embed_tokens.weight":
        w = rng.randn(*one)
      else:  # torch's nn.Linear layout: [out, in]
        w = 0.2 * rng.randn(*one[::-1])
      tensors[n] = w.astype(dtype)
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(os.path.join(path, "tokenizer.json"))
  return cfg
