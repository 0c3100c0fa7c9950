"""The LM as the job uses it: loaded once per config, the text packed into contexts, which
positions count, and a jitted forward to a site. Harvest, live training, evaluation and the
feature tools all go through here."""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu.lm import load, model, text


def load_lm(c):
  """(params, cfg, tokenizer, model name) for config key lm.model_path ("" = SmolLM2-135M)."""
  return _load_lm(c.lm.model_path or load.default_model_path(), c.lm.dtype, c.lm.bos_id,
                  c.lm.eos_id)


@functools.cache  # harvest, live training and evaluation in one job share one load
def _load_lm(path: str, dtype: str, bos_id: int, eos_id: int):
  params, cfg, tokenizer = load.load(path)
  cfg = dataclasses.replace(cfg, dtype=dtype, bos_id=cfg.bos_id if bos_id < 0 else bos_id,
                            eos_id=cfg.eos_id if eos_id < 0 else eos_id)
  return params, cfg, tokenizer, os.path.basename(os.path.normpath(path))


@functools.cache
def _stdlib_docs() -> tuple[str, ...]:
  return tuple(text.stdlib_docstrings())  # imports the whole standard library: do it once


def documents(c):
  """The text documents named by text.source: stdlib | files | hf."""
  if c.text.source == "stdlib":
    return iter(_stdlib_docs())
  if c.text.source == "files":
    return text.local_files(c.text.path, field=c.text.field)
  if c.text.source == "hf":
    return text.hf_dataset(c.text.path, c.text.split, field=c.text.field)
  raise ValueError(f"text.source must be one of ('stdlib', 'files', 'hf'), got {c.text.source!r}")


def contexts(c, cfg, tokenizer):
  """Packed int32 contexts [lm.context_len], BOS first, in a fixed order."""
  return text.pack(documents(c), tokenizer, c.lm.context_len, cfg.bos_id, cfg.eos_id)


def keep_mask(cfg, tokens_BxL, skip_positions: int = 0):
  """Positions whose activations are used: not BOS, EOS or padding, nor the first
  `skip_positions` after BOS. Works on numpy and jax arrays."""
  keep_BxL = text.harvest_mask(tokens_BxL, cfg.bos_id, cfg.eos_id, cfg.pad_id)
  if skip_positions:
    keep_BxL = keep_BxL & (np.arange(tokens_BxL.shape[1]) > skip_positions)
  return keep_BxL


def context_rows(c, forward, params, cfg, batch: list) -> list[np.ndarray]:
  """Each context's kept activations [n_i, W], from one forward over lm.batch_contexts contexts
  (a short batch is padded by repeating its last context: one compiled shape, same values)."""
  tokens_BxL = np.stack(batch + [batch[-1]] * (c.lm.batch_contexts - len(batch)))
  acts_BxLxW = np.asarray(forward(params, tokens_BxL))
  keep_BxL = keep_mask(cfg, tokens_BxL, c.lm.skip_positions)
  return [acts_BxLxW[b][keep_BxL[b]] for b in range(len(batch))]


@functools.cache
def site_fn(cfg, site):
  """Jitted tokens [B, L] -> activation [B, L, W] at `site`, stopping after its layer."""
  fwd = functools.partial(model.forward, cfg=cfg, site=site, stop_at_site=True)
  return jax.jit(lambda params, tokens: fwd(params, tokens_BxL=tokens)[1].astype(jnp.float32))


def model_name(c) -> str:
  """lm.model_path's file or folder name: what a harvested store's manifest records as "model"."""
  return os.path.basename(os.path.normpath(c.lm.model_path or load.default_model_path()))


def model_info(c) -> dict:
  """lm.model_path's Hugging Face id, quantisation and file name, for export metadata."""
  return load.model_info(c.lm.model_path or load.default_model_path())
