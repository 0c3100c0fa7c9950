"""GGUF files (llama.cpp's format): weights dequantised to float, the tokenizer from the file's
metadata, and what the file says about the model it was converted from (no torch)."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from jumprelu.lm.model import LMConfig


def info(path: str) -> dict:
  """load.model_info of a .gguf file, parsed once per path (a header parses in seconds)."""
  key = os.path.abspath(path)
  if key not in _MODEL_INFO:
    import gguf  # the package, imported only when a GGUF file is read
    _MODEL_INFO[key] = _gguf_info(gguf.GGUFReader(path).fields, path)
  return _MODEL_INFO[key]


_MODEL_INFO = {}  # abspath -> model_info; load_gguf fills it (a GGUF's header parses in seconds)
# llama.cpp names its files NAME.QUANT.gguf or NAME-QUANT.gguf (Q4_1, Q8_0, IQ4_XS, F16, ...)
_QUANT_SUFFIX = re.compile(r"[.-]((?:I?Q\d\w*)|F16|F32|BF16)$", re.IGNORECASE)


def _hf_id(url: str) -> str | None:
  m = re.match(r"https?://huggingface\.co/([^/\s]+/[^/\s]+)", url or "")
  return m.group(1) if m else None


def _gguf_info(fields, path: str) -> dict:
  """model_info from GGUF metadata: the Hugging Face repository it was converted from
  (general.source.*), else general.organization / the file name without its quantisation, which
  is what the embedded SmolLM2 file gives (HuggingFaceTB/SmolLM2-135M-Instruct). The
  general.base_model.* keys name the model a fine-tune started from, so they are not used."""
  text = lambda key: str(fields[key].contents()) if key in fields else ""
  stem = _QUANT_SUFFIX.sub("", os.path.basename(path)[:-len(".gguf")])
  org = text("general.organization")
  name = (_hf_id(text("general.source.repo_url")) or _hf_id(text("general.source.url")) or
          (f"{org}/{stem}" if org else stem))
  quant = None
  if "general.file_type" in fields:
    import gguf
    try:
      quant = gguf.LlamaFileType(int(fields["general.file_type"].contents())).name
      quant = quant.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:  # a file type newer than this gguf package
      quant = None
  if quant is None:
    m = _QUANT_SUFFIX.search(os.path.basename(path)[:-len(".gguf")])
    quant = m.group(1).upper() if m else None
  if quant in ("F32", "F16", "BF16"):  # float weights: not a quantisation
    quant = None
  return {"model_name": name, "model_quantization": quant, "model_file": os.path.basename(path)}



def _unpermute_qk(w_OxI, n_head: int):
  """Undoes convert_hf_to_gguf's permute(), which interleaves the two RoPE halves of each head."""
  O = w_OxI.shape[0]
  return w_OxI.reshape(n_head, O // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w_OxI.shape)


def _gguf_tokenizer(fields) -> tokenizers.Tokenizer:
  """Byte-level BPE tokenizer from the `tokenizer.ggml.*` metadata, as llama.cpp splits text."""
  model = fields["tokenizer.ggml.model"].contents()
  if model != "gpt2":
    raise ValueError(
        f"Unsupported GGUF tokenizer.ggml.model {model!r}; only 'gpt2' (byte-level BPE) is "
        "supported. Load the Hugging Face checkpoint directory with load_hf instead.")
  pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else "default"
  if pre in ("default", "gpt2"):
    pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  elif pre in ("smollm", "starcoder", "refact"):
    # llama.cpp isolates every digit before the GPT-2 split, as the HF tokenizer.json of these
    # models does with a Digits(individual_digits=True) pre-tokenizer.
    pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
  else:
    raise ValueError(
        f"Unsupported GGUF tokenizer.ggml.pre {pre!r}; supported: 'gpt2', 'smollm', 'starcoder', "
        "'refact'. Load the Hugging Face checkpoint directory with load_hf instead.")

  tokens = fields["tokenizer.ggml.tokens"].contents()
  token_types = fields["tokenizer.ggml.token_type"].contents()
  merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = tokenizers.decoders.ByteLevel()
  # Control tokens (type 3) must match whole, e.g. "<|endoftext|>", not be cut into bytes.
  tok.add_special_tokens([
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t, kind in zip(tokens, token_types) if kind == 3])
  return tok


def load_gguf(path: str, param_dtype=jnp.float32):
  """(params, cfg, tokenizer) from a llama-architecture GGUF file, dequantised to param_dtype."""
  import gguf  # Only GGUF loading needs it.

  reader = gguf.GGUFReader(path)
  fields = reader.fields
  _MODEL_INFO[os.path.abspath(path)] = _gguf_info(fields, path)
  arch = fields["general.architecture"].contents()
  if arch != "llama":
    raise ValueError(
        f"Unsupported GGUF general.architecture {arch!r} in {path}; only 'llama' is supported. "
        "For Gemma 2 load the Hugging Face checkpoint directory with load_hf.")

  def meta(key, default=None):
    name = f"{arch}.{key}"
    if name in fields:
      return fields[name].contents()
    if default is None:
      raise KeyError(f"GGUF {path} lacks metadata key {name!r}.")
    return default

  scaling = meta("rope.scaling.type", "none")
  if scaling != "none":
    raise ValueError(f"Unsupported GGUF {arch}.rope.scaling.type {scaling!r}; expected 'none'.")
  tensors = {t.name: t for t in reader.tensors}
  d_model = int(meta("embedding_length"))
  n_heads = int(meta("attention.head_count"))
  head_dim = int(meta("attention.key_length", d_model // n_heads))
  if int(meta("rope.dimension_count", head_dim)) != head_dim:
    raise ValueError(
        f"Partial RoPE is unsupported: {arch}.rope.dimension_count "
        f"{meta('rope.dimension_count')} != head_dim {head_dim}.")

  def token_id(key):
    name = f"tokenizer.ggml.{key}"
    return int(fields[name].contents()) if name in fields else None

  cfg = LMConfig(
      family="llama",
      vocab_size=len(fields["tokenizer.ggml.tokens"].data),
      d_model=d_model,
      n_layers=int(meta("block_count")),
      n_heads=n_heads,
      n_kv_heads=int(meta("attention.head_count_kv", n_heads)),
      head_dim=head_dim,
      d_ff=int(meta("feed_forward_length")),
      rope_base=float(meta("rope.freq_base", 10_000.0)),
      norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in tensors,
      mlp_act="silu",
      bos_id=token_id("bos_token_id"),
      eos_id=token_id("eos_token_id"),
      pad_id=token_id("padding_token_id"),
  )

  used = set()

  def get(name, transpose=True):
    """Dequantised tensor in torch layout [out, in], returned as [in, out]."""
    if name not in tensors:
      raise KeyError(f"GGUF {path} lacks tensor {name!r}.")
    used.add(name)
    t = tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    if name.endswith("attn_q.weight"):
      w = _unpermute_qk(w, cfg.n_heads)
    elif name.endswith("attn_k.weight"):
      w = _unpermute_qk(w, cfg.n_kv_heads)
    return w.T if transpose else w

  layers = []
  for i in range(cfg.n_layers):
    b = f"blk.{i}."
    layers.append({
        "pre_attn_norm_D": get(b + "attn_norm.weight", transpose=False),
        "q_DxHDh": get(b + "attn_q.weight"),
        "k_DxKDh": get(b + "attn_k.weight"),
        "v_DxKDh": get(b + "attn_v.weight"),
        "o_HDhxD": get(b + "attn_output.weight"),
        "pre_mlp_norm_D": get(b + "ffn_norm.weight", transpose=False),
        "gate_DxF": get(b + "ffn_gate.weight"),
        "up_DxF": get(b + "ffn_up.weight"),
        "down_FxD": get(b + "ffn_down.weight"),
    })
  params = {
      "embed_VxD": get("token_embd.weight", transpose=False),
      "layers": {k: np.stack([layer[k] for layer in layers]) for k in layers[0]},
      "final_norm_D": get("output_norm.weight", transpose=False),
  }
  if not cfg.tie_embeddings:
    params["unembed_DxV"] = get("output.weight")
  if params["embed_VxD"].shape != (cfg.vocab_size, cfg.d_model):
    raise ValueError(
        f"GGUF {path}: token_embd.weight has shape {params['embed_VxD'].shape}, expected "
        f"(vocab_size, d_model) = {(cfg.vocab_size, cfg.d_model)}.")
  params = jax.tree.map(lambda w: jnp.asarray(w, param_dtype), params)
  # rope_freqs.weight would mean llama3-style frequency scaling, which we do not implement.
  unused = sorted(set(tensors) - used)
  if unused:
    raise ValueError(f"GGUF {path} has tensors this loader does not understand: {unused[:8]}.")
  return params, cfg, _gguf_tokenizer(fields)
