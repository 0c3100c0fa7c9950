"""Which features of an SAE fire on a text: per token, the active features and their magnitudes.

Any SAE export.load reads (our params.npz of every architecture, Gemma Scope files, SAELens
folders) acting on raw activations at the config's lm.site, through the run's LM. The positions
training never sees (BOS, EOS, padding and the first lm.skip_positions after BOS, see
lm.activations.keep_mask) get no features: their activations are not what the SAE was fitted on
(SmolLM2's attention sinks alone would show hundreds of features).

  rows = feature_acts.features_on(c, "DIR/export/params.npz", "The quick brown fox")
  print(feature_acts.describe(rows))
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jumprelu import arch as arch_lib
from jumprelu import export
from jumprelu.lm import activations as lm_act
from jumprelu.lm import model

# Prompts are padded to a multiple of this many tokens: one compiled shape per length bucket.
LENGTH_BUCKET = 32


def load_sae(sae) -> tuple[str, int | None, dict]:
  """(architecture, TopK's k or None, jnp arrays) of a path export.load reads or raw params."""
  raw = export.load(sae) if isinstance(sae, str) else sae
  name, k, arrays = arch_lib.split_raw(raw)
  return name, k, {n: jnp.asarray(v, jnp.float32) for n, v in arrays.items()}


def sae_input_width(arrays: dict) -> int:
  """D, the activation width the SAE reads (W_enc, or the Gated SAE's W_gate, is [D, F])."""
  return int(arrays["W_enc" if "W_enc" in arrays else "W_gate"].shape[0])


def sae_width(arrays: dict) -> int:
  """F, the number of features."""
  return int(arrays["W_dec"].shape[0])


def check_site(c, cfg, arrays: dict, what: str = "the SAE") -> None:
  """Refuses an SAE whose input width is not lm.site's width, naming both."""
  width = model.site_width(cfg, model.parse_site(c.lm.site))
  if sae_input_width(arrays) != width:
    raise ValueError(f"{what} reads activations of width {sae_input_width(arrays)}, but "
                     f"lm.site={c.lm.site!r} of this LM has width {width}; set lm.site (and "
                     "lm.model_path) to the site the SAE was trained on")


def _forward_features(cfg, site, skip_positions: int, arch: str, k: int | None):
  """(LM params, SAE arrays, tokens [B, L]) -> (activations [B, L, W], features [B, L, F],
  kept [B, L]); the features of positions that are not kept are 0."""
  forward = functools.partial(model.forward, cfg=cfg, site=site, stop_at_site=True)

  def run(lm_params, sae_arrays, tokens_BxL):
    x_BxLxW = forward(lm_params, tokens_BxL=tokens_BxL)[1].astype(jnp.float32)
    keep_BxL = lm_act.keep_mask(cfg, tokens_BxL, skip_positions)
    f_BxLxF = arch_lib.features(sae_arrays, x_BxLxW, arch=arch, k=k)
    return x_BxLxW, jnp.where(keep_BxL[..., None], f_BxLxF, 0.0), keep_BxL

  return run


@functools.cache
def encoder(cfg, site, skip_positions: int, arch: str, k: int | None):
  """Jitted (LM params, SAE arrays, tokens [B, L]) -> (features [B, L, F], kept [B, L])."""
  run = _forward_features(cfg, site, skip_positions, arch, k)
  return jax.jit(lambda lm_params, sae_arrays, tokens: run(lm_params, sae_arrays, tokens)[1:])


@functools.cache
def _encoder_with_inputs(cfg, site, skip_positions: int, arch: str, k: int | None):
  return jax.jit(_forward_features(cfg, site, skip_positions, arch, k))


def pad_id(cfg) -> int:
  """The token that fills a short context (never kept by keep_mask)."""
  for special in (cfg.pad_id, cfg.eos_id, cfg.bos_id):
    if special is not None:
      return special
  raise ValueError("the LM declares no pad, EOS or BOS token to pad contexts with")


def tokenize(cfg, tokenizer, text: str) -> np.ndarray:
  """int32 tokens of `text` as training packs a document: BOS first, no other special tokens."""
  ids = tokenizer.encode(text, add_special_tokens=False).ids
  return np.asarray(([cfg.bos_id] if cfg.bos_id is not None else []) + list(ids), np.int32)


def token_strings(tokenizer, ids) -> list[str]:
  """Each token decoded on its own (a byte-level piece of a longer character may show as �)."""
  return tokenizer.decode_batch([[int(i)] for i in ids], skip_special_tokens=False)


def features_on(c, sae, text_or_tokens, *, lm=None, min_value: float = 0.0) -> list[dict]:
  """Per token of a text (or of given token ids, used as they are), the features of `sae`
  that fire on it, largest first.

  sae: a path export.load reads, or raw-unit params (export.raw_params). lm: load_lm(c)'s
  tuple (default: loaded from c). Returns one dict per token: position, token_id, token (its
  text), kept (False where training skips the position: no features), features (ids) and
  values (magnitudes in the SAE's units), both sorted by value, descending, above min_value."""
  lm_params, cfg, tokenizer, _ = lm_act.load_lm(c) if lm is None else lm
  name, k, arrays = load_sae(sae)
  check_site(c, cfg, arrays)
  if isinstance(text_or_tokens, str):
    tokens_L = tokenize(cfg, tokenizer, text_or_tokens)
  else:
    tokens_L = np.asarray(text_or_tokens, np.int32).reshape(-1)
  n = len(tokens_L)
  if n == 0:
    return []
  padded = -(-n // LENGTH_BUCKET) * LENGTH_BUCKET  # causal: padding after n changes nothing
  tokens_1xL = np.full((1, padded), pad_id(cfg), np.int32)
  tokens_1xL[0, :n] = tokens_L
  run = encoder(cfg, model.parse_site(c.lm.site), c.lm.skip_positions, name, k)
  f_LxF, keep_L = (np.asarray(a)[0, :n] for a in run(lm_params, arrays, tokens_1xL))
  pieces = token_strings(tokenizer, tokens_L)
  rows = []
  for pos in range(n):
    active = np.flatnonzero(f_LxF[pos] > min_value)
    order = active[np.argsort(-f_LxF[pos, active], kind="stable")]
    rows.append({"position": pos, "token_id": int(tokens_L[pos]), "token": pieces[pos],
                 "kept": bool(keep_L[pos]), "features": order.tolist(),
                 "values": f_LxF[pos, order].astype(float).tolist()})
  return rows


def describe(rows: list[dict], top: int = 5) -> str:
  """A text table: each token, its feature count, and its `top` largest features."""
  lines = [f"{'pos':>4}  {'token':<16} {'L0':>4}  top features (id: value)"]
  for r in rows:
    shown = ", ".join(f"{f}: {v:.3g}" for f, v in zip(r["features"][:top], r["values"][:top]))
    count = len(r["features"]) if r["kept"] else "-"
    lines.append(f"{r['position']:>4}  {r['token']!r:<16} {count:>4}  "
                 f"{shown if r['kept'] else '(skipped, as in training)'}")
  return "\n".join(lines)


def site_and_features(c, lm, sae, tokens_NxL, batch: int | None = None):
  """Per batch of lm.batch_contexts rows (the last one padded, then cut), numpy (rows,
  activations [b, L, W], features [b, L, F], kept [b, L]): callers keep what they need, so
  N × L × F features never sit on the host at once. sae = load_sae(...)'s triple."""
  lm_params, cfg = lm[0], lm[1]
  name, k, arrays = sae
  batch = batch or c.lm.batch_contexts
  run = _encoder_with_inputs(cfg, model.parse_site(c.lm.site), c.lm.skip_positions, name, k)
  tokens_NxL = np.asarray(tokens_NxL, np.int32)
  for lo in range(0, len(tokens_NxL), batch):
    rows = np.arange(lo, min(lo + batch, len(tokens_NxL)))
    tokens_BxL = np.full((batch, tokens_NxL.shape[1]), pad_id(cfg), np.int32)
    tokens_BxL[:len(rows)] = tokens_NxL[rows]
    x, f, keep = jax.device_get(run(lm_params, arrays, tokens_BxL))
    yield rows, x[:len(rows)], f[:len(rows)], keep[:len(rows)]


def held_out(c, cfg, tokenizer, first: int, num: int) -> np.ndarray:
  """Contexts first .. first + num − 1 of the packed text [num, lm.context_len]; refuses a
  text that ends before, with the count it has."""
  got = list(itertools.islice(lm_act.contexts(c, cfg, tokenizer), first, first + num))
  if len(got) < num:
    raise ValueError(
        f"text.source {c.text.source!r} yields {first + len(got)} contexts of "
        f"{c.lm.context_len} tokens, but contexts {first}..{first + num - 1} are needed "
        f"(--skip_contexts={first} --num_contexts={num}); lower --num_contexts or "
        "--skip_contexts (past the contexts training read), or use a longer text")
  return np.stack(got)
