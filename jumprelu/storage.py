"""Paths that may be local or in a bucket (gs://, s3://, memory:// ...), through fsspec.

A local path goes through files.py (atomic rename, fsync). A remote path is written as one
object per file, which object stores publish atomically: a reader sees the old object or the
whole new one. Reads of a row range of an .npy file are one ranged read, so a remote store is
read in large sequential pieces. gs:// needs `pip install gcsfs` (s3://: s3fs); memory:// is
fsspec's in-process filesystem, used by the tests.
"""
import ast
import copy
import io
import json
import os
import posixpath

import fsspec
import numpy as np

from jumprelu import files


def is_remote(path: str) -> bool:
  """True for a URL other than file://; a plain or file:// path is local."""
  return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
  return path[len("file://"):] if path.startswith("file://") else path


def _fs(path: str):
  try:
    return fsspec.core.url_to_fs(path)
  except (ImportError, ValueError) as e:
    protocol = path.split("://")[0]
    raise ValueError(f"cannot open {path!r}: fsspec has no working filesystem for {protocol}:// "
                     f"({e}); for gs:// run `pip install gcsfs`, for s3:// `pip install s3fs`"
                     ) from e


def join(path: str, *parts: str) -> str:
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def exists(path: str) -> bool:
  if not is_remote(path):
    return os.path.exists(local_path(path))
  fs, p = _fs(path)
  return fs.exists(p)


def isdir(path: str) -> bool:
  if not is_remote(path):
    return os.path.isdir(local_path(path))
  fs, p = _fs(path)
  return fs.isdir(p)


def makedirs(path: str) -> None:
  if not is_remote(path):
    os.makedirs(local_path(path), exist_ok=True)
  # Object stores have no directories: a "folder" exists once an object under it does.


def listdir(path: str) -> list[str]:
  """Names (not paths) directly under `path`, sorted; [] when it does not exist."""
  if not is_remote(path):
    p = local_path(path)
    return sorted(os.listdir(p)) if os.path.isdir(p) else []
  fs, p = _fs(path)
  if not fs.exists(p):
    return []
  return sorted(posixpath.basename(q.rstrip("/")) for q in fs.ls(p, detail=False))


def remove(path: str) -> None:
  if not is_remote(path):
    os.remove(local_path(path))
    return
  fs, p = _fs(path)
  fs.rm(p)


def write_bytes(path: str, payload: bytes) -> None:
  """The whole file at once: atomic rename locally, one object put remotely."""
  if not is_remote(path):
    def write(tmp):
      with open(tmp, "wb") as fh:
        fh.write(payload)
    files.atomic_write(local_path(path), write)
    return
  fs, p = _fs(path)
  fs.pipe_file(p, payload)


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
  """Bytes [start, end) of a file (all of it by default), in one read."""
  if not is_remote(path):
    with open(local_path(path), "rb") as fh:
      fh.seek(start or 0)
      return fh.read() if end is None else fh.read(end - (start or 0))
  fs, p = _fs(path)
  return fs.cat_file(p, start=start, end=end)


def write_json(path: str, obj) -> None:
  if not is_remote(path):
    files.save_json(local_path(path), obj)
    return
  write_bytes(path, json.dumps(obj, indent=1).encode())


def read_json(path: str):
  """The parsed file, or None when it does not exist."""
  if not exists(path):
    return None
  return json.loads(read_bytes(path))


def write_npy(path: str, array: np.ndarray) -> None:
  if not is_remote(path):
    files.save_npy(local_path(path), array)
    return
  buf = io.BytesIO()
  np.save(buf, array)
  write_bytes(path, buf.getvalue())


class NpyFile:
  """A 2-D .npy file read by row ranges without loading it: a memory-map when local, ranged
  reads when remote. `shape`, `ndim`, `dtype`; rows(lo, hi) -> np.ndarray [hi - lo, W]."""

  def __init__(self, path: str):
    self.path = path
    if not is_remote(path):
      self._mmap = np.load(local_path(path), mmap_mode="r")
      self.shape, self.dtype = self._mmap.shape, self._mmap.dtype
      return
    self._mmap = None
    head = read_bytes(path, 0, 4096)
    if head[:6] != b"\x93NUMPY":
      raise ValueError(f"{path} is not an .npy file (no NUMPY magic)")
    major = head[6]
    width = 2 if major == 1 else 4
    header_len = int.from_bytes(head[8:8 + width], "little")
    self._offset = 8 + width + header_len
    if len(head) < self._offset:
      head = read_bytes(path, 0, self._offset)
    header = ast.literal_eval(head[8 + width:self._offset].decode("latin1"))
    if header["fortran_order"]:
      raise ValueError(f"{path} is stored in Fortran order; save it in C order")
    self.dtype = np.dtype(header["descr"])
    self.shape = tuple(header["shape"])
    expected = self._offset + int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
    fs, p = _fs(path)
    size = fs.size(p)
    if size < expected:
      raise ValueError(f"{path} is truncated: {size} bytes, its header needs {expected}")

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def view(self, dtype) -> "NpyFile":
    """The same file read as another dtype of the same item size (uint16 bits as bfloat16)."""
    dtype = np.dtype(dtype)
    if dtype.itemsize != self.dtype.itemsize:
      raise ValueError(f"cannot view {self.path} ({self.dtype}) as {dtype}: item sizes differ")
    out = copy.copy(self)
    out.dtype = dtype
    if self._mmap is not None:
      out._mmap = self._mmap.view(dtype)
    return out

  def rows(self, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) in one sequential read."""
    if self._mmap is not None:
      return np.asarray(self._mmap[lo:hi])
    row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
    payload = read_bytes(self.path, self._offset + lo * row_bytes, self._offset + hi * row_bytes)
    return np.frombuffer(payload, self.dtype).reshape((hi - lo,) + tuple(self.shape[1:]))
