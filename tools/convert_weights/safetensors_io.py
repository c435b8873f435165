"""Reading and writing the safetensors format with numpy only (no torch, no safetensors package).

Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}
(+ optional "__metadata__": {str: str}), then the data region; offsets are relative to its start.
The header is validated completely before any tensor is read, so a truncated or corrupt file is
reported up front and names the tensor whose bytes are missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the safetensors reference implementation refuses larger headers too


class SafetensorsError(ValueError):
  """The file is not a valid (complete) safetensors file; the message says what is wrong and where."""


def dtype_from_name(name: str) -> np.dtype:
  try:
    return _DTYPES[name]
  except KeyError:
    raise SafetensorsError(f"unsupported safetensors dtype {name!r}; known: {sorted(_DTYPES)}") from None


def dtype_name(dtype) -> str:
  try:
    return _NAMES[np.dtype(dtype)]
  except KeyError:
    raise SafetensorsError(f"dtype {np.dtype(dtype)} has no safetensors name") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor as described by a checkpoint header: nothing is read."""

  key: str
  shape: tuple[int, ...]
  dtype: np.dtype
  file: str
  offset: int = 0  # absolute byte offset in `file` (safetensors only)

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


class DuplicateKeyError(ValueError):
  """A JSON object repeats a key (raised by `unique_object_pairs`; args[0] is the key)."""


