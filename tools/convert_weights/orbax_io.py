"""Writing an Orbax (OCDBT) checkpoint one tensor at a time, and reading it back one slice at a time.

Orbax's own handlers write each leaf from a complete in-memory array. A stacked parameter
(`layers` x ...) of Llama-3-8B is up to 3.8 GB, far more than the largest released tensor, so the
converter hands Orbax `LazyParam` leaves instead and registers `StreamingHandler` for them: it opens
the same TensorStore array Orbax's numpy handler would (same spec builder, so the result is an
ordinary Orbax checkpoint restored by the standard handlers), with chunks of at most `chunk_bytes`
and one layer per chunk along the stacked axis, and writes chunk-aligned blocks as each source
tensor is read. Leaves are written one after another, never concurrently, so the memory in flight
is one source tensor plus one chunk. Host numpy only: no device, no mesh, nothing replicated.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
from typing import Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import type_handlers
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handlers as np_handlers

Path = tuple[str, ...]
DEFAULT_CHUNK_BYTES = 32 << 20  # chunk = unit of writing and of sharded reading


class LazyParam:
  """A leaf to be written by StreamingHandler.

  Args:
    shape, dtype: of the stored array (our layout, target dtype).
    slices: called once at write time; yields (layer index or None for the whole array, array in our
      layout, any float dtype). Each yielded array is cast and written before the next is produced.
    stacked: the leading axis is the `layers` axis (stored one layer per chunk).
    on_written: called with the source bytes of each slice after it is written (progress).
  """

  def __init__(self, shape, dtype, slices: Callable[[], Iterator[tuple[int | None, np.ndarray]]], *,
               stacked: bool, on_written: Callable[[int], None] | None = None):
    self.shape = tuple(int(d) for d in shape)
    self.dtype = np.dtype(dtype)
    self.slices = slices
    self.stacked = stacked
    self.on_written = on_written

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)


def _blocks(shape: tuple[int, ...], chunk: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
  grid = [range(0, n, c) for n, c in zip(shape, chunk)]
  for starts in itertools.product(*grid):
    yield tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, chunk, shape))


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_TRANSPOSE_ROWS = 16  # rows of the source per strided copy: measured fastest for 2- and 4-byte types


def contiguous(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """`a` as a C-contiguous array of `dtype`, fast for the transposed views of Linear weights.

  numpy's plain copy of a large transposed matrix runs at ~0.25 GB/s (every element a cache/TLB
  miss); copying 16 source rows at a time runs at ~2.5 GB/s. Bits are moved as unsigned ints, so
  the result is bit-identical to `np.array(a, dtype, order="C")`.
  """
  dtype = np.dtype(dtype)
  if a.flags.c_contiguous:
    return a if a.dtype == dtype else a.astype(dtype)
  if a.ndim != 2 or a.strides[0] != a.dtype.itemsize or a.dtype.itemsize not in _UINT:
    return np.array(a, dtype=dtype, order="C")
  src = a.T.view(_UINT[a.dtype.itemsize])  # rows of the source are (nearly) contiguous
  out = np.empty(a.shape, src.dtype)
  for i in range(0, src.shape[0], _TRANSPOSE_ROWS):
    out[:, i:i + _TRANSPOSE_ROWS] = src[i:i + _TRANSPOSE_ROWS].T
  out = out.view(a.dtype)
  return out if out.dtype == dtype else out.astype(dtype)


def write_context() -> ts.Context:
  """Orbax's OCDBT context, without an fsync per write: `fsync_tree` flushes once before the rename."""
  return ts.Context({"file_io_concurrency": {"limit": 128}, "file_io_sync": False,
                     "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})


def fsync_tree(root: str) -> None:
  """Flushes every file and folder under `root` to disk (once, instead of after every chunk)."""
  for folder, _, files in os.walk(root):
    for name in files:
      fd = os.open(os.path.join(folder, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


class StreamingHandler(np_handlers.NumpyHandler):
  """Writes LazyParam leaves sequentially, chunk by chunk; stored as 'np.ndarray' (standard restore).

  Up to `max_pending` chunk writes are in flight while the next chunk is prepared.
  """

  def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_pending: int = 2):
    super().__init__(deepcopy_host_arrays=False)
    self.chunk_bytes = chunk_bytes
    self.max_pending = max_pending
    self._context = None

  async def _background_serialize(self, values, infos, args=None):
    if self._context is None:
      self._context = write_context()
    for value, info in zip(values, infos):
      await info.await_path_creation()
      save_args = ocp.SaveArgs(chunk_byte_size=self.chunk_bytes, shard_axes=(0,) if value.stacked else ())
      spec = ts_utils.build_array_write_spec(
          info=info, arg=save_args, global_shape=value.shape, local_shape=value.shape, dtype=value.dtype,
          use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(
              use_ocdbt=info.is_ocdbt_checkpoint, override_ocdbt_process_id=self._override_ocdbt_process_id),
          metadata_key=self._metadata_key)
      context = self._context if info.is_ocdbt_checkpoint else info.ts_context
      store = await ts.open(ts.Spec(spec.json), create=True, open=True, context=context)
      chunk = tuple(store.chunk_layout.write_chunk.shape)
      if value.stacked and chunk[0] != 1:
        raise AssertionError(f"{info.name}: stacked parameter got chunk shape {chunk}; expected one layer per chunk")
      pending = collections.deque()
      try:
        for layer, arr in value.slices():
          lead = () if layer is None else (layer,)
          want = value.shape[len(lead):]
          if tuple(arr.shape) != want:
            raise AssertionError(f"{info.name}[{layer}]: produced shape {arr.shape}, expected {want}")
          for block in _blocks(want, chunk[len(lead):]):
            data = contiguous(arr[block], value.dtype)
            # The block is never modified afterwards, so TensorStore may keep a reference instead of a copy.
            pending.append(store[lead + block].write(data, can_reference_source_data_indefinitely=True))
            del data
            while len(pending) > self.max_pending:
              await pending.popleft()
          if value.on_written is not None:
            value.on_written(arr.nbytes)
          del arr
        while pending:
          await pending.popleft()
      finally:
        # On an error, let the writes already issued finish before the caller deletes the folder.
        for write in pending:
          try:
            await write
          except Exception:  # the original error is the one to report
            pass


def save_streaming(directory: str, tree: dict, chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_pending: int = 2) -> None:
  """Saves a nested dict of LazyParam as an Orbax PyTree checkpoint (OCDBT, zarr, uncompressed) at `directory`.

  bf16 weights barely compress, and compression would cost most of the conversion time.
  """
  registry = type_handlers.create_type_handler_registry(
      (LazyParam, StreamingHandler(chunk_bytes, max_pending)),
      (jax.Array, type_handlers.ArrayHandler()),
      (np.ndarray, np_handlers.NumpyHandler()),
  )
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=False, use_compression=False,
                                        type_handler_registry=registry)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(os.path.abspath(directory), args=ocp.args.PyTreeSave(tree))


class StoredParams:
  """Read access to the arrays of a checkpoint written by `save_streaming`, one (layer) slice at a time."""

  def __init__(self, directory: str, cache_bytes: int = 0):
    self.directory = os.path.abspath(directory)
    meta_path = os.path.join(self.directory, "_METADATA")
    try:
      with open(meta_path) as f:
        meta = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"{directory}: not an Orbax PyTree checkpoint ({e})") from None
    self.use_ocdbt = bool(meta.get("use_ocdbt", True))
    self.use_zarr3 = bool(meta.get("use_zarr3", False))
    self.paths: list[Path] = []
    for entry in meta["tree_metadata"].values():
      self.paths.append(tuple(str(k["key"]) for k in entry["key_metadata"]))
    self._context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes},
                                "cache_pool#ocdbt": {"total_bytes_limit": 64 << 20}})
    self._open: dict[Path, ts.TensorStore] = {}

  def store(self, path: Path) -> ts.TensorStore:
    if path not in self._open:
      kv = ts_utils.build_kvstore_tspec(self.directory, ".".join(path), use_ocdbt=self.use_ocdbt)
      spec = {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kv}
      self._open[path] = ts.open(spec, open=True, read=True, context=self._context).result()
    return self._open[path]

  def shape_dtype(self, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    t = self.store(path)
    return tuple(t.shape), np.dtype(t.dtype.numpy_dtype)

  def read(self, path: Path, layer: int | None = None) -> np.ndarray:
    t = self.store(path)
    return np.asarray((t if layer is None else t[layer]).read().result())
