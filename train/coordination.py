"""Cross-process coordination of a multi-process training run, through JAX's coordination service.

Everything here goes through the distributed runtime's key-value store and barriers (gRPC to the
coordinator that `jax.distributed.initialize` started), never through device collectives, and
every wait has a timeout that ends in a clear error. With one process every call is a no-op (or
reads a local flag), so the single-process path costs nothing.

Why not device collectives: on CPU they run over gloo, and the first collective over a new group
of devices builds a gloo context whose rendezvous gives up after 30 s. When two processes reach
their first train step more than 30 s apart (compiling it under CPU load is enough), one fails
with `Gloo context initialization failed: DEADLINE_EXCEEDED` and the other hangs in gloo and then
at exit. Hence `barrier()` right before the first collectives of a run, and a preemption
agreement that needs no collective at all.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading

import numpy as np  # jax is imported where used: `python -m train` installs STOP before that slow import

# How long a process waits at a barrier for the others (startup skew, compilation on the slowest
# host) before it fails with BarrierTimeoutError.
BARRIER_TIMEOUT_S = float(os.environ.get("KANGAROO_BARRIER_TIMEOUT_S", "1800"))

_invocations = itertools.count()  # one namespace per train() call; processes call train() together


class BarrierTimeoutError(RuntimeError):
  """Not all processes reached a barrier in time."""


class PreemptionProtocolError(RuntimeError):
  """The processes could not agree on the step to stop at (should not happen; see Preemption)."""


class Interrupted(BaseException):
  """SIGTERM arrived in a phase that can end at once without losing anything (startup, the export).

  `phase` is "startup" or "export"; the message says what state the workdir is in. A BaseException,
  like KeyboardInterrupt, so that no `except Exception` on the way (a restore that tries the next
  checkpoint when one fails to read) mistakes it for a failure of what it interrupted.
  """

  def __init__(self, phase: str, message: str = ""):
    super().__init__(message or f"SIGTERM during {phase}")
    self.phase = phase


class StopSignal:
  """The process's SIGTERM state, shared by every phase of a run.

  The handler only sets `received`, except inside `stoppable(phase)`, where it raises Interrupted
  (once) so that a long startup (restore, init) or export ends within the grace period instead of
  running to completion. The training loop never raises: it stops at a step boundary with a save
  (see Preemption). `python -m train` installs the handler before its slow imports (`install`);
  `train()` called from Python installs it for the duration of the call (`handling`).
  """

  def __init__(self):
    self.received = False
    self._phase: str | None = None
    self._installed_by: str | None = None  # "process" (permanent) | "call" (restored at the end) | None
    self._previous = None

  def _handle(self, signum, frame):
    self.received = True
    if self._phase is not None:
      phase, self._phase = self._phase, None  # raise once: cleanup after it must not be interrupted again
      raise Interrupted(phase)

  def install(self) -> None:
    """Keeps the handler for the rest of the process (the CLI: the process ends with the run)."""
    previous = signal.signal(signal.SIGTERM, self._handle)
    if self._installed_by is None:
      self._previous = previous
    self._installed_by = "process"

  @contextlib.contextmanager
  def handling(self):
    """The handler for one train() call, unless the process already installed it; restores the previous
    handler (and forgets the signal) afterwards, so a library caller's process stays killable."""
    if threading.current_thread() is not threading.main_thread():
      yield self  # signals only reach the main thread; a train() in another thread cannot catch them
      return
    if self._installed_by is not None:
      # Armed again: jax.distributed.initialize (after `install`) puts its own preemption notifier
      # on SIGTERM, and then this handler would never run.
      signal.signal(signal.SIGTERM, self._handle)
      yield self
      return
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    self._installed_by = "call"
    try:
      yield self
    finally:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed_by, self._previous, self.received = None, None, False

  @contextlib.contextmanager
  def stoppable(self, phase: str):
    """Inside, SIGTERM raises Interrupted(phase); on entry too, if it already arrived."""
    if self.received:
      raise Interrupted(phase)
    outer, self._phase = self._phase, phase
    try:
      yield
    finally:
      self._phase = outer


STOP = StopSignal()


def _client():
  from jax._src import distributed

  return distributed.global_state.client


