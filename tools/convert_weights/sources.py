"""Released checkpoint readers: one tensor at a time, with the full key/shape/dtype list from headers only.

Supported layouts of a Hugging Face model folder (first match wins unless `fmt` is given):
  model.safetensors.index.json + shards   |  model.safetensors
  pytorch_model.bin.index.json + shards   |  pytorch_model.bin
Tensors are memory-mapped one at a time (read-only; unmapped when dropped; see
`safetensors_io.map_tensor`). `.bin` files need no torch: `torch_zip` finds each tensor's bytes in
the zip from its pickle; a non-contiguous tensor (a view saved with its storage) is copied out.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Iterator

import numpy as np

from tools.convert_weights.safetensors_io import (
    DuplicateKeyError,
    SafetensorsError,
    TensorInfo,
    map_tensor,
    read_header,
    unique_object_pairs,
)
from tools.convert_weights.torch_zip import StoredTensor, TorchZipError, read_index


class SourceError(ValueError):
  """The source folder or one of its files cannot be read as a released checkpoint."""


class Source:
  """A checkpoint's tensors: `infos` from headers (nothing loaded), `read(key)` one at a time."""

  kind = "?"

  def __init__(self, files: list[str]):
    self.files = files
    self.infos: dict[str, TensorInfo] = {}

  def read(self, key: str) -> np.ndarray:
    raise NotImplementedError

  def prefetch(self, order: list[str]) -> None:
    """Hint: `read` will be called for these keys in this order (a reader may start I/O early)."""

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  @property
  def total_bytes(self) -> int:
    return sum(i.nbytes for i in self.infos.values())

  def describe(self) -> str:
    return f"{self.kind}: " + ", ".join(os.path.basename(f) for f in self.files)


def _load_index(path: str) -> dict[str, str]:
  try:
    with open(path) as f:
      weight_map = json.load(f, object_pairs_hook=unique_object_pairs)["weight_map"]
  except DuplicateKeyError as e:
    raise SourceError(f"{os.path.basename(path)}: lists {e.args[0]!r} twice; the index is corrupt") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SourceError(f"{os.path.basename(path)}: not a valid index file with a 'weight_map' ({e})") from None
  if not isinstance(weight_map, dict):
    raise SourceError(f"{os.path.basename(path)}: 'weight_map' is not an object")
  return weight_map


def _check_against_index(index_path: str, weight_map: dict[str, str], found: dict[str, str]) -> None:
  """Every key listed where the index says, and no shard key the index does not list."""
  name = os.path.basename(index_path)
  problems = [f"{k}: index says {weight_map[k]}, not found there" for k in weight_map if found.get(k) != weight_map[k]]
  problems += [f"{k}: in {found[k]} but not in the index" for k in found if k not in weight_map]
  if problems:
    raise SourceError(f"{name} does not match the shard files:\n  " + "\n  ".join(sorted(problems)[:50]))


class SafetensorsSource(Source):
  kind = "safetensors"

  def __init__(self, files: list[str], index_path: str | None = None, weight_map: dict[str, str] | None = None):
    super().__init__(files)
    found: dict[str, str] = {}
    for path in files:
      try:
        infos, _ = read_header(path)
      except FileNotFoundError:
        raise SourceError(f"shard {os.path.basename(path)} listed in the index is missing") from None
      for key, info in infos.items():
        if key in self.infos:
          raise SourceError(
              f"tensor {key!r} appears in both {os.path.basename(self.infos[key].file)} and "
              f"{os.path.basename(path)}"
          )
        self.infos[key] = info
        found[key] = os.path.basename(path)
    if weight_map is not None:
      _check_against_index(index_path, weight_map, found)
    self._fds: dict[str, int] = {}
    self._readahead: Readahead | None = None

  def prefetch(self, order: list[str]) -> None:
    if self._readahead is not None:
      self._readahead.close()
    self._readahead = Readahead([self.infos[k] for k in order if k in self.infos])

  def read(self, key: str) -> np.ndarray:
    info = self.infos[key]
    if self._readahead is not None:
      self._readahead.reading(key)
    return _mapped(info, self._fds)

  def close(self) -> None:
    if self._readahead is not None:
      self._readahead.close()
      self._readahead = None
    for fd in self._fds.values():
      os.close(fd)
    self._fds.clear()


def _mapped(info: TensorInfo, fds: dict[str, int]) -> np.ndarray:
  """`map_tensor` through the reader's open file (`fds`: path -> descriptor, opened here on first use)."""
  fd = fds.get(info.file)
  if fd is None:
    fd = fds[info.file] = os.open(info.file, os.O_RDONLY)
  try:
    return map_tensor(info, fd)
  except SafetensorsError as e:  # e.g. the file was truncated after its header was read
    raise SourceError(str(e)) from None


_WILLNEED_PIECE = 1 << 20


