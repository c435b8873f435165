"""A dependency-free progress bar: tensors and bytes done, throughput, ETA (stderr)."""

from __future__ import annotations

import sys
import time


def _size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if n < 1024 or unit == "TB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return f"{n:.1f} TB"


class Progress:
  """`update(tensors, nbytes)` after each tensor; redraws at most every `interval` seconds.

  On a terminal the bar is redrawn in place; otherwise (logs, CI) a line is printed per 10 %.
  """

  def __init__(
      self,
      total_tensors: int,
      total_bytes: int,
      label: str = "",
      *,
      enabled: bool = True,
      stream=None,
      interval: float = 0.2,
  ):
    self.total_tensors, self.total_bytes = total_tensors, max(total_bytes, 1)
    self.label = label
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.interval = interval
    self.tensors = self.bytes = 0
    self.start = self._last = time.perf_counter()
    self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self._decile = -1

  def update(self, tensors: int = 1, nbytes: int = 0) -> None:
    self.tensors += tensors
    self.bytes += nbytes
    if not self.enabled:
      return
    now = time.perf_counter()
    if self._tty:
      if now - self._last >= self.interval or self.tensors >= self.total_tensors:
        self._last = now
        self.stream.write("\r" + self.line(now))
        self.stream.flush()
    else:
      decile = int(10 * self.bytes / self.total_bytes)
      if decile > self._decile:
        self._decile = decile
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()

  def line(self, now: float | None = None) -> str:
    now = time.perf_counter() if now is None else now
    frac = min(self.bytes / self.total_bytes, 1.0)
    bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
    elapsed = max(now - self.start, 1e-9)
    rate = self.bytes / elapsed
    eta = (self.total_bytes - self.bytes) / rate if rate > 0 else float("inf")
    eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
    return (
        f"{self.label} [{bar}] {self.tensors}/{self.total_tensors} tensors "
        f"{_size(self.bytes)}/{_size(self.total_bytes)} {_size(rate)}/s eta {eta_s}"
    )

  def close(self) -> None:
    if self.enabled and self._tty:
      self.stream.write("\r" + self.line() + "\n")
      self.stream.flush()
