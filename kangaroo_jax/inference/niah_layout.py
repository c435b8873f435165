"""Where a needle goes in a haystack of frames (video needle-in-a-haystack), as pure index arithmetic.

A haystack of `length` frames gets a needle of `needle_frames` frames in place of the frames
[start, start + needle_frames), with

    start = round(depth * (length - needle_frames))          (align = 1)

depth 0 puts the needle first, depth 1 last. Python's round (half to even) is used, so the formula is the
same one a reader computes in Python. With `align = a > 1` the start is rounded to a multiple of `a`
instead (`round(depth * (length - needle_frames) / a) * a`, at most the last aligned start that fits),
e.g. a = 2 keeps a 2-frame needle inside one patchify group rather than averaged with a haystack frame.
The needle replaces haystack frames, so the model always sees exactly `length` frames.
"""

from __future__ import annotations

import math

import numpy as np


def check_placement(length: int, depth: float, needle_frames: int, align: int = 1) -> None:
  """ValueError naming the value when a needle of `needle_frames` cannot go at `depth` of `length` frames."""
  if not isinstance(length, int) or length < 1:
    raise ValueError(f"length must be a positive int, got {length!r}")
  if not isinstance(needle_frames, int) or not 1 <= needle_frames <= length:
    raise ValueError(f"needle_frames must be an int in [1, length={length}], got {needle_frames!r}")
  if not isinstance(align, int) or align < 1:
    raise ValueError(f"align must be a positive int, got {align!r}")
  if not (isinstance(depth, (int, float)) and math.isfinite(depth) and 0.0 <= depth <= 1.0):
    raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")


def needle_start(length: int, depth: float, needle_frames: int, align: int = 1) -> int:
  """The first frame index the needle occupies (module doc's formula)."""
  check_placement(length, depth, needle_frames, align)
  room = length - needle_frames  # the last start that still fits the whole needle
  if align == 1:
    return round(depth * room)
  return min(round(depth * room / align), room // align) * align


def needle_indices(length: int, depth: float, needle_frames: int, align: int = 1) -> list[int]:
  """The frame indices [needle_frames] the needle occupies, ascending and contiguous."""
  start = needle_start(length, depth, needle_frames, align)
  return list(range(start, start + needle_frames))


def place_needle(haystack: np.ndarray, needle: np.ndarray, start: int) -> np.ndarray:
  """haystack [length, ...] with needle [n, ...] written over frames [start, start + n); a new array."""
  haystack, needle = np.asarray(haystack), np.asarray(needle)
  if haystack.shape[1:] != needle.shape[1:]:
    raise ValueError(f"needle frames {needle.shape[1:]} differ from haystack frames {haystack.shape[1:]}")
  if not 0 <= start <= haystack.shape[0] - needle.shape[0]:
    raise ValueError(f"a {needle.shape[0]}-frame needle at {start} does not fit {haystack.shape[0]} frames")
  out = haystack.copy()
  out[start : start + needle.shape[0]] = needle
  return out