class Readahead:
  """Asks the kernel to read the next tensors from disk while the current one is converted.

  The converter reads tensors in parameter order, not file order, and one at a time, so without this
  the disk idles while a tensor is transposed and written, and the CPU idles while the next is read.
  posix_fadvise(WILLNEED) fills the page cache asynchronously: nothing is added to this process's
  memory (the cached pages are the kernel's to evict), and `read` of a prefetched tensor only maps
  cached pages. Requests stay at most `window` bytes ahead of the tensor being read (always at least the
  next one). A wrong `order` only wastes I/O: reads never depend on it.
  """

  def __init__(self, order: list[TensorInfo], window: int = 256 << 20):
    self._order = order
    self._index = {info.key: i for i, info in enumerate(order)}
    self._ends = np.cumsum([0] + [info.nbytes for info in order])  # _ends[i]: bytes before tensor i
    self._window = window
    self._current = -1  # index of the tensor being read
    self._cond = threading.Condition()
    self._stop = False
    self._fds: dict[str, int] = {}
    self._thread = None
    if order and hasattr(os, "posix_fadvise"):
      self._thread = threading.Thread(target=self._run, name="safetensors-readahead", daemon=True)
      self._thread.start()

  def reading(self, key: str) -> None:
    i = self._index.get(key)
    if i is not None:
      with self._cond:
        self._current = max(self._current, i)
        self._cond.notify()

  def _run(self) -> None:
    nxt = 0
    try:
      while True:
        with self._cond:
          while not self._stop:
            nxt = max(nxt, self._current + 1)
            if nxt < len(self._order) and (
                nxt == self._current + 1 or self._ends[nxt] - self._ends[self._current + 1] < self._window
            ):
              break
            self._cond.wait()
          if self._stop:
            return
        info = self._order[nxt]
        fd = self._fds.get(info.file)
        if fd is None:
          fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        # Linux reads at most the device's readahead size per call (8 MB here, 128 KB by default), so
        # one call per tensor would prefetch only its first few MB.
        for start in range(info.offset, info.offset + info.nbytes, _WILLNEED_PIECE):
          if self._stop:
            return
          os.posix_fadvise(fd, start, min(_WILLNEED_PIECE, info.offset + info.nbytes - start), os.POSIX_FADV_WILLNEED)
        nxt += 1
    except OSError:  # only a hint: the reads themselves report any real problem
      pass
    finally:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()

  def close(self) -> None:
    with self._cond:
      self._stop = True
      self._cond.notify()
    if self._thread is not None:
      self._thread.join()


class TorchBinSource(Source):
  """`pytorch_model.bin` (torch.save zip format) without torch: see `torch_zip`."""

  kind = "pytorch_model.bin"

  def __init__(self, files: list[str], index_path: str | None = None, weight_map: dict[str, str] | None = None):
    super().__init__(files)
    self._stored: dict[str, StoredTensor] = {}
    self._fds: dict[str, int] = {}
    found: dict[str, str] = {}
    for path in files:
      name = os.path.basename(path)
      if not os.path.exists(path):
        raise SourceError(f"shard {name} listed in the index is missing")
      try:
        stored = read_index(path)
      except TorchZipError as e:
        raise SourceError(str(e)) from None
      for key, t in stored.items():
        if key in self._stored:
          raise SourceError(f"tensor {key!r} appears in two shards")
        self._stored[key] = t
        found[key] = name
        self.infos[key] = TensorInfo(key, t.shape, t.dtype, path, t.offset)
    if weight_map is not None:
      _check_against_index(index_path, weight_map, found)

  def read(self, key: str) -> np.ndarray:
    t = self._stored[key]
    if t.contiguous:  # mapped like a safetensors tensor: no copy
      return _mapped(self.infos[key], self._fds)
    # A view saved with its whole storage (e.g. a transposed tensor): map the storage, copy the view out.
    storage = _mapped(TensorInfo(key, (t.storage_numel,), t.dtype, t.file, t.storage_offset), self._fds)
    view = np.lib.stride_tricks.as_strided(
        storage[t.element_offset :], t.shape, tuple(s * t.dtype.itemsize for s in t.strides), writeable=False
    )
    return np.array(view)

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds.clear()


FORMATS = ("auto", "safetensors", "bin")


def open_source(src: str, fmt: str = "auto") -> Source:
  """Opens a model folder (or a single .safetensors / .bin file) and reads every header."""
  if fmt not in FORMATS:
    raise SourceError(f"unknown format {fmt!r}; expected one of {FORMATS}")
  if os.path.isfile(src):
    if src.endswith(".safetensors"):
      return _wrap(lambda: SafetensorsSource([src]))
    if src.endswith((".bin", ".pt", ".pth")):
      return TorchBinSource([src])
    raise SourceError(f"{src}: expected a .safetensors or .bin file, or a model folder")
  if not os.path.isdir(src):
    raise SourceError(f"{src}: no such file or folder")
  candidates = []
  if fmt in ("auto", "safetensors"):
    candidates += [("model.safetensors.index.json", SafetensorsSource), ("model.safetensors", SafetensorsSource)]
  if fmt in ("auto", "bin"):
    candidates += [("pytorch_model.bin.index.json", TorchBinSource), ("pytorch_model.bin", TorchBinSource)]
  for name, cls in candidates:
    path = os.path.join(src, name)
    if not os.path.exists(path):
      continue
    if name.endswith(".index.json"):
      weight_map = _load_index(path)
      files = [os.path.join(src, f) for f in sorted(set(weight_map.values()))]
      return _wrap(lambda: cls(files, path, weight_map))
    return _wrap(lambda: cls([path]))
  wanted = [n for n, _ in candidates]
  raise SourceError(f"{src}: no checkpoint found; looked for {wanted} (format={fmt!r})")


def _wrap(make):
  try:
    return make()
  except SafetensorsError as e:
    raise SourceError(str(e)) from None


def iter_infos(source: Source) -> Iterator[TensorInfo]:
  return iter(sorted(source.infos.values(), key=lambda i: i.key))