def unique_object_pairs(pairs: list[tuple[str, object]]) -> dict:
  """json object_pairs_hook that refuses a repeated key. json.loads keeps the last one silently, and so
  does the safetensors library (its offset checks catch only some such headers: two entries for one
  tensor name, the first covering bytes the second leaves unread, load as the second)."""
  out = {}
  for key, value in pairs:
    if key in out:
      raise DuplicateKeyError(key)
    out[key] = value
  return out


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Parses and validates a safetensors header: ({key: TensorInfo}, __metadata__).

  Raises SafetensorsError for a short/garbled header, inconsistent offsets, overlapping tensors or a
  data region that does not match the file size (a truncated download).
  """
  size = os.path.getsize(path)
  name = os.path.basename(path)
  if size < 8:
    raise SafetensorsError(f"{name}: {size} bytes is too short for a safetensors file (truncated?)")
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES or 8 + n > size:
      raise SafetensorsError(
          f"{name}: header length field says {n} bytes but the file has {size} bytes "
          "(truncated or not a safetensors file)"
      )
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_object_pairs)
  except DuplicateKeyError as e:
    raise SafetensorsError(
        f"{name}: the header lists {e.args[0]!r} twice; the file is corrupt (which entry " "is meant cannot be told)"
    ) from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SafetensorsError(f"{name}: header is not valid JSON ({e}); the file is corrupt") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{name}: header is not a JSON object; the file is corrupt")
  metadata = header.pop("__metadata__", None)
  if metadata is None:
    metadata = {}
  elif not isinstance(metadata, dict):
    raise SafetensorsError(
        f"{name}: '__metadata__' is {type(metadata).__name__} {json.dumps(metadata)[:60]}; "
        "expected an object of strings; the header is corrupt"
    )
  data_start, data_size = 8 + n, size - 8 - n
  infos: dict[str, TensorInfo] = {}
  spans = []
  for key, entry in header.items():
    try:
      dtype = dtype_from_name(entry["dtype"])
      shape = tuple(int(d) for d in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      if isinstance(e, SafetensorsError):
        raise SafetensorsError(f"{name}: tensor {key!r}: {e}") from None
      raise SafetensorsError(f"{name}: malformed header entry for {key!r}: {entry!r}") from None
    if any(d < 0 for d in shape):
      raise SafetensorsError(f"{name}: tensor {key!r} has a negative dimension {shape}")
    want = math.prod(shape) * dtype.itemsize
    if end - begin != want or begin < 0:
      raise SafetensorsError(
          f"{name}: tensor {key!r} {entry['dtype']}{list(shape)} needs {want} bytes but its "
          f"data_offsets are [{begin}, {end}]; the header is corrupt"
      )
    if end > data_size:
      raise SafetensorsError(
          f"{name}: truncated file: tensor {key!r} needs data bytes up to {end} but only "
          f"{data_size} are present ({size} bytes on disk); re-download the file"
      )
    spans.append((begin, end, key))
    infos[key] = TensorInfo(key, shape, dtype, path, data_start + begin)
  spans.sort()
  cursor = 0
  for begin, end, key in spans:
    if begin < cursor:
      raise SafetensorsError(f"{name}: tensor {key!r} overlaps the previous tensor; the header is corrupt")
    cursor = end
  if cursor != data_size:
    raise SafetensorsError(
        f"{name}: data region is {data_size} bytes but the tensors cover {cursor}; "
        "the file is corrupt or has trailing bytes"
    )
  return infos, {str(k): str(v) for k, v in metadata.items()}


def read_tensor(info: TensorInfo, fd: int | None = None) -> np.ndarray:
  """Reads one tensor into a fresh array (pread; no memory map, so nothing lingers in RSS)."""
  buf = np.empty(info.nbytes, np.uint8)
  own = fd is None
  if own:
    fd = os.open(info.file, os.O_RDONLY)
  try:
    view, done = memoryview(buf), 0
    while done < info.nbytes:
      got = os.preadv(fd, [view[done:]], info.offset + done)
      if got <= 0:
        raise SafetensorsError(
            f"{os.path.basename(info.file)}: unexpected end of file while reading {info.key!r} "
            f"({done} of {info.nbytes} bytes); the file was truncated"
        )
      done += got
  finally:
    if own:
      os.close(fd)
  return buf.view(info.dtype).reshape(info.shape)


def map_tensor(info: TensorInfo, fd: int) -> np.ndarray:
  """One tensor as a read-only array over a memory map of its bytes (the page cache's pages: no copy).

  For the converter: a copy out of the page cache (pread) into fresh memory costs a memcpy plus the
  kernel zeroing every new page, ~1/3 of the conversion's CPU time. The map covers only this tensor
  and is unmapped when the last array viewing it is dropped, so RSS stays bounded as with `read_tensor`
  (the converter holds at most the largest tensor's worth of source data). MAP_POPULATE maps the
  pages in one call instead of a page fault per 64 KB. The file's size is checked first, so a file
  truncated after its header was validated gives a clear error, not a SIGBUS. Falls back to
  `read_tensor` where the file cannot be mapped.
  """
  if info.nbytes == 0:
    return np.empty(info.shape, info.dtype)
  size = os.fstat(fd).st_size
  if info.offset + info.nbytes > size:
    raise SafetensorsError(
        f"{os.path.basename(info.file)}: unexpected end of file while reading {info.key!r} "
        f"(needs bytes up to {info.offset + info.nbytes}, the file has {size}); the file was "
        "truncated"
    )
  start = info.offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
  try:
    m = mmap.mmap(
        fd,
        info.offset + info.nbytes - start,
        flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
        prot=mmap.PROT_READ,
        offset=start,
    )
  except (OSError, ValueError, AttributeError):
    return read_tensor(info, fd)
  buf = np.frombuffer(m, np.uint8, info.nbytes, info.offset - start)
  return buf.view(info.dtype).reshape(info.shape)


def header_bytes(
    entries: Iterable[tuple[str, tuple[int, ...], np.dtype]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[tuple[int, int]]]:
  """The serialized header (length prefix included) for tensors written in the given order."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  spans, cursor = [], 0
  for key, shape, dtype in entries:
    n = math.prod(shape) * np.dtype(dtype).itemsize
    header[key] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [cursor, cursor + n]}
    spans.append((cursor, cursor + n))
    cursor += n
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # align the data region to 8 bytes, as the reference writer does
  return struct.pack("<Q", len(raw)) + raw, spans


def write_file(
    path: str,
    entries: list[tuple[str, tuple[int, ...], np.dtype]],
    tensors: Iterator[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> int:
  """Streams tensors into a safetensors file; `entries` (the header) must list them in the same order.

  Returns the number of bytes written. Each tensor is checked against its header entry.
  """
  head, _ = header_bytes(entries, metadata)
  total = len(head)
  with open(path, "wb") as f:
    f.write(head)
    for (key, shape, dtype), (got_key, value) in zip(entries, tensors, strict=True):
      if got_key != key or tuple(value.shape) != tuple(shape) or value.dtype != np.dtype(dtype):
        raise SafetensorsError(
            f"writer got {got_key} {value.shape} {value.dtype} where the header has "
            f"{key} {tuple(shape)} {np.dtype(dtype)}"
        )
      data = np.ascontiguousarray(value)
      f.write(memoryview(data.reshape(-1).view(np.uint8)))
      total += data.nbytes
  return total
