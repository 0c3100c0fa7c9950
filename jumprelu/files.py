"""Durable files: every file the project writes goes through atomic_write, so a reader (or a
resumed run) sees the old file or the whole new one, never half of one, even after a crash."""
import json
import os

import numpy as np


def atomic_write(path: str, write) -> None:
  """Calls write(tmp) on a temporary name beside `path`, flushes it to disk, renames it over
  `path` and flushes the directory, so the rename itself survives a power cut."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp" + os.path.splitext(path)[1]  # np.save / np.savez insist on their suffix
  try:
    write(tmp)
    with open(tmp, "rb+") as fh:
      os.fsync(fh.fileno())
    os.replace(tmp, path)
  except BaseException:  # a full disk, a kill by exception: the old file stays, the part goes
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def is_temporary(name: str) -> bool:
  """A leftover of an atomic_write that was killed before its rename."""
  return ".tmp" in name


def save_json(path: str, obj) -> None:
  def write(tmp):
    with open(tmp, "w") as fh:
      json.dump(obj, fh, indent=1)
  atomic_write(path, write)


def save_jsonl(path: str, records) -> None:
  """One JSON object per line."""
  def write(tmp):
    with open(tmp, "w") as fh:
      fh.writelines(json.dumps(r) + "\n" for r in records)
  atomic_write(path, write)


def save_text(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, "w") as fh:
      fh.write(text)
  atomic_write(path, write)


def save_npz(path: str, arrays: dict) -> None:
  atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def save_npy(path: str, array: np.ndarray) -> None:
  atomic_write(path, lambda tmp: np.save(tmp, array))
