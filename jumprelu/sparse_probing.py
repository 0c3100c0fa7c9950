"""Sparse probing, as SAEBench defines it (Karvonen et al. 2025, arXiv 2503.09532; after
Gurnee et al. 2023): for a binary task with balanced classes, logistic regression on the k SAE
features whose class means differ most (k in KS), against the same probe on every dimension
of the raw activations; held-out accuracy. Tasks are labelled offline, from text alone:

token level, on held-out contexts of the run's text (kept positions only):
  next_is_digit   the next token starts with a digit: the LM's next-token prediction
  in_doctest      the token is on a doctest line (one that starts with ">>>" or "...")
  in_parens       the token is inside parentheses opened earlier in the context
sequence level, mean over the first DOC_TOKENS kept tokens of a docstring:
  module_X        the docstring is from the standard-library package X (one of FAMILIES)
                  rather than from one of the others; the score is the mean over X
"""
import contextlib
import importlib
import inspect
import io
import pkgutil
import warnings

import numpy as np

from jumprelu import feature_acts, probes

KS = (1, 2, 5, 20)
FAMILIES = ("asyncio", "email", "logging", "unittest", "http")
DOC_TOKENS = 48
MIN_DOC_CHARS = 100


def token_labels(pieces_NxL: list[list[str]]) -> dict[str, np.ndarray]:
  """The token-level tasks' labels [N, L] (bool) from each position's token text."""
  n, L = len(pieces_NxL), len(pieces_NxL[0])
  out = {k: np.zeros((n, L), bool) for k in ("next_is_digit", "in_doctest", "in_parens")}
  for i, pieces in enumerate(pieces_NxL):
    line, depth = "", 0
    for t, s in enumerate(pieces):
      if "\n" in s:
        line = s.rsplit("\n", 1)[1]
      else:
        line += s
      out["in_doctest"][i, t] = line.lstrip().startswith((">>>", "..."))
      out["in_parens"][i, t] = depth > 0
      depth = max(0, depth + s.count("(") - s.count(")"))
      if t + 1 < L:
        out["next_is_digit"][i, t] = pieces[t + 1].lstrip()[:1].isdigit()
  return out


def _quiet_import(name: str):
  with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
      contextlib.redirect_stderr(io.StringIO()):
    warnings.simplefilter("ignore")
    try:
      return importlib.import_module(name)
    except BaseException:  # platform modules raise ImportError; test packages SkipTest
      return None


def family_docstrings(family: str) -> list[str]:
  """Docstrings (≥ MIN_DOC_CHARS) of a stdlib package and its submodules: of each module and
  of the classes, functions and methods it defines, deduplicated, in a fixed order."""
  top = _quiet_import(family)
  names = [family] + ([f"{family}.{m.name}" for m in pkgutil.iter_modules(top.__path__)
                       if not m.name.startswith("_") and m.name not in ("test", "tests")]
                      if top is not None and hasattr(top, "__path__") else [])
  docs, seen = [], set()
  for name in names:
    module = _quiet_import(name)
    if module is None:
      continue
    found = [module.__doc__]
    for _, obj in sorted(vars(module).items()):
      if getattr(obj, "__module__", None) != module.__name__:
        continue
      found.append(getattr(obj, "__doc__", None))
      if inspect.isclass(obj):
        found += [getattr(m, "__doc__", None) for _, m in sorted(vars(obj).items())
                  if isinstance(m, (staticmethod, classmethod, property)) or inspect.isroutine(m)]
    for doc in found:
      if isinstance(doc, str) and len(doc) >= MIN_DOC_CHARS and doc not in seen:
        seen.add(doc)
        docs.append(inspect.cleandoc(doc))
  return docs


def _probe_all(X_train, y_train, X_test, y_test, F_train, F_test) -> dict:
  out = {"dense": probes.dense_probe(X_train, y_train, X_test, y_test)["accuracy"]}
  for k in KS:
    out[f"k={k}"] = probes.k_sparse_probe(F_train, y_train, F_test, y_test, k)["accuracy"]
  return out


