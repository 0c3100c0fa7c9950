"""Exports in the Gemma Scope `params.npz` layout, in raw activation units, written atomically."""
import json
import os

import numpy as np

from jumprelu import sae

GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def raw_params(params: dict, norm_scale) -> dict:
  """float32 numpy params acting on un-normalised activations (normalisation folded in)."""
  folded = sae.fold_normalization(params, norm_scale)
  return {k: np.asarray(folded[k], np.float32) for k in GEMMA_SCOPE_KEYS}


def _commit(tmp: str, path: str) -> None:
  """Renames a finished temporary file over `path`, flushed first so a crash cannot leave an
  empty file behind the new name."""
  with open(tmp, "rb+") as fh:
    os.fsync(fh.fileno())
  os.replace(tmp, path)


def save_npz(path: str, arrays: dict) -> None:
  """Writes an .npz through a temporary file and a rename, so a reader never sees half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  _commit(tmp, path)


def save_json(path: str, obj) -> None:
  """Writes JSON through a temporary file and a rename, like save_npz."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    json.dump(obj, fh, indent=1)
  _commit(tmp, path)


def save_jsonl(path: str, records) -> None:
  """Writes one JSON object per line, through a temporary file and a rename, like save_npz."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    fh.writelines(json.dumps(r) + "\n" for r in records)
  _commit(tmp, path)
