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
import os

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ManifestError(ValueError):
  """A malformed manifest row; the message names the line and field."""


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  id: str
  kind: str           # "video" | "frames_dir" | "image"
  path: str           # absolute
  start: float | None
  end: float | None
  messages: list


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
    out.append({"role": _LLAVA_ROLES[role], "content": content})
  if not any(m["role"] == "assistant" for m in out):
    raise ManifestError(f"{where}: no assistant turn, so nothing to learn")
  return out


def parse_row(line: str, *, line_no: int, manifest_path: str) -> ManifestRow:
  where = f"{manifest_path}:{line_no}"
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(row, dict):
    raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
  kinds = [k for k in ("video", "frames_dir", "image") if k in row]
  if len(kinds) != 1:
    raise ManifestError(f"{where}: expected exactly one of 'video', 'frames_dir', 'image', got {kinds or 'none'}")
  kind = kinds[0]
  if not isinstance(row[kind], str) or not row[kind]:
    raise ManifestError(f"{where}: '{kind}' must be a non-empty path string")
  times = {}
  for k in ("start", "end"):
    v = row.get(k)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
      raise ManifestError(f"{where}: '{k}' must be a non-negative number of seconds, got {v!r}")
    times[k] = None if v is None else float(v)
  if times["start"] is not None and times["end"] is not None and times["end"] <= times["start"]:
    raise ManifestError(f"{where}: 'end' ({times['end']}) must be after 'start' ({times['start']})")
  path = row[kind]
  if not os.path.isabs(path):
    path = os.path.join(os.path.dirname(os.path.abspath(manifest_path)), path)
  messages = _messages(row.get("conversations", row.get("messages")), where)
  return ManifestRow(str(row.get("id", where)), kind, path, times["start"], times["end"], messages)
