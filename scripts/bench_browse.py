"""How the feature browser's streaming pass scales: tokens/s at two sizes, and the LM alone.

  python scripts/bench_browse.py --workdir=runs/smollm2 [--sizes=64,256]

On a finished run (its config.json and export/params.npz), after one warm-up batch (so that
compilation is left out), times browse.collect over the first N held-out contexts for each N
in --sizes, and the LM forward to lm.site alone over the largest. Cost linear in tokens shows as
equal tokens/s at every size (and time ratios equal to the size ratios).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402

from jumprelu import browse, feature_acts  # noqa: E402
from jumprelu import workdir as workdir_lib  # noqa: E402
from jumprelu.lm import activations as lm_act  # noqa: E402
from jumprelu.lm import model  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--sizes", default="64,256", help="numbers of contexts, comma-separated")
  args = ap.parse_args()
  with open(os.path.join(args.workdir, "config.json")) as fh:
    c = ml_collections.ConfigDict(json.load(fh))
  sizes = sorted(int(s) for s in args.sizes.split(","))
  lm = lm_act.load_lm(c)
  sae = feature_acts.load_sae(os.path.join(args.workdir, "export", "params.npz"))
  first = workdir_lib.contexts_used(c, args.workdir)
  contexts = feature_acts.held_out(c, lm[1], lm[2], first, sizes[-1])
  L, batch = contexts.shape[1], c.lm.batch_contexts
  browse.collect(c, lm, sae, contexts[:batch], bar=False)  # compiles
  rows = []
  for n in sizes:
    start = time.perf_counter()
    browse.collect(c, lm, sae, contexts[:n], bar=False)
    seconds = time.perf_counter() - start
    rows.append((f"browser, {n} contexts", n * L, seconds))
  forward = lm_act.site_fn(lm[1], model.parse_site(c.lm.site))
  jax.block_until_ready(forward(lm[0], contexts[:batch]))
  start = time.perf_counter()
  for lo in range(0, sizes[-1], batch):
    jax.block_until_ready(forward(lm[0], contexts[lo:lo + batch]))
  rows.append((f"LM to {c.lm.site} alone, {sizes[-1]} contexts", sizes[-1] * L,
               time.perf_counter() - start))
  width = feature_acts.sae_width(sae[2])
  print(f"{args.workdir}: {sae[0]} SAE, F={width}, contexts of {L} tokens, batches of {batch}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  print(f"| what | tokens | seconds | tokens/s |\n|---|---|---|---|")
  for what, tokens, seconds in rows:
    print(f"| {what} | {tokens} | {seconds:.1f} | {tokens / seconds:.0f} |")
  (_, t0, s0), (_, t1, s1) = rows[0], rows[len(sizes) - 1]
  print(f"time ratio {s1 / s0:.2f} for a token ratio {t1 / t0:.2f}")


if __name__ == "__main__":
  main()
