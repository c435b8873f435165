"""NaN / Inf checks for the converter: a cheap test of every block it writes, and the detail for the report.

The writer calls `all_finite` on each block right after copying it into the stored dtype (the block is
then still in cache), so one test covers NaN/Inf in the source and float32 values that overflow to
Inf in bfloat16 / float16. Only a tensor that fails it is read again, by `describe`, to say which.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np

# 2-byte floats: numpy's reductions over ml_dtypes' bfloat16 run at ~0.2 GB/s, so test the bits instead
# (|x| >= the all-ones exponent <=> NaN or Inf): (bits, abs mask, smallest non-finite |x|).
_BITS = {
    np.dtype(ml_dtypes.bfloat16): (np.uint16, np.uint16(0x7FFF), 0x7F80),
    np.dtype(np.float16): (np.uint16, np.uint16(0x7FFF), 0x7C00),
}
# Pieces that stay in L2: masking a whole 32 MB block allocated (and zeroed) a temporary of its size
# and ran at ~4.8 GB/s; 64 K-item pieces into a reused buffer at ~9 GB/s (bf16, one core).
_PIECE = 1 << 16
_scratch = threading.local()


def all_finite(a: np.ndarray) -> bool:
  """True when `a` holds no NaN and no Inf (non-float arrays: always)."""
  if a.size == 0:
    return True
  spec = _BITS.get(a.dtype)
  if spec is None:
    if a.dtype.kind != "f":
      return a.dtype.kind in "biu" or bool(np.isfinite(a).all())
    with np.errstate(invalid="ignore"):  # max/min propagate NaN (~16 GB/s for float32, no temporaries)
      return bool(np.isfinite(a.max()) and np.isfinite(a.min()))
  if not a.flags.c_contiguous:
    return bool(np.isfinite(a).all())
  uint, mask, non_finite = spec
  bits = a.reshape(-1).view(uint)
  buf = getattr(_scratch, "buf", None)
  if buf is None:
    buf = _scratch.buf = np.empty(_PIECE, np.uint16)
  for start in range(0, bits.size, _PIECE):
    piece = bits[start : start + _PIECE]
    out = buf[: piece.size]
    np.bitwise_and(piece, mask, out=out)
    if out.max() >= non_finite:
      return False
  return True


def describe(source: np.ndarray, stored_dtype) -> str | None:
  """What is not finite in `source` as stored in `stored_dtype`, in words (None: all finite).

  E.g. "2 NaN and 1 Inf in the source" or "3 finite values overflow to Inf in bfloat16 (largest |x| 3.5e+38)".
  """
  stored_dtype = np.dtype(stored_dtype)
  x = np.asarray(source)
  nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
  parts = []
  if nan or inf:
    parts.append(
        " and ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if p) + " in the source"
    )
  finite = np.isfinite(x)
  with np.errstate(over="ignore", invalid="ignore"):
    overflow = finite & np.isinf(x.astype(stored_dtype))
  count = int(overflow.sum())
  if count:
    largest = float(np.abs(x[overflow].astype(np.float64)).max())
    parts.append(
        f"{count} finite {'values overflow' if count > 1 else 'value overflows'} to Inf in "
        f"{stored_dtype.name} (largest |x| {largest:.3g})"
    )
  return "; ".join(parts) or None
