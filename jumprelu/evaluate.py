"""Evaluation as a stage of the job: its inputs checked before any harvest or training, the
held-out contexts after those training saw, every SAE of a run (or a sweep) scored together
with spliced.py (the SAE spliced into the LM), and DIR/eval.json written.
"""
import itertools
import json
import os

import jax
import numpy as np
from absl import logging

from jumprelu import arch as arch_lib
from jumprelu import data, export, files, logs, sharding, spliced, sweep
from jumprelu import workdir as workdir_lib
from jumprelu.lm import activations as lm_act


# ----------------------------------------------------------------------------- the inputs

# Checking the eval settings up front tokenises the packed text up to the last held-out context
# (~0.5M tokens/s on a CPU core); past this many tokens the check counts nothing and says so.
CHECK_TOKENS = 1 << 22
_SCAN = {}  # the latest _scan_text: the up-front check and the evaluation read the text once


def skip_reason(c, workdir: str | None) -> str | None:
  """Why the job does not evaluate this run ("" if by design: no LM or eval.num_contexts=0), or
  None if it does: a harvest, live training, or a store whose manifest names this LM and site."""
  if c.eval.num_contexts == 0 or c.data.source == "synthetic":
    return ""
  if c.data.source != "npy":
    return None
  store = workdir_lib.store_path(c, workdir)
  spec = (data.read_manifest(store) or {}).get("spec", {})
  missing = [k for k in ("model", "site", "context_len", "text") if k not in spec]
  if missing:
    return (f"data.path={store!r} has no manifest.json naming {', '.join(missing)} (a harvested "
            "store has one), so the LM and the text it came from are unknown")
  try:
    model = lm_act.model_name(c)
  except FileNotFoundError as e:
    return f"the store's LM {spec['model']!r} is not here ({e})"
  wanted = {"model": (model, "lm.model_path"), "context_len": (c.lm.context_len, "lm.context_len"),
            "text": (f"{c.text.source}:{c.text.path}", "text.source and text.path"),
            "skip_positions": (c.lm.skip_positions, "lm.skip_positions")}
  diffs = [f"{key} {spec[k]!r} (config: {v!r})" for k, (v, key) in wanted.items()
           if k in spec and spec[k] != v]
  if diffs:
    return (f"the store at data.path={store!r} was harvested with another " + ", ".join(diffs) +
            "; set those keys as the store has them to evaluate on its LM")
  return None


