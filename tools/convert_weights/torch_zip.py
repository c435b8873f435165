"""`torch.save` checkpoints (the zip format, torch >= 1.6) read without torch.

Such a file is an uncompressed zip: `<name>/data.pkl` pickles the state dict, and each tensor's
storage is the member `<name>/data/<key>`, its raw bytes. The pickle only refers to a handful of
globals (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `torch.<Type>Storage`) and to
storages by persistent id `('storage', <Type>Storage, key, location, numel)`. `read_index` unpickles
with exactly those allowed, recording where each tensor's bytes lie in the file, so the converter
maps them like safetensors tensors. Anything else in the pickle (code, other classes) is refused,
as `torch.load(weights_only=True)` would.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile

import numpy as np


class TorchZipError(ValueError):
  pass


def _storage_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes

  return {
      "FloatStorage": np.dtype(np.float32),
      "DoubleStorage": np.dtype(np.float64),
      "HalfStorage": np.dtype(np.float16),
      "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
      "Float8_e4m3fnStorage": np.dtype(ml_dtypes.float8_e4m3fn),
      "Float8_e5m2Storage": np.dtype(ml_dtypes.float8_e5m2),
      "LongStorage": np.dtype(np.int64),
      "IntStorage": np.dtype(np.int32),
      "ShortStorage": np.dtype(np.int16),
      "CharStorage": np.dtype(np.int8),
      "ByteStorage": np.dtype(np.uint8),
      "BoolStorage": np.dtype(np.bool_),
  }


@dataclasses.dataclass(frozen=True)
class StoredTensor:
  """Where one tensor's elements lie in the file (nothing is read)."""

  key: str
  dtype: np.dtype
  shape: tuple[int, ...]
  strides: tuple[int, ...]  # in elements, as torch keeps them
  file: str
  storage_offset: int  # absolute byte offset of the storage's first element in `file`
  storage_numel: int
  element_offset: int  # first element of the tensor within its storage

  @property
  def contiguous(self) -> bool:
    expected, step = [], 1
    for n in reversed(self.shape):
      expected.append(step)
      step *= n
    return all(n == 1 or s == e for n, s, e in zip(self.shape, self.strides, reversed(expected)))

  @property
  def offset(self) -> int:
    """Absolute byte offset of the tensor's first element."""
    return self.storage_offset + self.element_offset * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  dtype: np.dtype
  key: str
  numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  storage: _StorageRef
  element_offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  if not isinstance(storage, _StorageRef):
    raise TorchZipError(f"a tensor refers to {type(storage).__name__}, not to a storage")
  return _TensorRef(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


class _Unpickler(pickle.Unpickler):

  def __init__(self, data: bytes, name: str):
    super().__init__(io.BytesIO(data))
    self._name = name
    self._dtypes = _storage_dtypes()

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      import collections

      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor_v2
    if module == "torch" and name in self._dtypes:
      return _StorageType(name)
    raise TorchZipError(
        f"{self._name}: the pickle refers to {module}.{name}, which a state dict of tensors never "
        "needs; refusing to load it"
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise TorchZipError(
          f"{self._name}: unexpected persistent id {pid!r} (expected ('storage', <Type>Storage, key, "
          "location, numel))"
      )
    return _StorageRef(self._dtypes[pid[1].name], str(pid[2]), int(pid[4]))


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we skip, name length, extra length


def _member_data_offset(f, member: zipfile.ZipInfo) -> int:
  """Absolute offset of an uncompressed member's bytes (after its local header, whose extra field
  may differ from the central directory's)."""
  f.seek(member.header_offset)
  raw = f.read(_LOCAL_HEADER.size)
  if len(raw) != _LOCAL_HEADER.size:
    raise TorchZipError(f"local header of {member.filename} is cut short")
  signature, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
  if signature != b"PK\x03\x04":
    raise TorchZipError(f"no local header at the recorded offset of {member.filename}")
  return member.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def read_index(path: str) -> dict[str, StoredTensor]:
  """{key: StoredTensor} of a torch.save'd state dict; raises TorchZipError naming what is wrong."""
  name = os.path.basename(path)
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    raise TorchZipError(
        f"{name}: not a (complete) torch zip checkpoint; the file is truncated, corrupt, or in the "
        "legacy pre-1.6 format (re-save it with torch.save or convert to safetensors)"
    ) from None
  with archive, open(path, "rb") as f:
    pickles = [m for m in archive.namelist() if m.endswith("/data.pkl") and m.count("/") == 1]
    if len(pickles) != 1:
      raise TorchZipError(f"{name}: expected one <name>/data.pkl in the archive, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder").strip() != b"little":
      raise TorchZipError(f"{name}: saved on a big-endian machine; only little-endian checkpoints are supported")
    try:
      state = _Unpickler(archive.read(pickles[0]), name).load()
    except TorchZipError:
      raise
    except Exception as e:  # a damaged pickle raises anything from EOFError to UnpicklingError
      raise TorchZipError(f"{name}: data.pkl cannot be read ({type(e).__name__}: {e}); the file is corrupt") from None
    if not isinstance(state, dict):
      raise TorchZipError(f"{name}: expected a state dict, found {type(state).__name__}")
    storages: dict[str, tuple[int, _StorageRef]] = {}
    out = {}
    for key, t in state.items():
      if not isinstance(t, _TensorRef):
        raise TorchZipError(f"{name}: entry {key!r} is a {type(t).__name__}, not a tensor")
      ref = t.storage
      if ref.key not in storages:
        try:
          member = archive.getinfo(f"{prefix}data/{ref.key}")
        except KeyError:
          raise TorchZipError(f"{name}: storage {ref.key} of {key!r} is missing from the archive") from None
        if member.compress_type != zipfile.ZIP_STORED:
          raise TorchZipError(f"{name}: storage {ref.key} is compressed; torch.save writes them uncompressed")
        if member.file_size != ref.numel * ref.dtype.itemsize:
          raise TorchZipError(
              f"{name}: storage {ref.key} holds {member.file_size} bytes; {ref.numel} x "
              f"{ref.dtype} needs {ref.numel * ref.dtype.itemsize}"
          )
        storages[ref.key] = (_member_data_offset(f, member), ref)
      start, ref = storages[ref.key]
      if len(t.strides) != len(t.shape):
        raise TorchZipError(f"{name}: {key!r} has shape {t.shape} but strides {t.strides}")
      last = t.element_offset + sum((n - 1) * s for n, s in zip(t.shape, t.strides)) if math.prod(t.shape) else -1
      if t.element_offset < 0 or min(t.strides, default=0) < 0 or last >= ref.numel:
        raise TorchZipError(
            f"{name}: {key!r} (offset {t.element_offset}, shape {t.shape}, strides {t.strides}) "
            f"reaches outside its storage of {ref.numel} elements"
        )
      out[str(key)] = StoredTensor(str(key), ref.dtype, t.shape, t.strides, path, start, ref.numel, t.element_offset)
    return out
