"""Harvest throughput: our jitted LM forward (stopping at the site) vs transformers', one run.

  python scripts/bench_harvest.py [--site=resid_post.14] [--batch=16] [--context=128]

Both run SmolLM2-135M in float32 on this machine's CPU over the same packed docstring contexts
and stop after the site's block (transformers: its layer list truncated there, no LM head).
Needs `pip install torch==2.13.0 transformers accelerate` (the reference only).
"""
import os
import sys

# Run from a checkout, use that checkout (not whichever copy pip installed in editable mode).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import statistics
import time

from absl import app, flags
from jumprelu.lm import activations as lm_act

_SITE = flags.DEFINE_string("site", "resid_post.14", "Hook site.")
_BATCH = flags.DEFINE_integer("batch", 16, "Contexts per forward.")
_CONTEXT = flags.DEFINE_integer("context", 128, "Tokens per context.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed forwards after one warm-up.")


def _median_seconds(fn, repeats):
  fn()  # warm-up: compilation / first-call allocation excluded
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv):
  del argv
  import itertools
  import os

  import jax
  import numpy as np
  import torch
  import transformers

  from configs import smollm2_135m
  from jumprelu.lm import load, model

  c = smollm2_135m.get_config()
  c.lm.site, c.lm.context_len = _SITE.value, _CONTEXT.value
  params, cfg, tok, _ = lm_act.load_lm(c)
  site = model.parse_site(c.lm.site)
  tokens = np.stack(list(itertools.islice(lm_act.contexts(c, cfg, tok), _BATCH.value)))
  n_tokens = tokens.size

  ours = lm_act.site_fn(cfg, site)
  t_ours = _median_seconds(lambda: np.asarray(ours(params, tokens)), _REPEATS.value)

  folder, name = os.path.split(load.default_model_path())
  ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                          dtype=torch.float32).eval()
  ref.model.layers = ref.model.layers[:site.layer + 1]  # stop after the site's block, as we do
  x = torch.tensor(tokens)

  def torch_forward():
    with torch.no_grad():
      return ref.model(x).last_hidden_state

  t_torch = _median_seconds(torch_forward, _REPEATS.value)
  print(f"SmolLM2-135M to {c.lm.site}, {_BATCH.value}×{_CONTEXT.value} tokens, float32, "
        f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")
  print(f"{'forward':<22}{'median s':>10}{'tokens/s':>12}")
  print(f"{'jumprelu (JAX, jit)':<22}{t_ours:>10.3f}{n_tokens / t_ours:>12.0f}")
  print(f"{'transformers (torch)':<22}{t_torch:>10.3f}{n_tokens / t_torch:>12.0f}")
  print(f"ours/transformers throughput = {t_torch / t_ours:.2f}")


if __name__ == "__main__":
  app.run(main)