def check_inputs(c, workdir: str) -> bool:
  """Before any harvest or training: whether the job will evaluate, and if it will, refuses
  eval.* settings whose held-out contexts are not in the packed text or overlap the contexts
  training reads, with the true counts. Loads the LM (harvest and evaluation reuse it)."""
  reason = skip_reason(c, workdir)
  if reason:
    logging.info("no evaluation with the LM: %s", reason)
  if reason is not None:
    return False
  lm_data = sharding.local_data_size(sharding.lm_mesh_of(c.lm.model_parallel,
                                                         jax.local_devices()))
  if c.eval.batch_contexts % lm_data:
    raise ValueError(f"eval.batch_contexts={c.eval.batch_contexts} does not split over the LM "
                     f"mesh's {lm_data} \"data\" devices in this process (lm.model_parallel="
                     f"{c.lm.model_parallel}); set it to a multiple of {lm_data}, or raise "
                     "lm.model_parallel")
  first, stop = c.eval.skip_contexts, c.eval.skip_contexts + c.eval.num_contexts
  used, who = _training_contexts(c, workdir) if not c.eval.split else (0, "")
  if used is not None and first < used:
    raise ValueError(_overlap(c, used, who))
  if used is None and not c.eval.split:  # a harvest to come: no context holds more than
    # L − 1 − skip_positions rows
    least = -(-c.harvest.num_tokens // (c.lm.context_len - 1 - c.lm.skip_positions))
    if first < least:
      raise ValueError(_overlap(c, least, f"the harvest (harvest.num_tokens="
                                f"{c.harvest.num_tokens}) reads", at_least=True))
  if stop * c.lm.context_len > CHECK_TOKENS:
    logging.info("eval: not counting text.source %r's contexts up front (up to context %d of "
                 "%d tokens is over %d tokens); evaluation after training checks that they "
                 "exist", c.text.source, stop, c.lm.context_len, CHECK_TOKENS)
    return True
  _, cfg, tokenizer, _ = lm_act.load_lm(c)
  held, kept = _scan_text(c, cfg, tokenizer)
  if c.eval.split:  # another split: nothing training reads can overlap it
    if len(held) < c.eval.num_contexts:
      raise ValueError(_too_short(c, len(kept), None, ""))
    return True
  if used is None:  # a harvest to come: it reads contexts until it has harvest.num_tokens
    used, who = _harvest_contexts(c, kept), "the harvest (harvest.num_tokens="
    who += f"{c.harvest.num_tokens}) reads"
  if len(held) < c.eval.num_contexts:
    raise ValueError(_too_short(c, len(kept), used, who))
  if used is None or first < used:
    raise ValueError(_overlap(c, used, who, counted=len(kept)))
  return True


def held_out_contexts(c, cfg, tokenizer, harvested_contexts: int | None = None) -> np.ndarray:
  """eval.num_contexts contexts from eval.skip_contexts on, in the packed text stream (of the
  dataset split eval.split when it is set; then training's contexts cannot overlap them)."""
  if c.eval.split:
    harvested_contexts = None
  if harvested_contexts is not None and c.eval.skip_contexts < harvested_contexts:
    raise ValueError(_overlap(c, harvested_contexts, "training read"))
  held, kept = _scan_text(c, cfg, tokenizer)
  if len(held) < c.eval.num_contexts:
    raise ValueError(_too_short(c, len(kept), harvested_contexts, "training read"))
  return held


def _eval_text(c):
  """The config whose text.* names the held-out text: text.split replaced by eval.split."""
  if not c.eval.split:
    return c
  c = c.copy_and_resolve_references()
  with c.unlocked():
    c.text.split = c.eval.split
  return c


def _scan_text(c, cfg, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(the held-out contexts [≤ eval.num_contexts, L], the kept-token count of every context the
  text yields up to their end); fewer when the text ends first."""
  first, stop = c.eval.skip_contexts, c.eval.skip_contexts + c.eval.num_contexts
  split = c.eval.split or c.text.split
  key = (id(tokenizer), cfg.bos_id, cfg.eos_id, cfg.pad_id, c.lm.skip_positions,
         c.lm.context_len, c.text.source, c.text.path, c.text.field, split, first, stop)
  if _SCAN.get("key") != key or _SCAN.get("tokenizer") is not tokenizer:
    held, kept = [], np.zeros(stop, np.int32)
    n = 0
    for n, tokens in enumerate(itertools.islice(lm_act.contexts(_eval_text(c), cfg, tokenizer),
                                                stop), 1):
      kept[n - 1] = np.count_nonzero(lm_act.keep_mask(cfg, tokens[None], c.lm.skip_positions))
      if n > first:
        held.append(tokens)
    held = np.stack(held) if held else np.zeros((0, c.lm.context_len), np.int32)
    _SCAN.update(key=key, tokenizer=tokenizer, value=(held, kept[:n]))
  return _SCAN["value"]


def _training_contexts(c, workdir: str) -> tuple[int | None, str]:
  """(the contexts training reads, who reads them), known without reading the text: live
  training's chunks or a finished harvest's manifest; None before a harvest."""
  if c.data.source == "live":
    return workdir_lib.contexts_used(c, workdir), (
        f"live training (train.num_steps={c.train.num_steps} in chunks of "
        f"data.live_chunk_contexts={c.data.live_chunk_contexts}) reads")
  manifest = data.read_manifest(workdir_lib.store_path(c, workdir))
  if manifest is not None and (manifest.get("complete") or c.data.source == "npy"):
    return workdir_lib.contexts_used(c, workdir), "the harvested store's training read"
  return None, ""


def _harvest_contexts(c, kept_N: np.ndarray) -> int | None:
  """workdir.contexts_used after a harvest of harvest.num_tokens, from each context's kept-token
  count (None: more contexts than counted); the harvest stops inside or right after one."""
  total = np.cumsum(kept_N)
  i = int(np.searchsorted(total, c.harvest.num_tokens))  # the first context that completes it
  if i == len(total):
    return None
  return i + 1 if total[i] > c.harvest.num_tokens else i + 2  # at a context's end: next one


def _too_short(c, total: int, used: int | None, who: str) -> str:
  first, num = c.eval.skip_contexts, c.eval.num_contexts
  text = (f"text.source {c.text.source!r} yields {total} contexts of {c.lm.context_len} tokens, "
          f"but eval needs contexts {first}..{first + num - 1} (eval.skip_contexts={first}, "
          f"eval.num_contexts={num}); ")
  if used is None or total - num >= used:
    past = "" if used is None else f" and make sure it stays past the {used} contexts {who}"
    return text + f"lower eval.skip_contexts to at most {total - num}{past}"
  return text + (f"the {used} contexts {who} leave {max(total - used, 0)}: lower "
                 "eval.num_contexts or harvest.num_tokens, or use a longer text")


def _overlap(c, used: int | None, who: str, counted: int = 0, at_least: bool = False) -> str:
  first = c.eval.skip_contexts
  if used is None:
    return (f"eval.skip_contexts={first} overlaps the contexts {who}: more than the {counted} "
            f"the text yields up to the last held-out one; lower harvest.num_tokens, or raise "
            f"eval.skip_contexts with a longer text")
  if at_least:
    return (f"eval.skip_contexts={first} overlaps the contexts {who} (at least {used}); set it "
            f"to at least {used}")
  return (f"eval.skip_contexts={first} overlaps the {used} contexts {who}; set it to at least "
          f"{used}")


# ----------------------------------------------------------------------------- runs

def runs_of(c, workdir: str) -> list[tuple]:
  """[(config, directory)]: the run in `workdir`, or each member of a sweep as a run of its own."""
  if not sweep.is_sweep(c):
    return [(c, workdir)]
  store = workdir_lib.store_path(c, workdir)
  return [(sweep.member_config(c, hp, store), sweep.member_dir(workdir, name))
          for name, hp in sweep.grid(c)]


def evaluate_workdir(c, workdir: str) -> list[dict]:
  """Evaluates the finished run in `workdir` (every member of a sweep, together)."""
  return evaluate_runs(runs_of(c, workdir))


def evaluate_sae(c, workdir: str, params_path: str) -> dict:
  """Evaluates the SAE at `params_path` (params.npz or a SAELens folder) on c's LM and site,
  on contexts held out from training; writes DIR/eval.json and logs a table."""
  own = os.path.abspath(params_path) == os.path.abspath(
      os.path.join(workdir, "export", "params.npz"))
  return evaluate_runs([(c, workdir)], params_paths=[params_path], describe=[own])[0]


def evaluate_runs(runs, params_paths=None, describe=None) -> list[dict]:
  """Evaluates the finished runs [(config, workdir)] at one LM site together (the clean runs are
  shared), each on its DIR/export/params.npz unless params_paths says otherwise, and writes
  each DIR/eval.json. describe[i]: record run i's λ, ε and k (off for a foreign SAE)."""
  c = runs[0][0]
  for rc, rdir in runs:
    if (rc.lm.site, rc.lm.model_path) != (c.lm.site, c.lm.model_path):
      raise ValueError(f"{rdir}: evaluated together runs must share lm.site and lm.model_path; "
                       f"got {rc.lm.site!r} vs {c.lm.site!r}")
  params_paths = params_paths or [os.path.join(d, "export", "params.npz") for _, d in runs]
  describe = describe or [True] * len(runs)
  sharding.wait_for_all("jumprelu_evaluate_runs")  # all read the exports process 0 wrote
  lm = lm_act.load_lm(c)
  contexts = held_out_contexts(
      c, lm[1], lm[2], max(workdir_lib.contexts_used(rc, rdir) for rc, rdir in runs))
  saes = [export.load(p) for p in params_paths]
  half_windows = [_half_window(rc, rdir) if own else 0.0
                  for (rc, rdir), own in zip(runs, describe)]
  results = []
  for (rc, rdir), path, own, result in zip(runs, params_paths, describe, spliced.evaluate_many(
      c, lm, saes, contexts, c.eval.batch_contexts, half_windows)):
    meta = {"site": rc.lm.site, "model": lm[3], "params": path,
            "member": os.path.basename(rdir) if os.path.basename(
                os.path.dirname(os.path.abspath(rdir))) == "members" else "",
            **{a: rc.sae[a] if own and a in arch_lib.USES[result["arch"]] else None
               for a in ("sparsity_coefficient", "bandwidth")}}
    result = {**meta, **result, "k": result.get("k")}
    results.append(result)
    if jax.process_index() == 0:
      os.makedirs(rdir, exist_ok=True)
      files.save_json(os.path.join(rdir, "eval.json"), result)
      scalars = {k: v for k, v in result.items() if k != "firing_frequency" and
                 isinstance(v, int | float) and not isinstance(v, bool)}
      logs.write_eval(rdir, rc.train.num_steps, scalars, tensorboard=rc.log.tensorboard)
      logging.info("evaluation of %s on %d held-out tokens at %s:\n%s", rdir, result["tokens"],
                   rc.lm.site, spliced.table(result))
  return results


def _half_window(c, workdir: str) -> float:
  """ε·C/2 in raw units for a JumpReLU run (C from its summary.json), else 0 (not reported)."""
  path = os.path.join(workdir, "summary.json")
  if c.sae.arch != "jumprelu" or not os.path.exists(path):
    return 0.0
  with open(path) as fh:
    scale = json.load(fh).get("norm_scale")
  return 0.0 if scale is None else 0.5 * c.sae.bandwidth * scale
