"""Where a build writes: a temporary folder beside OUT_DIR, swapped in only once the build is complete.

    parent/.OUT.building-PID/   the build in progress (its summary.json says "building", with pid and host);
                                after a failed or stopped build it keeps only that summary.json
    parent/.OUT.replaced-PID/   the previous build, moved aside for the instant of the swap

OUT_DIR itself is only ever absent, empty, or a complete build. A folder counts as a previous build when
its summary.json was written by this tool; only the files such a build writes (summary.json and the files its
"shards" list names, paths relative to the folder: the TFDS layout nests them in `NAME/VERSION/`) are ever
deleted, with the folders that held only them, and a previous build is replaced only with `overwrite`. A
building folder may also hold a scratch folder (its summary names it) where TFDS writes; that folder is this
tool's own and is deleted whole. Leftovers of a crashed or failed build are cleaned up by the next build
into the same OUT_DIR (or reported, when they hold other files or may belong to a build still running).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time

TOOL = "tools.build_dataset"
SUMMARY = "summary.json"
SHARD_NAME = re.compile(r"data-\d{5}-of-\d{5}\.array_record")
_BUILDING, _REPLACED = ".building-", ".replaced-"
_LEGACY_KEYS = {"manifest", "rows", "written", "skipped", "shards", "options"}  # summaries from before "tool"


class OutputError(ValueError):
  """OUT_DIR cannot be written safely; the message names the folder and what to do."""


def read_summary(folder: str) -> dict | None:
  """folder/summary.json when it parses as one written by this tool, else None."""
  try:
    with open(os.path.join(folder, SUMMARY), encoding="utf-8") as f:
      summary = json.load(f)
  except (OSError, ValueError, RecursionError):
    return None
  if not isinstance(summary, dict):
    return None
  return summary if summary.get("tool") == TOOL or _LEGACY_KEYS <= summary.keys() else None


def _own_files(folder: str, summary: dict) -> set[str]:
  """Paths (relative to `folder`) this tool wrote. Summaries with "tool" list their shards; older builds wrote
  shards in place, so every shard-named file beside an old summary is one of theirs (stale ones too)."""
  own = {SUMMARY, SUMMARY + ".tmp"}
  if summary.get("tool") == TOOL:
    return own | {_norm(s) for s in summary.get("shards") or () if isinstance(s, str) and _safe(s)}
  return own | {n for n in os.listdir(folder) if SHARD_NAME.fullmatch(n)}


def _norm(path: str) -> str:
  return os.path.normpath(path).replace(os.sep, "/")


def _safe(path: str) -> bool:
  """A relative path that stays inside its folder (a summary is read back from disk: never trust it further)."""
  norm = _norm(path)
  return bool(path) and not os.path.isabs(path) and norm != "." and not norm.startswith("../") and norm != ".."


def _parents(paths) -> set[str]:
  """Every folder on the way to each of `paths`, as "a/", "a/b/" (relative)."""
  out = set()
  for p in paths:
    parts = p.split("/")[:-1]
    out |= {"/".join(parts[: i + 1]) + "/" for i in range(len(parts))}
  return out


def tree(folder: str) -> set[str]:
  """Everything in `folder`, relative: files (and links) as "a/b", folders as "a/" (links are not followed)."""
  out = set()
  for root, dirs, files in os.walk(folder):
    rel = os.path.relpath(root, folder).replace(os.sep, "/")
    prefix = "" if rel == "." else rel + "/"
    for d in list(dirs):
      if os.path.islink(os.path.join(root, d)):
        dirs.remove(d)
        out.add(prefix + d)
      else:
        out.add(prefix + d + "/")
    out |= {prefix + f for f in files}
  return out


def _foreign(folder: str, summary: dict) -> list[str]:
  """What in `folder` this tool did not write, sorted (a folder counts as ours when it leads to our files)."""
  own = _own_files(folder, summary)
  scratch = summary.get("scratch")
  found = tree(folder)
  if isinstance(scratch, str) and _safe(scratch) and "/" not in _norm(scratch):
    found = {p for p in found if p != scratch + "/" and not p.startswith(scratch + "/")}
  return sorted(found - own - _parents(own))


def write_summary(folder: str, summary: dict) -> None:
  """Atomically (write, fsync, rename), so a crash never leaves a half-written summary.json."""
  tmp = os.path.join(folder, SUMMARY + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"tool": TOOL, **summary}, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(folder, SUMMARY))


def _delete(folder: str, names) -> None:
  """Deletes the files `names` (relative) that exist, then each folder on their way that this emptied."""
  names = {n for n in names if _safe(n)}
  for name in sorted(names):
    path = os.path.join(folder, name)
    if os.path.isfile(path) or os.path.islink(path):
      os.remove(path)
  for sub in sorted(_parents(names), key=lambda d: -d.count("/")):
    path = os.path.join(folder, sub)
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
      os.rmdir(path)


def remove_scratch(folder: str, summary: dict) -> None:
  """Deletes the scratch folder a building summary names (created by `prepare`, only this tool writes in it)."""
  scratch = summary.get("scratch")
  if isinstance(scratch, str) and _safe(scratch) and "/" not in _norm(scratch):
    path = os.path.join(folder, scratch)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)


def _remove_build(folder: str) -> list[str]:
  """Deletes this tool's files in `folder`, then the folder if that emptied it; returns the names kept."""
  summary = read_summary(folder) or {}
  own = _own_files(folder, summary) if summary else {SUMMARY + ".tmp"}
  if summary:
    remove_scratch(folder, summary)
  _delete(folder, own)
  kept = sorted(os.listdir(folder))
  if not kept:
    os.rmdir(folder)
  return kept


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _pid_of(name: str, tag: str) -> int | None:
  tail = name.rsplit(tag, 1)[-1]
  return int(tail) if tail.isdigit() else None


