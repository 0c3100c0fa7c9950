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
