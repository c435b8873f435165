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

import itertools
import os
import signal

import jax
import numpy as np

# How long a process waits at a barrier for the others (startup skew, compilation on the slowest
# host) before it fails with BarrierTimeoutError.
BARRIER_TIMEOUT_S = float(os.environ.get("KANGAROO_BARRIER_TIMEOUT_S", "1800"))

_invocations = itertools.count()  # one namespace per train() call; processes call train() together


class BarrierTimeoutError(RuntimeError):
  """Not all processes reached a barrier in time."""


class PreemptionProtocolError(RuntimeError):
  """The processes could not agree on the step to stop at (should not happen; see Preemption)."""


def _client():
  from jax._src import distributed
  return distributed.global_state.client


class Coordinator:
  """Barriers and keys of one train() invocation. All processes create it and call its barriers in
  the same order."""

  def __init__(self):
    self.multi = jax.process_count() > 1
    self.client = _client() if self.multi else None
    self.process = jax.process_index()
    self.prefix = f"kangaroo_train/{next(_invocations)}" if self.multi else ""
    self._seq = itertools.count()

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
          f"process {self.process}/{jax.process_count()}: not all processes reached '{name}' within "
          f"{timeout_s:.0f}s (another process failed or is stuck; see its log). Set "
          f"KANGAROO_BARRIER_TIMEOUT_S to wait longer. Cause: {e}") from e


class Preemption:
  """SIGTERM (TPU preemption / scheduler stop) sets a flag; the loop saves and exits at a step boundary.

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

  def __init__(self, coord: Coordinator):
    self.coord = coord
    self.flag = False
    self._published = False
    self._old = None

  def __enter__(self):
    # With jax.distributed this replaces the distributed runtime's own SIGTERM notifier (only
    # used by multihost_utils.reached_preemption_sync_point, which this loop does not use).
    self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.flag = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._old)

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
          f"{step}; the processes would save different steps")
    return True
