"""The feature browser of a finished run (or of any SAE export.load reads), top to bottom:
held-out text -> the LM to lm.site -> the SAE -> per-feature statistics kept on the device
(feature_examples.py) -> logit lens and decoder neighbours (directions.py) -> a static site
(browser_site.py) in DIR/browser/.

The text is the run's (config text.*), packed as training packed it, from the first context
training did not read (workdir.contexts_used) on: the examples are held out. One jitted step
per batch of lm.batch_contexts contexts runs the LM, the SAE and the statistics' update; only
the final statistics come to the host.
"""
import os
import time

import jax
import numpy as np
from absl import logging

from jumprelu import browser_site, directions, feature_acts, feature_examples, logs
from jumprelu import workdir as workdir_lib
from jumprelu.lm import activations as lm_act
from jumprelu.lm import model


def step_fn(cfg, site, skip_positions: int, arch: str, k, before: int, after: int):
  """Jitted (LM params, SAE arrays, stats, tokens [B, L], first context, rng) -> stats."""
  encode = feature_acts.encoder(cfg, site, skip_positions, arch, k)

  def step(lm_params, sae_arrays, stats, tokens_BxL, ctx0, rng):
    f_BxLxF, keep_BxL = encode(lm_params, sae_arrays, tokens_BxL)
    return feature_examples.update(stats, f_BxLxF, keep_BxL, ctx0, rng, before=before,
                                   after=after)

  return jax.jit(step, donate_argnums=(2,))


def collect(c, lm, sae, contexts_NxL: np.ndarray, *, top_k: int = 20, samples: int = 20,
            before: int = 24, after: int = 8, seed: int = 0, bar: bool = True) -> dict:
  """feature_examples statistics (on the host, sorted) of sae = (arch, k, arrays) over the
  contexts, in batches of lm.batch_contexts (the last one padded with padding tokens)."""
  lm_params, cfg = lm[0], lm[1]
  name, k, arrays = sae
  batch = c.lm.batch_contexts
  step = step_fn(cfg, model.parse_site(c.lm.site), c.lm.skip_positions, name, k, before, after)
  stats = feature_examples.init(feature_acts.sae_width(arrays), top_k, samples, before, after)
  n = len(contexts_NxL)
  pad = np.full((batch, contexts_NxL.shape[1]), feature_acts.pad_id(cfg), np.int32)
  rng = jax.random.key(seed)
  progress = logs.progress(n * contexts_NxL.shape[1], "browse", "tok", every_s=10.0, bar=bar)
  for lo in range(0, n, batch):
    tokens_BxL = pad.copy()
    tokens_BxL[:min(batch, n - lo)] = contexts_NxL[lo:lo + batch]
    stats = step(lm_params, arrays, stats, tokens_BxL, np.int32(lo),
                 jax.random.fold_in(rng, lo))
    stats["tokens"].block_until_ready()  # the bar counts computed tokens, not queued ones
    progress.update(min(batch, n - lo) * contexts_NxL.shape[1])
  stats = feature_examples.to_numpy(stats)  # waits for the last step
  progress.close()
  return stats


def vocabulary(tokenizer, vocab_size: int) -> list[str]:
  """The text of every token id (word-level tokenizers, which decode without spaces, get a
  leading space per word so that examples read as text)."""
  n = min(vocab_size, tokenizer.get_vocab_size())
  pieces = feature_acts.token_strings(tokenizer, range(n)) + [""] * (vocab_size - n)
  return [" " + p for p in pieces] if tokenizer.decoder is None else pieces


def build(c, workdir: str | None, *, params_path: str | None = None, out_dir: str | None = None,
          num_contexts: int = 256, skip_contexts: int | None = None, top_k: int = 20,
          samples: int = 20, before: int = 24, after: int = 8, neighbours: int = 8,
          lens_tokens: int = 10, seed: int = 0, lm=None, bar: bool = True) -> dict:
  """Writes the browser of the SAE at params_path (default DIR/export/params.npz) into
  out_dir (default DIR/browser); returns {"out_dir", "tokens" (kept), "lm_tokens" (through
  the LM), "seconds" (the streaming pass, compilation included), "tokens_per_s" (lm_tokens
  over seconds), "live", "width"}."""
  if params_path is None:
    if workdir is None:
      raise ValueError("give a run directory (--workdir) or an SAE (--params)")
    params_path = os.path.join(workdir, "export", "params.npz")
  out_dir = out_dir or os.path.join(workdir, "browser")
  lm = lm_act.load_lm(c) if lm is None else lm
  lm_params, cfg, tokenizer, model_name = lm
  sae = feature_acts.load_sae(params_path)
  feature_acts.check_site(c, cfg, sae[2], f"the SAE at {params_path}")
  first = workdir_lib.contexts_used(c, workdir) if skip_contexts is None else skip_contexts
  contexts = feature_acts.held_out(c, cfg, tokenizer, first, num_contexts)

  start = time.perf_counter()
  stats = collect(c, lm, sae, contexts, top_k=top_k, samples=samples, before=before,
                  after=after, seed=seed, bar=bar)
  seconds = time.perf_counter() - start
  site = model.parse_site(c.lm.site)
  W_dec = sae[2]["W_dec"]
  lens = directions.logit_lens(W_dec, lm_params, cfg, site, k=lens_tokens)
  nbr = directions.neighbours(W_dec, k=neighbours)
  meta = {"model": model_name, "site": c.lm.site, "arch": sae[0], "sae": params_path,
          "first_context": first, "contexts": num_contexts, "context_len": c.lm.context_len,
          "skip_positions": c.lm.skip_positions, "text": f"{c.text.source}:{c.text.path}"}
  specials = [t for t in (cfg.bos_id, cfg.eos_id, cfg.pad_id) if t is not None]
  summ = browser_site.write(out_dir, meta=meta, stats=stats, lens=lens, nbr=nbr,
                            contexts_NxL=contexts, vocab=vocabulary(tokenizer, cfg.vocab_size),
                            specials=specials, before=before, after=after)
  lm_tokens = contexts.size
  result = {"out_dir": out_dir, "tokens": int(stats["tokens"]), "lm_tokens": lm_tokens,
            "seconds": seconds, "tokens_per_s": lm_tokens / seconds,
            "live": int(np.sum(summ["live_F"])), "width": len(summ["live_F"])}
  logging.info("browser of %s: %d of %d features fired on %d held-out tokens (contexts %d..%d"
               ", %d tokens through the LM in %.1f s: %.0f tokens/s); open %s", params_path,
               result["live"], result["width"], result["tokens"], first,
               first + num_contexts - 1, lm_tokens, seconds, result["tokens_per_s"],
               os.path.join(out_dir, "index.html"))
  return result
