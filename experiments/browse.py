"""Looks inside an SAE: a static feature browser, or the features that fire on a prompt.

  python experiments/browse.py --workdir=DIR                  # a finished run -> DIR/browser/
  python experiments/browse.py --workdir=DIR --prompt="Return the sum of a list."
  python experiments/browse.py --params=SAE --config=configs/smollm2_135m.py --out=OUT
SAE is anything export.load reads (our params.npz of any architecture, Gemma Scope files,
SAELens folders) acting on the config's lm.site; DIR/config.json gives the LM, the site and the
text. The browser streams --num_contexts held-out contexts (from the first one training did not
read) through the LM and the SAE once; open OUT/index.html (default DIR/browser) from the file
system, no server needed.
"""
import os
import sys

# Run from a checkout, use that checkout (not whichever copy pip installed in editable mode).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from jumprelu import browse, cli, feature_acts


_CONFIG = cli.define_config_flag(sys.argv)
_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run: DIR/config.json, "
                               "DIR/export/params.npz; the browser goes to DIR/browser.")
_PARAMS = flags.DEFINE_string("params", None, "params.npz or SAELens folder; default: "
                              "DIR/export/params.npz.")
_OUT = flags.DEFINE_string("out", None, "Where to write the site; default: DIR/browser.")
_PROMPT = flags.DEFINE_string("prompt", None, "Print the features on this text and exit.")
_NUM_CONTEXTS = flags.DEFINE_integer("num_contexts", 256, "Held-out contexts to stream.")
_SKIP_CONTEXTS = flags.DEFINE_integer(
    "skip_contexts", None, "First context of the packed text to read; default: the first one "
    "training did not read (DIR's store or live chunks), or eval.skip_contexts without DIR.")
_TOP_K = flags.DEFINE_integer("top_k", 20, "Top activating contexts kept per feature.")
_SAMPLES = flags.DEFINE_integer("samples", 20, "Random firing tokens kept per feature.")
_BEFORE = flags.DEFINE_integer("window_before", 24, "Tokens shown before each example's.")
_AFTER = flags.DEFINE_integer("window_after", 8, "Tokens shown after each example's.")


def main(argv):
  del argv
  c = _CONFIG.value
  if c is None:
    where = os.path.join(_WORKDIR.value, "config.json") if _WORKDIR.value else "--workdir"
    raise app.UsageError(f"no config: {where} does not exist; give --config=configs/X.py")
  if _WORKDIR.value is None and _PARAMS.value is None:
    raise app.UsageError("give --workdir=DIR (a finished run) or --params=SAE with --config")
  if _PROMPT.value is not None:
    sae = _PARAMS.value or os.path.join(_WORKDIR.value, "export", "params.npz")
    print(feature_acts.describe(feature_acts.features_on(c, sae, _PROMPT.value)))
    return
  if _OUT.value is None and _WORKDIR.value is None:
    raise app.UsageError("give --out=DIR for the site (or --workdir=DIR: DIR/browser)")
  skip = _SKIP_CONTEXTS.value
  if skip is None and _WORKDIR.value is None:
    skip = c.eval.skip_contexts  # the config's held-out text, past what its training read
  browse.build(c, _WORKDIR.value, params_path=_PARAMS.value, out_dir=_OUT.value,
               num_contexts=_NUM_CONTEXTS.value, skip_contexts=skip, top_k=_TOP_K.value,
               samples=_SAMPLES.value, before=_BEFORE.value, after=_AFTER.value)


if __name__ == "__main__":
  cli.run(main)
