"""What other tools load: Gemma Scope `params.npz` and SAELens 6 folders, to and from our params,
and the one place where normalisation is folded into the parameters (raw units).

Exports act on raw activations: a model trained on x / C has its biases (and θ) multiplied by C.
Per architecture (arch.py), numpy float32 arrays; all but JumpReLU's also hold `architecture`,
a 0-d string array naming it:
  jumprelu  W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], threshold [F]  (Gemma Scope layout)
  relu      W_enc, b_enc, W_dec, b_dec
  topk      W_enc, b_enc, W_dec, b_dec, k (0-d int32)
  batchtopk W_enc, b_enc, W_dec, b_dec, threshold: its inference SAE, a JumpReLU (SAELens: jumprelu)
  gated     W_gate, b_gate, r_mag, b_mag, W_dec, b_dec
A SAELens folder is
  cfg.json                  architecture, d_in, d_sae, dtype, ..., metadata {model_name (the
                            LM's Hugging Face id), model_quantization, dataset_path, ...}
  sae_weights.safetensors   the arrays above, under SAELens's names
  sparsity.safetensors      "sparsity": log10 firing density per feature [F] (optional)
as written by SAELens 6 (`SAE.save_model`) and read by `SAE.load_from_disk`. Every file is
written with files.atomic_write.
"""
import json
import os
import platform

import numpy as np
from safetensors.numpy import load_file, save_file

from jumprelu import arch, files, sae

GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_SCALED = ("b_enc", "b_dec", "b_gate", "b_mag", "threshold")  # pre-activation units: × C


# ----------------------------------------------------------------------------- raw units