class Coordinator:
  """Barriers and keys of one train() invocation. All processes create it and call its barriers in
  the same order."""

  def __init__(self):
    import jax

    self.count = jax.process_count()
    self.multi = self.count > 1
    self.client = _client() if self.multi else None
    self.process = jax.process_index()
    self.prefix = f"kangaroo_train/{next(_invocations)}" if self.multi else ""
    self._seq = itertools.count()

  def gather(self, name: str, value: str) -> list[str]:
    """Every process's `value` (index = process), after all of them published theirs."""
    if not self.multi:
      return [value]
    if self.client is None:  # no coordination service: bytes over a device collective
      from jax.experimental import multihost_utils

      codes = np.frombuffer(value.encode()[:256].ljust(256), np.uint8)
      rows = np.asarray(multihost_utils.process_allgather(codes))
      return [bytes(r).decode(errors="replace").rstrip() for r in rows]
    key_dir = f"{self.prefix}/gather/{next(self._seq)}/{name}/"
    self.client.key_value_set(f"{key_dir}{self.process}", value)
    self.barrier(f"gather/{name}")
    entries = dict(self.client.key_value_dir_get(key_dir))
    return [entries[f"{key_dir}{i}"] for i in range(self.count)]

  def barrier(self, name: str, timeout_s: float | None = None) -> None:
    """Blocks until every process reached the barrier `name`; BarrierTimeoutError after `timeout_s`."""
    if not self.multi:
      return
    timeout_s = BARRIER_TIMEOUT_S if timeout_s is None else timeout_s
    if self.client is None:  # multi-process without jax.distributed (no coordination service)
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"{self.prefix}/{name}")
      return
    barrier_id = f"{self.prefix}/barrier/{next(self._seq)}/{name}"
    try:
      self.client.wait_at_barrier(barrier_id, int(timeout_s * 1000))
    except Exception as e:  # jax.errors.JaxRuntimeError (DEADLINE_EXCEEDED, or a peer failed)
      raise BarrierTimeoutError(
          f"process {self.process}/{self.count}: not all processes reached '{name}' within "
          f"{timeout_s:.0f}s (another process failed or is stuck; see its log). Set "
          f"KANGAROO_BARRIER_TIMEOUT_S to wait longer. Cause: {e}"
      ) from e


class Preemption:
  """SIGTERM (TPU preemption / scheduler stop) sets a flag; the loop saves and exits at a step boundary.

  The flag is STOP.received, so a signal that arrived during startup in a multi-process run (where
  startup is not interruptible: the peers would wait for this process at a barrier) stops the
  first steps here.

  One process: the step at which the flag is seen. Several processes (all must save the same step,
  and only some may get the signal): a process that got it publishes `<prefix>/preempt/<process>`
  = the number of steps it had dispatched, *before* it dispatches the next one (`publish`). After
  dispatching step k and waiting for step k-1's metrics, every process reads that key directory
  (one non-blocking RPC, `agreed`) and stops at k = (smallest published value) + 2.

  Why everyone reaches the same k without a barrier: a request published with value v precedes
  the requester's dispatch of step v+1; a train step finishes only once every process has
  dispatched it (its gradient reduction spans all processes), and each process waits for step v+1
  before its check at step v+2. So by its check at k every process sees every request with value
  <= k-2; with M the smallest value ever published, no process stops before M+2 and all stop at it.
  """

  def __init__(self, coord: Coordinator, stop: StopSignal = STOP):
    self.coord = coord
    self.stop = stop
    self._published = False
    self._handling = None

  @property
  def flag(self) -> bool:
    return self.stop.received

  def __enter__(self):
    # With jax.distributed this replaces the distributed runtime's own SIGTERM notifier (only
    # used by multihost_utils.reached_preemption_sync_point, which this loop does not use).
    self._handling = self.stop.handling()
    self._handling.__enter__()
    return self

  def __exit__(self, *exc):
    self._handling.__exit__(*exc)

  @property
  def _key_dir(self) -> str:
    return f"{self.coord.prefix}/preempt/"

  def publish(self, step: int) -> None:
    """Call before dispatching step `step + 1`, `step` being the steps dispatched so far."""
    if self.flag and not self._published and self.coord.client is not None:
      self.coord.client.key_value_set(f"{self._key_dir}{self.coord.process}", str(step))
      self._published = True

  def agreed(self, step: int) -> bool:
    """True on every process at the same `step` once any process got the signal. Call after
    dispatching `step` and waiting for the metrics of `step - 1`."""
    if not self.coord.multi:
      return self.flag
    if self.coord.client is None:  # no coordination service: fall back to a device collective
      from jax.experimental import multihost_utils

      return bool(np.max(multihost_utils.process_allgather(np.int32(self.flag))))
    entries = self.coord.client.key_value_dir_get(self._key_dir)
    if not entries:
      return False
    first = min(int(v) for _, v in entries)
    if step < first + 2:
      return False
    if step > first + 2:
      raise PreemptionProtocolError(
          f"process {self.coord.process}: saw a stop request published after step {first} only at step "
          f"{step}; the processes would save different steps"
      )
    return True