def _leftovers(out_dir: str) -> list[str]:
  """Cleans up (or reports) the temporary folders of earlier builds into `out_dir`; returns notes to log.

  Raises OutputError when a build into the same folder seems to be running on this host."""
  parent, base = os.path.split(out_dir)
  notes = []
  for name in sorted(os.listdir(parent)):
    path = os.path.join(parent, name)
    for tag in (_BUILDING, _REPLACED):
      if not name.startswith(f".{base}{tag}") or not os.path.isdir(path):
        continue
      pid = _pid_of(name, tag)
      summary = read_summary(path) or {}
      host = summary.get("host", socket.gethostname()) if tag == _BUILDING else socket.gethostname()
      if pid is not None and pid != os.getpid() and host == socket.gethostname() and _alive(pid):
        if tag == _BUILDING:
          raise OutputError(
              f"{out_dir}: another build into this folder is running (pid {pid}, writing {path}); "
              "wait for it or stop it"
          )
        continue
      if host != socket.gethostname():
        notes.append(f"left {path} in place: a build on host {host} wrote it; delete it once no build runs there")
      elif tag == _REPLACED and not os.path.exists(out_dir):
        os.rename(path, out_dir)  # the swap was cut between its two renames: the old dataset goes back
        notes.append(f"restored the previous dataset {out_dir} from {path} (an earlier swap was interrupted)")
      else:
        kept = _remove_build(path)
        what = "failed or interrupted build" if tag == _BUILDING else "replaced dataset"
        notes.append(
            f"removed the leftover folder {path} of a {what}"
            if not kept
            else f"left {path} in place: it holds files {TOOL} did not write ({', '.join(kept[:5])})"
        )
  return notes


