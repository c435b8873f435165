"""Multiple-choice video QA: reading MVBench / Video-MME style JSON, the prompt, and answer extraction.

Accepted benchmark shapes (JSON file):
  * a list of items;
  * {task name: [items]} (MVBench keeps one file per task; several tasks may share one file);
  * Video-MME: a list of videos, each with "questions": [items] (video fields are inherited).
Item fields (first one present wins):
  question  "question"
  options   "options" | "candidates": list of str (prefixes like "A. ", "(B) " are stripped) or {"A": text}
  answer    "answer": letter ("B", "(B)"), 0-based int index, or the text of an option
  video     "video" | "video_path" | "videoID" | "video_id" | "video_name" (relative to --video-root;
            without an extension, .mp4/.mkv/.avi/.webm/.mov/.gif are tried)
  task      "task_type" | "task" | "question_type" | the top-level key; else "all"
  id        "question_id" | "id"; else "{task}/{index}"
  clip      optional "start" / "end" seconds
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string

LETTERS = string.ascii_uppercase
VIDEO_KEYS = ("video", "video_path", "videoID", "video_id", "video_name")
TASK_KEYS = ("task_type", "task", "question_type")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov", ".gif")
INSTRUCTION = "Answer with the option's letter from the given choices directly."


class BenchmarkError(ValueError):
  """A benchmark file or item that cannot be read (names the file, item and field)."""


@dataclasses.dataclass(frozen=True)
class MCItem:
  id: str
  task: str
  video: str
  question: str
  options: tuple[str, ...]
  answer: int  # index into options
  start: float | None = None
  end: float | None = None


_PREFIX = re.compile(r"^\s*\(?([A-Z])\s*[\).:]\s*")


def _strip_letter(option: str, index: int) -> str:
  m = _PREFIX.match(option)
  if m and m.group(1) == LETTERS[index]:
    return option[m.end() :].strip()
  return option.strip()


def _first(item: dict, keys) -> object | None:
  for k in keys:
    if k in item and item[k] is not None:
      return item[k]
  return None


def _parse_item(raw: dict, *, where: str, task: str | None, index: int) -> MCItem:
  if not isinstance(raw, dict):
    raise BenchmarkError(f"{where}: expected an object, got {type(raw).__name__}")
  question = raw.get("question")
  if not isinstance(question, str) or not question.strip():
    raise BenchmarkError(f"{where}: 'question' must be a non-empty string")
  opts = _first(raw, ("options", "candidates"))
  if isinstance(opts, dict):
    opts = [opts[k] for k in sorted(opts)]
  if not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(o, str) for o in opts):
    raise BenchmarkError(f"{where}: 'options' / 'candidates' must be a list of at least 2 strings, got {opts!r:.120}")
  if len(opts) > len(LETTERS):
    raise BenchmarkError(f"{where}: {len(opts)} options; at most {len(LETTERS)} are supported")
  options = tuple(_strip_letter(o, i) for i, o in enumerate(opts))
  answer = _parse_answer(raw.get("answer"), options, where)
  video = _first(raw, VIDEO_KEYS)
  if not isinstance(video, str) or not video:
    raise BenchmarkError(f"{where}: no video field (one of {VIDEO_KEYS})")
  task = str(_first(raw, TASK_KEYS) or task or "all")
  item_id = _first(raw, ("question_id", "id"))
  clip = {}
  for k in ("start", "end"):
    v = raw.get(k)
    if v is not None:
      if not isinstance(v, (int, float)):
        raise BenchmarkError(f"{where}: '{k}' must be a number of seconds, got {v!r}")
      clip[k] = float(v)
  return MCItem(
      str(item_id) if item_id is not None else f"{task}/{index}", task, video, question.strip(), options, answer, **clip
  )


def _parse_answer(ans, options, where) -> int:
  n = len(options)
  if isinstance(ans, bool) or ans is None:
    raise BenchmarkError(f"{where}: 'answer' is missing")
  if isinstance(ans, int):
    if 0 <= ans < n:
      return ans
    raise BenchmarkError(f"{where}: answer index {ans} is out of range for {n} options")
  if isinstance(ans, str):
    s = ans.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?\.?", s)
    if m and LETTERS.index(m.group(1)) < n:
      return LETTERS.index(m.group(1))
    m = _PREFIX.match(s)
    if m:
      k = LETTERS.index(m.group(1))
      if k < n and _strip_letter(s, k) == options[k]:
        return k
    if s in options:
      return options.index(s)
  raise BenchmarkError(
      f"{where}: answer {ans!r} is neither a letter A-{LETTERS[n - 1]}, an index, " "nor an option's text"
  )


def load_benchmark(path: str) -> list[MCItem]:
  """Reads a benchmark JSON file into items (ids made unique and checked)."""
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise BenchmarkError(f"{path}: no such benchmark file") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BenchmarkError(f"{path}: not valid JSON ({e})") from None
  except OSError as e:
    raise BenchmarkError(f"{path}: cannot read the benchmark file ({e.strerror or e})") from None
  groups = data.items() if isinstance(data, dict) else [(None, data)]
  items: list[MCItem] = []
  for task, entries in groups:
    if not isinstance(entries, list):
      raise BenchmarkError(
          f"{path}: expected a list of items{f' under {task!r}' if task else ''}, " f"got {type(entries).__name__}"
      )
    for i, raw in enumerate(entries):
      where = f"{path}: item {i}" + (f" of {task!r}" if task else "")
      if isinstance(raw, dict) and isinstance(raw.get("questions"), list):  # Video-MME: one entry per video
        shared = {k: v for k, v in raw.items() if k != "questions"}
        for j, q in enumerate(raw["questions"]):
          merged = {**shared, **q} if isinstance(q, dict) else q
          items.append(_parse_item(merged, where=f"{where}, question {j}", task=task, index=len(items)))
      else:
        items.append(_parse_item(raw, where=where, task=task, index=len(items)))
  if not items:
    raise BenchmarkError(f"{path}: no items")
  seen: dict[str, int] = {}
  for i, it in enumerate(items):
    if it.id in seen:
      raise BenchmarkError(f"{path}: duplicate item id {it.id!r} (items {seen[it.id]} and {i})")
    seen[it.id] = i
  return items


def resolve_video(root: str, name: str) -> str:
  """root/name, trying the usual extensions when `name` has none; raises naming what was tried."""
  path = name if os.path.isabs(name) else os.path.join(root, name)
  if os.path.exists(path):
    return path
  tried = [path]
  if not os.path.splitext(name)[1]:
    for ext in VIDEO_EXTENSIONS:
      if os.path.exists(path + ext):
        return path + ext
      tried.append(path + ext)
  raise FileNotFoundError(
      f"video {name!r} not found under {root!r} (tried {', '.join(tried[:4])}" f"{', ...' if len(tried) > 4 else ''})"
  )


class SubtitleError(ValueError):
  """A subtitle file that cannot be read (names the file and the cue); fails that item, not the run."""


_SRT_TIME = re.compile(r"(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})")
_TAG = re.compile(r"<[^>]*>")


def read_srt(path: str) -> list[tuple[float, float, str]]:
  """SubRip cues as (start s, end s, text) in file order; markup such as Video-MME's <font ...> is removed."""
  try:
    with open(path, encoding="utf-8-sig") as f:
      blocks = re.split(r"\n\s*\n", f.read().replace("\r\n", "\n"))
  except (OSError, UnicodeDecodeError) as e:
    raise SubtitleError(f"{path}: cannot read the subtitle file ({e})") from None
  cues = []
  for n, block in enumerate(b for b in blocks if b.strip()):
    lines = block.strip().split("\n")
    timing = next((i for i, line in enumerate(lines) if "-->" in line), None)
    times = [_SRT_TIME.search(t) for t in lines[timing].split("-->")] if timing is not None else []
    if len(times) != 2 or not all(times):
      raise SubtitleError(f"{path}: cue {n + 1} has no 'HH:MM:SS,mmm --> HH:MM:SS,mmm' line")
    start, end = (
        int(h) * 3600 + int(m) * 60 + int(sec) + int(ms.ljust(3, "0")) / 1000
        for h, m, sec, ms in (t.groups() for t in times)
    )
    text = " ".join(_TAG.sub("", line).strip() for line in lines[timing + 1 :]).strip()
    if text:
      cues.append((start, end, text))
  return cues


