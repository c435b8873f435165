"""The on-disk sample format: one msgpack map per ArrayRecord record.

    {"v": 1, "id": str, "messages": [{"role", "content"}, ...],
     # either decoded frames (built by tools.build_dataset) ...
     "frames": {"format": "jpeg"|"raw", "height": H, "width": W, "data": [bytes per frame] | bytes},
     "timestamps": [float seconds per frame],
     # ... or a reference decoded at training time:
     "video": {"path": str, "start": float|None, "end": float|None}}

JPEG keeps the shards ~10x smaller than raw uint8 at a small, lossy cost (quality 95 by default);
"raw" stores the uint8 frames [f, H, W, 3] bytes as-is (bit exact).
"""

from __future__ import annotations

import io
from typing import Any

import msgpack
import numpy as np

FORMAT_VERSION = 1
FRAME_FORMATS = ("jpeg", "raw")


class RecordError(ValueError):
  """A record that does not parse or lacks a field; the message names the record and field."""


def encode_frames(frames: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> dict:
  """uint8 [f, H, W, 3] -> the "frames" map."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames must be uint8 [f, h, w, 3], got {frames.dtype} {frames.shape}")
  f, h, w, _ = frames.shape
  if fmt == "raw":
    data: Any = np.ascontiguousarray(frames).tobytes()
  elif fmt == "jpeg":
    from PIL import Image

    data = []
    for fr in frames:
      buf = io.BytesIO()
      Image.fromarray(fr).save(buf, format="JPEG", quality=quality, subsampling=0)
      data.append(buf.getvalue())
  else:
    raise ValueError(f"frame format must be one of {FRAME_FORMATS}, got {fmt!r}")
  return {"format": fmt, "count": f, "height": h, "width": w, "data": data}


def decode_frames(m: dict, where: str = "record") -> np.ndarray:
  """The "frames" map -> uint8 [f, H, W, 3]; RecordError on any inconsistency."""
  try:
    fmt, f, h, w, data = m["format"], int(m["count"]), int(m["height"]), int(m["width"]), m["data"]
  except (KeyError, TypeError, ValueError) as e:
    raise RecordError(f"{where}: malformed 'frames' field ({e!r})") from None
  if fmt == "raw":
    if not isinstance(data, bytes) or len(data) != f * h * w * 3:
      raise RecordError(
          f"{where}: raw frames hold {len(data) if isinstance(data, bytes) else type(data).__name__}"
          f" bytes, expected {f}x{h}x{w}x3"
      )
    return np.frombuffer(data, np.uint8).reshape(f, h, w, 3)
  if fmt != "jpeg":
    raise RecordError(f"{where}: unknown frame format {fmt!r}, expected one of {FRAME_FORMATS}")
  from PIL import Image

  if not isinstance(data, list) or len(data) != f:
    raise RecordError(f"{where}: expected {f} JPEG frames")
  out = np.empty((f, h, w, 3), np.uint8)
  for i, b in enumerate(data):
    try:
      with Image.open(io.BytesIO(b)) as im:
        if im.size != (w, h):  # checked before decoding: a forged header may claim any size
          raise RecordError(f"{where}: frame {i} is {im.size[1]}x{im.size[0]}, expected {h}x{w}")
        arr = np.asarray(im.convert("RGB"))
    except RecordError:
      raise
    except Exception as e:  # noqa: BLE001  Pillow raises OSError, DecompressionBombError, SyntaxError, ... on bad bytes
      raise RecordError(f"{where}: frame {i} is not a readable JPEG ({type(e).__name__}: {e})") from None
    if arr.shape != (h, w, 3):
      raise RecordError(f"{where}: frame {i} is {arr.shape}, expected {(h, w, 3)}")
    out[i] = arr
  return out


def pack_record(sample: dict) -> bytes:
  """The record bytes; RecordError (naming the sample id) when a field cannot be stored, e.g. a string
  holding a lone surrogate, which is not valid UTF-8."""
  try:
    return msgpack.packb({"v": FORMAT_VERSION, **sample}, use_bin_type=True)
  except (TypeError, ValueError, OverflowError) as e:  # UnicodeEncodeError is a ValueError
    raise RecordError(f"record {sample.get('id')!r}: cannot be stored ({type(e).__name__}: {e})") from None


def unpack_record(raw: bytes, where: str = "record") -> dict:
  try:
    rec = msgpack.unpackb(raw, raw=False)
  except Exception as e:  # msgpack raises several unrelated exception types for corrupt bytes
    raise RecordError(f"{where}: not a msgpack record ({type(e).__name__}: {e})") from None
  if not isinstance(rec, dict):
    raise RecordError(f"{where}: expected a map, got {type(rec).__name__}")
  if rec.get("v") != FORMAT_VERSION:
    raise RecordError(f"{where}: format version {rec.get('v')!r}, expected {FORMAT_VERSION}")
  if "messages" not in rec or ("frames" not in rec and "video" not in rec and rec.get("text_only") is not True):
    raise RecordError(f"{where}: needs 'messages' and one of 'frames' / 'video'")
  return rec
