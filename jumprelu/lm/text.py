"""Text sources (iterators of documents) and packing them into fixed-length token contexts."""

import contextlib
import glob
import importlib
import importlib.util
import inspect
import itertools
import io
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import warnings
from typing import Iterable, Iterator

import numpy as np

# Modules whose import opens windows, prints, writes files or touches the terminal; test suites;
# codec tables; and distutils, which setuptools may shadow with its own copy.
_STDLIB_SKIP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "ensurepip", "venv", "pydoc_data", "readline", "rlcompleter", "encodings", "distutils",
})


def _stdlib_modules() -> list[str]:
  """Sorted names of importable stdlib modules and submodules, minus _STDLIB_SKIP."""
  names = set()
  for top in sorted(sys.stdlib_module_names):
    if top.startswith("_") or top in _STDLIB_SKIP:
      continue
    names.add(top)
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
      continue
    # iter_modules lists files only, importing nothing; a __main__ module would run a program.
    stack = [(top, list(spec.submodule_search_locations))]
    while stack:
      prefix, paths = stack.pop()
      for info in pkgutil.iter_modules(paths):
        if info.name.startswith("_") or info.name in _STDLIB_SKIP:
          continue
        name = f"{prefix}.{info.name}"
        names.add(name)
        if info.ispkg:
          stack.append((name, [os.path.join(p, info.name) for p in paths]))
  return sorted(names)


def _import_quietly(name: str):
  """The module, or None if importing it fails; its warnings and prints are swallowed."""
  with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
      contextlib.redirect_stderr(io.StringIO()):
    warnings.simplefilter("ignore")
    try:
      return importlib.import_module(name)
    except (Exception, SystemExit):  # Platform-specific modules raise ImportError.
      return None


def _module_docstrings(module) -> Iterator[str]:
  """Docstrings of a module and of the classes, functions and methods it defines."""
  yield module.__doc__
  for _, obj in sorted(vars(module).items()):
    # Only what the module defines, so re-exported objects are not counted twice.
    if getattr(obj, "__module__", None) != module.__name__:
      continue
    if inspect.isroutine(obj):
      yield obj.__doc__
    elif inspect.isclass(obj):
      yield obj.__doc__
      for _, member in sorted(vars(obj).items()):
        # Methods in Python or C, properties and C getset/member descriptors.
        if isinstance(member, (staticmethod, classmethod, property)) or inspect.isroutine(member) \
            or inspect.isdatadescriptor(member):
          yield getattr(member, "__doc__", None)


def _collect_stdlib_docstrings(min_chars: int) -> list[str]:
  docs, seen = [], set()
  for name in _stdlib_modules():
    module = _import_quietly(name)
    if module is None:
      continue
    for doc in _module_docstrings(module):
      if not isinstance(doc, str):
        continue
      doc = inspect.cleandoc(doc)
      if len(doc) < min_chars or doc in seen:
        continue
      seen.add(doc)
      docs.append(doc)
  return docs


def stdlib_docstrings(min_chars: int = 100) -> Iterator[str]:
  """English documents: the docstrings of the standard library, deduplicated, in a fixed order.

  The same Python installation gives the same documents in the same order. Docstrings shorter
  than `min_chars` (mostly one-line summaries) are dropped.
  """
  # Collected by a fresh interpreter: in this one, packages imported earlier can change the
  # answer (typing_extensions patches functions into typing), and the ~400 stdlib imports stay
  # out of the caller's process.
  with tempfile.TemporaryDirectory() as tmp:
    out_path = os.path.join(tmp, "docs.json")
    proc = subprocess.run([sys.executable, "-I", __file__, str(min_chars), out_path],
                          capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"Collecting stdlib docstrings failed:\n{proc.stderr[-2000:]}")
    with open(out_path, encoding="utf-8") as f:
      docs = json.load(f)
  yield from docs


def local_files(glob_pattern: str, field: str = "text") -> Iterator[str]:
  """Documents from files matching a glob: a .txt file is one document, a .jsonl line is one."""
  paths = sorted(glob.glob(glob_pattern, recursive=True))
  if not paths:
    raise FileNotFoundError(f"No files match {glob_pattern!r}.")
  for path in paths:
    if path.endswith(".txt"):
      with open(path, encoding="utf-8") as f:
        yield f.read()
    elif path.endswith(".jsonl"):
      with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
          if not line.strip():
            continue
          record = json.loads(line)
          if field not in record:
            raise KeyError(
                f"{path}:{line_no} has no field {field!r}; its fields are {sorted(record)}.")
          yield record[field]
    else:
      raise ValueError(f"Unsupported file {path!r}: expected a .txt or .jsonl file.")


def hf_dataset(name: str, split: str, field: str = "text", streaming: bool = True, **kwargs):
  """Documents from `datasets.load_dataset(name, split=split, streaming=streaming, **kwargs)`."""
  import datasets  # Optional dependency, only needed for this source.

  for record in datasets.load_dataset(name, split=split, streaming=streaming, **kwargs):
    if field not in record:
      raise KeyError(f"Dataset {name!r} has no field {field!r}; its fields are {sorted(record)}.")
    yield record[field]


def pack(docs: Iterable[str], tokenizer, context_len: int, bos_id: int, eos_id: int,
         batch_docs: int = 64) -> Iterator[np.ndarray]:
  """Int32 contexts [context_len]: BOS, then context_len - 1 tokens of the EOS-joined documents.

  Documents are tokenised without special tokens, each followed by EOS, concatenated and cut;
  a document can span two contexts. The incomplete last context is dropped.
  """
  if context_len < 2:
    raise ValueError(f"context_len must be >= 2 (BOS plus a token), got {context_len}.")
  n = context_len - 1
  buf = []
  docs = iter(docs)
  while batch := list(itertools.islice(docs, batch_docs)):
    # encode_batch tokenises the batch in parallel in Rust.
    for enc in tokenizer.encode_batch(batch, add_special_tokens=False):
      buf.extend(enc.ids)
      buf.append(eos_id)
    while len(buf) >= n:
      yield np.asarray([bos_id] + buf[:n], np.int32)
      del buf[:n]


def harvest_mask(tokens_BxL, bos_id: int | None, eos_id: int | None, pad_id: int | None):
  """Bool mask of positions whose activations to keep: every token but BOS, EOS and padding."""
  keep_BxL = None
  for special in (bos_id, eos_id, pad_id):
    if special is not None:
      not_special_BxL = tokens_BxL != special
      keep_BxL = not_special_BxL if keep_BxL is None else keep_BxL & not_special_BxL
  if keep_BxL is None:
    raise ValueError("harvest_mask needs at least one of bos_id, eos_id, pad_id.")
  return keep_BxL


if __name__ == "__main__":
  # Run by stdlib_docstrings as `python -I text.py MIN_CHARS OUT_PATH`.
  sys.path.pop(0)  # This file's folder, so nothing in it can shadow a stdlib module.
  with open(sys.argv[2], "w", encoding="utf-8") as f:
    json.dump(_collect_stdlib_docstrings(int(sys.argv[1])), f)