def subtitles_at(cues: list[tuple[float, float, str]], times) -> list[str]:
  """The texts of the cues shown at any of `times` (seconds; start <= t < end), each once, in cue order:
  what a model that sees only the sampled frames could have heard."""
  ts = [float(t) for t in times]
  return [text for start, end, text in cues if any(start <= t < end for t in ts)]


def format_prompt(item: MCItem) -> str:
  lines = [f"Question: {item.question}", "Options:"]
  lines += [f"({LETTERS[i]}) {o}" for i, o in enumerate(item.options)]
  lines.append(INSTRUCTION)
  return "\n".join(lines)


def extract_choice(text: str, options) -> int | None:
  """The option index a free-text answer picks, or None.

  In order: a letter at the start ("B", "(B) ...", "B. ..."), "answer/option is (B)", a bracketed
  letter anywhere, a lone capital letter naming an option, then an option's text appearing in the answer
  (the longest such option, so "red car" beats "car").
  """
  n = len(options)
  valid = LETTERS[:n]
  s = text.strip()
  patterns = (
      rf"^\(?([{valid}])(?:\)|\.|:|,|\s|$)",
      rf"(?i:answer|option|choice)\s*(?:is|:)?\s*\(?([{valid}])\b",
      rf"\(([{valid}])\)",
      rf"(?<![A-Za-z'])([{valid}])(?![A-Za-z'])",
  )
  for p in patterns:
    m = re.search(p, s)
    if m:
      return valid.index(m.group(1))
  low = s.lower()
  hits = [(len(o), i) for i, o in enumerate(options) if o and o.lower() in low]
  if hits:
    return max(hits)[1]
  return None