def token_tasks(c, lm, sae, contexts_NxL, rng, max_per_class: int = 1000) -> dict:
  """Held-out accuracies of the dense probe and the k-sparse probes on each token task."""
  pieces = [feature_acts.token_strings(lm[2], row) for row in contexts_NxL]
  labels = token_labels(pieces)
  xs, fs, keeps = [], [], []
  for _, x, f, keep in feature_acts.site_and_features(c, lm, sae, contexts_NxL):
    xs.append(x[keep])
    fs.append(f[keep])
    keeps.append(keep)
  X, F, keep = np.concatenate(xs), np.concatenate(fs), np.concatenate(keeps)
  out = {}
  for name, y_NxL in labels.items():
    y = y_NxL[keep]
    train, test = probes.balanced_split(y, rng, max_per_class=max_per_class)
    if len(test) < 4:
      out[name] = {"skipped": f"{int(y.sum())} positives"}
      continue
    out[name] = {**_probe_all(X[train], y[train], X[test], y[test], F[train], F[test]),
                 "train": int(len(train)), "test": int(len(test))}
  return out


def sequence_tasks(c, lm, sae, rng, docs_per_family: int = 80) -> dict:
  """Held-out accuracies on module_X for X in FAMILIES, and their mean."""
  _, cfg, tokenizer, _ = lm
  docs, family = [], []
  for j, name in enumerate(FAMILIES):
    mine = family_docstrings(name)
    mine = [mine[i] for i in sorted(rng.permutation(len(mine))[:docs_per_family])]
    docs += mine
    family += [j] * len(mine)
  family = np.asarray(family)
  bos = [cfg.bos_id] if cfg.bos_id is not None else []
  length = len(bos) + c.lm.skip_positions + DOC_TOKENS
  tokens = np.full((len(docs), length), feature_acts.pad_id(cfg), np.int32)
  for i, enc in enumerate(tokenizer.encode_batch(docs, add_special_tokens=False)):
    row = (bos + enc.ids)[:length]
    tokens[i, :len(row)] = row
  X, F = [], []
  for _, x, f, keep in feature_acts.site_and_features(c, lm, sae, tokens):
    n = np.maximum(keep.sum(axis=1, keepdims=True), 1)
    X.append((x * keep[..., None]).sum(axis=1) / n)
    F.append(f.sum(axis=1) / n)  # f is 0 where not kept
  X, F = np.concatenate(X), np.concatenate(F)
  out = {}
  for j, name in enumerate(FAMILIES):
    train, test = probes.balanced_split(family == j, rng)
    y = family == j
    out[f"module_{name}"] = {**_probe_all(X[train], y[train], X[test], y[test], F[train],
                                          F[test]), "train": int(len(train)),
                             "test": int(len(test))}
  keys = ["dense"] + [f"k={k}" for k in KS]
  out["module_family"] = {k: float(np.mean([out[f"module_{n}"][k] for n in FAMILIES]))
                          for k in keys}
  return out


def evaluate(c, lm, sae, contexts_NxL, *, seed: int = 0, docs_per_family: int = 80) -> dict:
  """Both kinds of task: {task: {"dense": acc, "k=1": acc, ...}}, and "mean" over the token
  tasks and module_family."""
  rng = np.random.default_rng(seed)
  out = {**token_tasks(c, lm, sae, contexts_NxL, rng),
         **sequence_tasks(c, lm, sae, rng, docs_per_family)}
  scored = [out[t] for t in ("next_is_digit", "in_doctest", "in_parens", "module_family")
            if "dense" in out[t]]
  out["mean"] = {k: float(np.mean([t[k] for t in scored])) for k in scored[0]
                 if k.startswith(("dense", "k="))}
  return out
