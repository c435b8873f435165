"""JSONL manifest rows -> validated sample descriptions (used by tools.build_dataset).

One JSON object per line:

    {"id": "clip-1",                       # optional; defaults to "<manifest>:<line>"
     "video": "a.mp4" | "frames_dir": "dir/" | "image": "x.jpg",   # relative paths: from the manifest's folder
     "start": 1.5, "end": 9.0,             # optional, seconds
     "conversations": [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "..."}]}

`conversations` (or `messages`) also accepts the LLaVA style {"from": "human"|"gpt"|"system", "value": ...}.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ManifestError(ValueError):
  """A malformed manifest row; the message names the line and field."""


def _check_text(value: str, where: str, field: str) -> str:
  """`value` unchanged; ManifestError when it cannot be stored as UTF-8 (a lone surrogate such as \\ud800,
  which JSON escapes allow but msgpack / the tokenizer would reject much later, far from the row)."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ManifestError(
        f"{where}: '{field}' holds {value[e.start:e.end]!r} at character {e.start}, a lone "
        "surrogate that is not valid text"
    ) from None
  return value


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  id: str
  kind: str  # "video" | "frames_dir" | "image"
  path: str  # absolute
  start: float | None
  end: float | None
  messages: list


def _seconds(value, where: str, field: str) -> float | None:
  """A clip time -> float seconds (None when absent). json reads Infinity, NaN and 1e999 as floats, and
  integers of any length; those only overflow the frame arithmetic much later, so they stop here."""
  if value is None:
    return None
  seconds = None
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    try:
      seconds = float(value)
    except OverflowError:
      seconds = math.inf
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    shown = f"{seconds!r}" if seconds is not None else f"a {type(value).__name__}"
    raise ManifestError(f"{where}: '{field}' must be a finite, non-negative number of seconds, got {shown}")
  return seconds


def _messages(raw, where: str) -> list:
  if not isinstance(raw, list) or not raw:
    raise ManifestError(f"{where}: 'conversations' must be a non-empty list")
  out = []
  for i, m in enumerate(raw):
    if not isinstance(m, dict):
      raise ManifestError(f"{where}: conversations[{i}] must be an object, got {type(m).__name__}")
    role = m.get("role", m.get("from"))
    content = m.get("content", m.get("value"))
    if role not in _LLAVA_ROLES:
      raise ManifestError(f"{where}: conversations[{i}] role {role!r} is not one of {sorted(_LLAVA_ROLES)}")
    if not isinstance(content, str):
      raise ManifestError(f"{where}: conversations[{i}] needs a string 'content' (or 'value')")
    _check_text(content, where, f"conversations[{i}].content")
    out.append({"role": _LLAVA_ROLES[role], "content": content})
  if not any(m["role"] == "assistant" for m in out):
    raise ManifestError(f"{where}: no assistant turn, so nothing to learn")
  return out


def parse_row(line: str | bytes, *, line_no: int, manifest_path: str) -> ManifestRow:
  """One manifest line (text, or raw bytes decoded here as UTF-8) -> ManifestRow; ManifestError for any bad row."""
  where = f"{manifest_path}:{line_no}"
  if isinstance(line, bytes):
    try:
      line = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ManifestError(f"{where}: not UTF-8 text (byte {line[e.start]:#04x} at offset {e.start})") from None
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
  except RecursionError:  # json's C scanner recurses once per nesting level
    raise ManifestError(f"{where}: JSON nested too deeply to read (expected one flat object per line)") from None
  except ValueError as e:  # e.g. an integer longer than Python's int conversion limit
    raise ManifestError(f"{where}: unreadable JSON value ({e})") from None
  if not isinstance(row, dict):
    raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
  kinds = [k for k in ("video", "frames_dir", "image") if k in row]
  if len(kinds) != 1:
    raise ManifestError(f"{where}: expected exactly one of 'video', 'frames_dir', 'image', got {kinds or 'none'}")
  kind = kinds[0]
  if not isinstance(row[kind], str) or not row[kind]:
    raise ManifestError(f"{where}: '{kind}' must be a non-empty path string")
  _check_text(row[kind], where, kind)
  if "\0" in row[kind]:
    raise ManifestError(f"{where}: '{kind}' holds a NUL character, which no path can")
  times = {k: _seconds(row.get(k), where, k) for k in ("start", "end")}
  if times["start"] is not None and times["end"] is not None and times["end"] <= times["start"]:
    raise ManifestError(f"{where}: 'end' ({times['end']}) must be after 'start' ({times['start']})")
  path = row[kind]
  if not os.path.isabs(path):
    path = os.path.join(os.path.dirname(os.path.abspath(manifest_path)), path)
  messages = _messages(row.get("conversations", row.get("messages")), where)
  row_id = _check_text(str(row.get("id", where)), where, "id")
  return ManifestRow(row_id, kind, path, times["start"], times["end"], messages)