def prepare(
    out_dir: str, shards: list[str], *, overwrite: bool, scratch: str | None = None
) -> tuple[str, str, list[str]]:
  """Checks OUT_DIR and creates the temporary folder beside it, whose summary already lists the `shards`
  (file names) the build will write, so a crash leaves a folder whose every file is accounted for.
  `scratch`: a subfolder created in it for a writer whose file names are only known at the end (TFDS);
  move its result in with `adopt`.

  Returns (out_dir resolved, temp folder, notes about leftovers cleaned up); OutputError when OUT_DIR is
  a file, holds files this tool did not write, or is a previous build and `overwrite` is not set.
  """
  out_dir = os.path.realpath(out_dir)  # a symlinked OUT_DIR keeps its link; the swap happens at its target
  parent = os.path.dirname(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise OutputError(f"{out_dir}: exists and is not a folder; give a new or empty folder")
  try:
    os.makedirs(parent, exist_ok=True)
    notes = _leftovers(out_dir)
  except OSError as e:
    raise OutputError(f"{out_dir}: cannot prepare the output folder ({e})") from None
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    summary = read_summary(out_dir)
    if summary is None:
      raise OutputError(
          f"{out_dir}: folder is not empty and is not a dataset written by {TOOL} (no {SUMMARY} of "
          "its own); refusing to write there, even with --overwrite; give a new or empty folder"
      )
    foreign = _foreign(out_dir, {k: v for k, v in summary.items() if k != "scratch"})
    if foreign:
      raise OutputError(
          f"{out_dir}: holds a previous build and also files {TOOL} did not write "
          f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); move them out of the "
          "folder or give another one"
      )
    if not overwrite:
      raise OutputError(
          f"{out_dir}: holds a previous build ({SUMMARY}); pass --overwrite to replace it (the new "
          "build is swapped in only once complete)"
      )
  temp = os.path.join(parent, f".{os.path.basename(out_dir)}{_BUILDING}{os.getpid()}")
  try:
    os.mkdir(temp)
  except OSError as e:
    raise OutputError(f"{out_dir}: cannot create the temporary folder beside it ({e})") from None
  building = {
      "status": "building",
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "out_dir": out_dir,
      "shards": shards,
  }
  if scratch:
    building["scratch"] = scratch
  write_summary(temp, building)
  if scratch:
    os.mkdir(os.path.join(temp, scratch))
  return out_dir, temp, notes


def adopt(temp: str, subfolder: str) -> list[str]:
  """Moves `scratch/subfolder` (a writer's complete output) up into the building folder `temp` and deletes
  the scratch folder. The summary lists the files before they move, so a crash never leaves unlisted ones.
  Returns the files' paths relative to `temp`, sorted."""
  started = read_summary(temp) or {}
  scratch = started["scratch"]
  src = os.path.join(temp, scratch, subfolder)
  files = sorted(subfolder + "/" + p for p in tree(src) if not p.endswith("/"))
  write_summary(temp, {**{k: v for k, v in started.items() if k != "tool"}, "shards": files})
  os.rename(src, os.path.join(temp, subfolder))
  remove_scratch(temp, started)
  final = {k: v for k, v in (read_summary(temp) or started).items() if k not in ("tool", "scratch")}
  write_summary(temp, final)
  return files


def _fsync_tree(folder: str) -> None:
  """Shards reach the disk before the rename publishes them, so a power cut cannot leave empty shards."""
  for root, dirs, files in os.walk(folder, topdown=False):
    for name in files + dirs:
      path = os.path.join(root, name)
      if os.path.islink(path):
        continue
      fd = os.open(path, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
  fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def commit(temp: str, out_dir: str) -> list[str]:
  """Swaps the complete build in `temp` in as `out_dir`; the previous build's files are then deleted.
  Returns notes (a previous folder kept because files appeared in it during the build)."""
  _fsync_tree(temp)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    old = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}{_REPLACED}{os.getpid()}")
    os.rename(out_dir, old)
    os.rename(temp, out_dir)
    kept = _remove_build(old)
    if kept:
      return [f"kept {old}: files {TOOL} did not write appeared in the old dataset ({', '.join(kept[:5])})"]
    return []
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)  # empty (checked by prepare); rmdir fails rather than delete anything put there since
  os.rename(temp, out_dir)
  fd = os.open(os.path.dirname(out_dir), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
  return []


def abandon(temp: str, summary: dict) -> str:
  """A build that stopped: its shards are deleted and its summary (with the reason) is kept in `temp`
  for the user to read; the next build cleans the folder up. Returns the summary's path."""
  started = read_summary(temp) or {}
  remove_scratch(temp, started)
  _delete(temp, [n for n in started.get("shards") or () if isinstance(n, str)])
  write_summary(temp, {**{k: started[k] for k in ("pid", "host", "started") if k in started}, **summary, "shards": []})
  return os.path.join(temp, SUMMARY)
