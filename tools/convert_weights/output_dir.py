"""Where the converter writes: a hidden temporary folder beside DST, swapped in only when complete.

What this module guarantees (import and export both go through `atomic_output_dir`):
  * DST is never the source, inside it, or a folder holding it (paths compared after resolving symlinks).
  * `--overwrite` replaces only a DST that is recognisably an earlier output of this tool (the files an
    import or an export writes, nothing else) or an empty folder; anything else is refused by name.
  * Until the result is complete, DST is untouched; the partial output lives in `.DST.partial-<tag>`.
    Replacing an existing DST is two renames (DST -> `.DST.old-<tag>`, partial -> DST), with SIGINT,
    SIGTERM and SIGHUP held back between them. A failure or interrupt anywhere restores the previous
    DST; a run killed outright (SIGKILL, power loss) leaves hidden folders whose tag names its host and
    process, and the next run into the same DST restores or finishes the swap and removes them when
    that process is gone. Leftovers it cannot attribute are reported, never removed.
  * A write that fails for want of space or permission ends in one ConversionError line that says so
    and names DST; the partial output is removed first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Iterable, Iterator

from kangaroo_jax.pretrained import CONFIG_FILE, REPORT_FILE, STATE_DIR
from kangaroo_jax.tokenizer import TOKENIZER_FILES
from tools.convert_weights.assemble import ConversionError

# The entries of an import result and of an export result (tokenizer files are optional in both).
_LAYOUTS = ({STATE_DIR, CONFIG_FILE, REPORT_FILE}, {"model.safetensors", "config.json", CONFIG_FILE})
_OURS = set(TOKENIZER_FILES).union(*_LAYOUTS)
_TAG = re.compile(r"^(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[a-z0-9_]+$")
_KINDS = ("partial", "old")
_ACTIVE: set[str] = set()  # tags of this process's outputs still being written or swapped


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "localhost"


def _inside(path: str, folder: str) -> bool:
  return os.path.commonpath([path, folder]) == folder and path != folder


def _hidden(dst: str, kind: str, tag: str) -> str:
  return os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{kind}-{tag}")


def _remove(folder: str, attempts: int = 20) -> None:
  """rmtree that also wins against a writer thread still finishing (Orbax's background commit)."""
  for _ in range(attempts):
    shutil.rmtree(folder, ignore_errors=True)
    if not os.path.exists(folder):
      time.sleep(0.05)
      if not os.path.exists(folder):
        return
    time.sleep(0.05)


@dataclasses.dataclass
class _Leftover:
  tag: str
  host: str | None  # None: a name this version does not write (e.g. an older converter's mkdtemp suffix)
  pid: int | None
  paths: dict[str, str]  # kind -> path


def _leftovers(dst: str) -> list[_Leftover]:
  """The hidden `.DST.partial-*` / `.DST.old-*` entries beside `dst`, grouped by tag."""
  parent, base = os.path.dirname(dst), os.path.basename(dst)
  try:
    names = os.listdir(parent)
  except OSError:
    return []
  found: dict[str, _Leftover] = {}
  for name in sorted(names):
    for kind in _KINDS:
      prefix = f".{base}.{kind}-"
      if name.startswith(prefix):
        tag = name[len(prefix) :]
        m = _TAG.match(tag)
        item = found.setdefault(tag, _Leftover(tag, m and m["host"], m and int(m["pid"]), {}))
        item.paths[kind] = os.path.join(parent, name)
  return list(found.values())


def _abandoned(item: _Leftover) -> bool:
  """True only when the process that made `item` is known to be gone (same host, no such pid, or
  this process and not one of its outputs in progress)."""
  if item.host != _host() or item.pid is None:
    return False
  if item.pid == os.getpid():
    return item.tag not in _ACTIVE
  try:
    os.kill(item.pid, 0)
  except ProcessLookupError:
    return True
  except OSError:  # e.g. EPERM: the pid exists (another user's process)
    return False
  return False


def _settle(dst: str, item: _Leftover) -> list[str]:
  """Brings an unfinished write or swap into DST to a consistent end; returns what was done.

  An `old` without its `partial` next to a DST means the swap completed (the old one is removed);
  an `old` whose swap did not complete goes back to DST (the interrupted run did not succeed, so DST
  stays as it was); a `partial` is an unfinished or unswapped output and is removed.
  """
  notes = []
  old, partial = item.paths.get("old"), item.paths.get("partial")
  if old and os.path.lexists(old):
    if not os.path.lexists(dst):
      os.rename(old, dst)
      notes.append(f"restored {dst} from {old}, left by an interrupted replacement")
    elif not (partial and os.path.lexists(partial)):
      _remove(old)
      notes.append(f"removed {old}: the previous output, already replaced by {dst}")
    else:
      notes.append(
          f"left {old} alone: {dst} exists but was not written by the run that moved {old} aside; "
          "look at both and remove the one you do not need"
      )
  if partial and os.path.lexists(partial):
    _remove(partial)
    notes.append(f"removed {partial}: the unfinished output of an interrupted run")
  return notes


def recover(dst: str) -> list[str]:
  """Settles leftovers of interrupted runs into `dst` whose process is gone; reports the others.

  Returns one line per leftover (what was done, or why it was left).
  """
  notes = []
  for item in _leftovers(dst):
    if _abandoned(item):
      try:
        notes += _settle(dst, item)
      except OSError as e:
        notes.append(f"could not clean up {', '.join(item.paths.values())} ({e.strerror}); remove it yourself")
    elif item.tag not in _ACTIVE:
      who = (
          f"process {item.pid} on {item.host}, which may still be running"
          if item.host
          else "a run this version cannot identify"
      )
      notes.append(
          f"left {', '.join(item.paths.values())} alone: written by {who}; remove it if no conversion "
          f"into {dst} is running"
      )
  return notes


def _check_replaceable(dst: str) -> None:
  """Raises unless `dst` is an empty folder or an earlier import / export result of this tool."""
  if not os.path.isdir(dst):
    raise ConversionError(f"{dst} exists and is not a folder; --overwrite replaces only an earlier output of this tool")
  names = set(os.listdir(dst))
  if not names:
    return
  for required in _LAYOUTS:
    if required <= names and names <= required | set(TOKENIZER_FILES):
      if STATE_DIR not in required or os.path.isdir(os.path.join(dst, STATE_DIR)):
        return
  foreign = sorted(names - _OURS)
  if foreign:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    why = f"it holds {shown}, which this tool does not write"
  else:
    why = "it is neither a complete import result nor a complete export result"
  raise ConversionError(
      f"{dst}: not replaced: {why}; --overwrite replaces only an earlier output of this tool "
      "(choose another output folder, or move this one away yourself)"
  )


def check_destination(dst: str, overwrite: bool, protect: Iterable[str] = (), *, quiet: bool = False) -> str:
  """Validates an output path before any work; returns it resolved. Raises ConversionError.

  `protect`: the inputs (files or folders) that DST must not be, contain, or lie inside. Leftovers of
  interrupted runs into DST are settled first (see `recover`; notes go to stderr unless `quiet`).
  """
  dst = os.path.realpath(dst)
  if os.path.basename(dst) in ("", ".", ".."):
    raise ConversionError(f"{dst}: not usable as an output folder")
  for path in protect:
    src = os.path.realpath(path)
    if dst == src:
      raise ConversionError(f"{dst}: the output would replace the input; choose another output folder")
    if _inside(src, dst):
      raise ConversionError(f"{dst}: the output folder contains the input {src}; choose another output folder")
    if _inside(dst, src):
      raise ConversionError(f"{dst}: the output folder is inside the input {src}; choose another output folder")
  notes = recover(dst)
  for note in [] if quiet else notes:
    print(f"note: {note}", file=sys.stderr)
  if os.path.lexists(dst):
    if not overwrite:
      raise ConversionError(f"{dst} already exists (pass --overwrite to replace it)")
    _check_replaceable(dst)
  return dst


_DISK_ERRORS = {
    errno.ENOSPC: "the disk is full (no space left on the device)",
    errno.EDQUOT: "the disk quota is exhausted (no space left for this user)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_TS_ERRNO = re.compile(r"os_error_code='(\d+)'")
_TS_PATH = re.compile(r'(?:Failed writing|Error writing local file|Failed to open): "([^"]+)"')


def _os_error(e: BaseException) -> tuple[int, str | None] | None:
  """(errno, path or None) behind `e`: an OSError, or TensorStore's error text, along the exception chain."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno is not None:
      return e.errno, e.filename if isinstance(e.filename, str) else None
    m = _TS_ERRNO.search(str(e)) if isinstance(e, (ValueError, RuntimeError)) else None
    if m:
      path = _TS_PATH.search(str(e))
      return int(m.group(1)), path and path.group(1)
    e = e.__cause__ or e.__context__
  return None


def disk_error(e: BaseException, dst: str) -> ConversionError | None:
  """A one-line ConversionError when `e` is a write beside `dst` (its temp folder) that failed for want
  of space or permission; None for anything else (e.g. an error reading the source)."""
  found = _os_error(e)
  if found is None or found[0] not in _DISK_ERRORS:
    return None
  code, path = found
  parent = os.path.dirname(dst)
  if path is not None:
    rel = os.path.relpath(os.path.abspath(path), parent).split(os.sep)[0]
    if rel != "." and rel != os.path.basename(dst) and not rel.startswith(f".{os.path.basename(dst)}."):
      return None  # not a path this module writes (e.g. a source file beside DST): reported as it is
  return ConversionError(
      f"{dst}: cannot write the output: {_DISK_ERRORS[code]} on {parent}; {dst} is as it "
      "was (the partial output was removed)"
  )


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
  """Holds SIGINT/SIGTERM/SIGHUP back (delivered on exit), so the two renames of a swap are not split."""
  if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
    yield
    return
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def atomic_output_dir(dst: str, overwrite: bool = False, protect: Iterable[str] = ()) -> Iterator[str]:
  """Yields a fresh temp folder beside `dst`; swapped in for `dst` on success, removed on any failure.

  Checks `dst` first (`check_destination`, quietly: callers run it, with its notes, before the slow part);
  again before the swap, since the conversion takes time.
  """
  dst = check_destination(dst, overwrite, protect, quiet=True)
  parent = os.path.dirname(dst)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-{_host()}-{os.getpid()}-", dir=parent)
  except OSError as e:
    raise disk_error(e, dst) or ConversionError(
        f"{dst}: cannot create the output there: {e.strerror} " f"({e.filename})"
    ) from None
  tag = os.path.basename(tmp)[len(f".{os.path.basename(dst)}.partial-") :]
  _ACTIVE.add(tag)
  item = _Leftover(tag, _host(), os.getpid(), {"partial": tmp, "old": _hidden(dst, "old", tag)})
  umask = os.umask(0)
  os.umask(umask)
  try:
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise stick to the result
    yield tmp
    if os.path.lexists(dst):
      if not overwrite:
        raise ConversionError(f"{dst} appeared during the conversion; not replaced (pass --overwrite to replace it)")
      _check_replaceable(dst)
      with _signals_held():
        os.rename(dst, item.paths["old"])
        os.rename(tmp, dst)
      _remove(item.paths["old"])
    else:
      os.rename(tmp, dst)
  except BaseException as e:
    try:
      _settle(dst, item)
    except OSError:  # the next run into dst settles it (this process is then gone)
      pass
    problem = disk_error(e, dst) if isinstance(e, Exception) and not isinstance(e, ConversionError) else None
    if problem is not None:
      raise problem from None
    raise
  finally:
    _ACTIVE.discard(tag)


__all__ = ["atomic_output_dir", "check_destination", "disk_error", "recover"]