def raw_params(arch_name: str, params: dict, norm_scale, k: int | None = None) -> dict:
  """numpy float32 params acting on raw activations, for a model trained on x / norm_scale.

  With x_n = x / C every pre-activation scales by C, so the biases (and θ) are multiplied by C
  and the weights, r_mag and the TopK ranking are unchanged. JumpReLU's θ is written explicitly
  (`threshold`), whichever way it was trained (sae.threshold_param)."""
  if arch_name in ("jumprelu", "batchtopk"):
    params = {**{n: params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")},
              "threshold": sae.threshold(params)}
  out = {n: (np.asarray(v, np.float32) * (float(norm_scale) if n in _SCALED else 1.0)
             ).astype(np.float32) for n, v in params.items()}
  if arch_name != "jumprelu":
    out["architecture"] = np.asarray(arch_name)
  if arch_name == "topk":
    out["k"] = np.asarray(k, np.int32)
  return out


# ----------------------------------------------------------------------------- SAELens

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
SAELENS_SPARSITY_KEY = "sparsity"
# SAELens reads a cfg.json whose metadata.sae_lens_version is below 6 as the old flat schema.
SAELENS_SCHEMA_VERSION = "6.0.0"
# SAELens adds this to the density before log10, so a feature that never fired reads -10.
LOG_DENSITY_EPS = 1e-10


def log10_density(density_F) -> np.ndarray:
  """SAELens's `sparsity` vector: log10(firing density + 1e-10), float32."""
  return np.log10(np.asarray(density_F, np.float64) + LOG_DENSITY_EPS).astype(np.float32)


# Our architecture -> SAELens's (6.x inference classes), and our raw-unit names -> its weights.
# BatchTopK's inference SAE is a JumpReLU with one threshold for every feature.
SAELENS_ARCH = {"jumprelu": "jumprelu", "relu": "standard", "gated": "gated", "topk": "topk",
                "batchtopk": "jumprelu"}
OUR_ARCH = {"jumprelu": "jumprelu", "standard": "relu", "gated": "gated", "topk": "topk"}
SAELENS_WEIGHT_NAMES = {
    "jumprelu": {k: k for k in GEMMA_SCOPE_KEYS},
    "batchtopk": {k: k for k in GEMMA_SCOPE_KEYS},
    "relu": {k: k for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
    "topk": {k: k for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
    "gated": {"W_gate": "W_enc", "b_gate": "b_gate", "r_mag": "r_mag", "b_mag": "b_mag",
              "W_dec": "W_dec", "b_dec": "b_dec"},
}


def saelens_cfg(d_in: int, d_sae: int, *, model_name: str, hook_name: str, context_size: int,
                dataset_path: str, prepend_bos: bool = True, exclude_special_tokens: bool = True,
                extra_metadata: dict | None = None, arch_name: str = "jumprelu",
                k: int | None = None) -> dict:
  """The cfg.json of an inference SAE in raw activation units (SAELens 6 schema)."""
  metadata = {
      "sae_lens_version": SAELENS_SCHEMA_VERSION,
      "model_name": model_name,
      "model_class_name": "HookedTransformer",
      "hook_name": hook_name,  # TransformerLens style, e.g. blocks.12.hook_resid_post
      "hook_head_index": None,
      "context_size": context_size,
      "dataset_path": dataset_path,
      "prepend_bos": prepend_bos,
      "exclude_special_tokens": exclude_special_tokens,
      "seqpos_slice": [None],
      "model_from_pretrained_kwargs": {},
      "trained_with": "jumprelu",
      **(extra_metadata or {}),
  }
  cfg = {
      "architecture": SAELENS_ARCH[arch_name],
      "d_in": int(d_in),
      "d_sae": int(d_sae),
      "dtype": "float32",
      "device": "cpu",
      # Our encoders read x directly (π = x·W_enc + b_enc), not x − b_dec; the Gated SAE's
      # paths read x − b_dec, as SAELens's do.
      "apply_b_dec_to_input": arch_name == "gated",
      # The export already acts on raw activations, so SAELens must not rescale them.
      "normalize_activations": "none",
      "reshape_activations": "hook_z" if hook_name.endswith("hook_z") else "none",
      "metadata": metadata,
  }
  if arch_name == "topk":
    cfg.update(k=int(k), rescale_acts_by_decoder_norm=False)
  return cfg


def save_saelens(directory: str, params_raw: dict, *, model_name: str, hook_name: str,
                 context_size: int, dataset_path: str, density_F=None, **cfg_kw) -> None:
  """Writes a SAELens 6 folder from raw-unit params (any architecture, raw_params);
  `density_F` (fraction of tokens on which each feature fires) becomes sparsity.safetensors.
  Each file is written atomically."""
  arch_name = arch.name_of(params_raw)
  names = SAELENS_WEIGHT_NAMES[arch_name]
  missing = [k for k in names if k not in params_raw]
  if missing:
    raise KeyError(f"params lack {missing}; pass export.raw_params(...) (raw units, an explicit "
                   "threshold for JumpReLU), not the training params")
  arrays = {names[k]: np.ascontiguousarray(params_raw[k], np.float32) for k in names}
  d_in, d_sae = arrays["W_enc"].shape
  k = int(params_raw["k"]) if arch_name == "topk" else None
  cfg = saelens_cfg(d_in, d_sae, model_name=model_name, hook_name=hook_name,
                    context_size=context_size, dataset_path=dataset_path, arch_name=arch_name,
                    k=k, **cfg_kw)
  os.makedirs(directory, exist_ok=True)
  files.atomic_write(os.path.join(directory, SAELENS_WEIGHTS), lambda p: save_file(arrays, p))
  sparsity_path = os.path.join(directory, SAELENS_SPARSITY)
  if density_F is not None:
    sparsity = {SAELENS_SPARSITY_KEY: log10_density(density_F)}
    files.atomic_write(sparsity_path, lambda p: save_file(sparsity, p))
  elif os.path.exists(sparsity_path):  # from an earlier export of other weights
    os.remove(sparsity_path)

  def write_cfg(p):
    with open(p, "w") as fh:
      json.dump(cfg, fh, indent=1)
  files.atomic_write(os.path.join(directory, SAELENS_CFG), write_cfg)  # last: a cfg.json has weights


def dataset_path(text: str, python_version: str | None = None) -> str:
  """SAELens's dataset_path for the text a store was harvested from ("SOURCE:PATH", as in its
  manifest): the dataset name (hf), the glob (files), or for stdlib, which no hub holds,
  "python-stdlib-docstrings (Python X.Y.Z)": the docstrings differ between Python versions."""
  source, _, path = text.partition(":")
  if source != "stdlib":
    return path
  return "python-stdlib-docstrings" + (f" (Python {python_version})" if python_version else "")


def save_saelens_for_run(c, directory: str, params_raw: dict, density_F, norm_scale,
                         manifest: dict | None = None, lm_info: dict | None = None) -> None:
  """save_saelens with the metadata in config section `export`; keys left empty there come from
  the LM the activations came from (`lm_info`: lm.activations.model_info, when known) and the
  activation store's manifest (a harvest records its model, hook and context length)."""
  spec = (manifest or {}).get("spec", {})
  lm_info = lm_info or {}
  if c.data.source in ("harvest", "live"):  # this process read the text
    dataset = dataset_path(f"{c.text.source}:{c.text.path}", platform.python_version())
  else:
    dataset = dataset_path(spec["text"]) if spec.get("text") else c.data.path
  save_saelens(directory, params_raw, density_F=density_F,
               model_name=c.export.model_name or lm_info.get("model_name") or spec.get("model", ""),
               hook_name=c.export.hook_name or spec.get("hook_name", ""),
               context_size=c.export.context_size or spec.get("context_len", 0),
               dataset_path=c.export.dataset_path or dataset,
               extra_metadata={"normalization_scale": float(norm_scale),
                               "sparsity_coefficient": c.sae.sparsity_coefficient,
                               "density_tokens": c.export.density_batches * c.train.batch_size,
                               # e.g. "Q4_1": activations of a quantised model, not the original
                               "model_quantization": lm_info.get("model_quantization"),
                               "model_file": lm_info.get("model_file")})


def load_saelens(directory: str) -> tuple[dict, dict]:
  """A SAELens folder (jumprelu, standard, gated or topk) as (our raw-unit params, its cfg).

  apply_b_dec_to_input=True (SAELens encodes x − b_dec) is folded into b_enc (the Gated SAE
  reads x − b_dec itself, so it must be True there); an SAE that rescales its inputs at run
  time cannot be expressed as fixed params and is refused.
  """
  with open(os.path.join(directory, SAELENS_CFG)) as fh:
    cfg = json.load(fh)
  theirs = cfg.get("architecture", "standard")
  ours = OUR_ARCH.get(theirs)
  if ours is None:
    raise ValueError(f"{directory}/cfg.json has architecture {theirs!r}; jumprelu loads "
                     f"{sorted(OUR_ARCH)}")
  if ours == "topk" and not isinstance(cfg.get("k"), int):
    raise ValueError(f"{directory}/cfg.json of a topk SAE must give k, an int; got "
                     f"{cfg.get('k')!r}")
  if ours == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
    raise ValueError(f"{directory}/cfg.json has rescale_acts_by_decoder_norm=True, which "
                     "jumprelu's TopK SAE does not apply")
  norm = cfg.get("normalize_activations") or "none"
  if norm != "none":
    raise ValueError(f"{directory}/cfg.json has normalize_activations={norm!r}: SAELens rescales "
                     "its inputs at run time, which fixed params cannot express; fold the scale "
                     "in with SAELens (sae.fold_activation_norm_scaling_factor) and save again")
  state = load_file(os.path.join(directory, SAELENS_WEIGHTS))
  if "log_threshold" in state and "threshold" not in state:  # a SAELens training checkpoint
    state["threshold"] = np.exp(state.pop("log_threshold"))
  scale = state.pop("scaling_factor", state.pop("finetuning_scaling_factor", None))
  if scale is not None and not np.allclose(scale, 1.0):
    raise ValueError(f"{directory} has a finetuning scaling_factor that is not all ones; "
                     "SAELens applies it to the features, which jumprelu.sae does not")
  names = SAELENS_WEIGHT_NAMES[ours]
  missing = [theirs_name for theirs_name in names.values() if theirs_name not in state]
  if missing:
    raise KeyError(f"{directory}/{SAELENS_WEIGHTS} lacks {missing}; a SAELens {theirs!r} SAE "
                   f"has {sorted(names.values())}")
  params = {k: np.asarray(state[v], np.float32) for k, v in names.items()}
  b_dec_in = cfg.get("apply_b_dec_to_input", True)  # pre-6 configs default to True
  if ours == "gated" and not b_dec_in:
    raise ValueError(f"{directory}/cfg.json has apply_b_dec_to_input=False for a Gated SAE; "
                     "jumprelu's Gated SAE always reads x − b_dec")
  if ours != "gated" and b_dec_in:
    # (x − b_dec)·W_enc + b_enc = x·W_enc + (b_enc − b_dec·W_enc)
    params["b_enc"] = params["b_enc"] - params["b_dec"] @ params["W_enc"]
  if ours != "jumprelu":
    params["architecture"] = np.asarray(ours)
  if ours == "topk":
    params["k"] = np.asarray(cfg["k"], np.int32)
  return params, cfg


def load_saelens_density(directory: str) -> np.ndarray | None:
  """Firing density per feature [F] from sparsity.safetensors (undoing the log10), or None."""
  path = os.path.join(directory, SAELENS_SPARSITY)
  if not os.path.exists(path):
    return None
  log_F = load_file(path)[SAELENS_SPARSITY_KEY].astype(np.float64)
  return np.maximum(10.0 ** log_F - LOG_DENSITY_EPS, 0.0)


# ----------------------------------------------------------------------------- Gemma Scope

def load_gemma_scope(path: str) -> dict:
  """A Gemma Scope `params.npz` (also its lower-case `w_enc` spelling) as raw-unit params; also
  reads our exports of the other architectures (raw_params, marked by `architecture`)."""
  with np.load(path) as f:
    arrays = {("W_" + k[2:] if k.startswith("w_") else k): f[k] for k in f.files}
  name = arch.name_of(arrays)
  if name != "jumprelu":
    names = list(SAELENS_WEIGHT_NAMES[name]) + ["architecture"] + (["k"] if name == "topk" else [])
    missing = [k for k in names if k not in arrays]
    if missing:
      raise KeyError(f"{path} lacks {missing}; a {name} export has {names}")
    return {k: arrays[k] if k in ("architecture", "k") else np.asarray(arrays[k], np.float32)
            for k in names}
  scale = arrays.pop("scaling_factor", None)
  if scale is not None and not np.allclose(scale, 1.0):
    raise ValueError(f"{path} has a scaling_factor that is not all ones, which jumprelu.sae "
                     "does not apply")
  missing = [k for k in GEMMA_SCOPE_KEYS if k not in arrays]
  if missing:
    raise KeyError(f"{path} lacks {missing}; a Gemma Scope params.npz has "
                   f"{GEMMA_SCOPE_KEYS}")
  return {k: np.asarray(arrays[k], np.float32) for k in GEMMA_SCOPE_KEYS}


def load(path: str) -> dict:
  """Raw-unit params from a params.npz, a SAELens folder, or a folder holding a params.npz."""
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, SAELENS_CFG)):
      return load_saelens(path)[0]
    if os.path.exists(os.path.join(path, "params.npz")):
      return load_gemma_scope(os.path.join(path, "params.npz"))
    raise FileNotFoundError(f"{path} holds neither {SAELENS_CFG} (a SAELens folder) nor "
                            "params.npz (Gemma Scope)")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; give a params.npz or a SAELens folder")
  return load_gemma_scope(path)

