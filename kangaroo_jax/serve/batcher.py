"""The bounded request queue and the one worker thread that owns the engine.

Batching rule: the worker takes the oldest waiting job, waits up to `window_s` for more, and runs every waiting
job COMPATIBLE with it (up to `max_batch`) in one `Engine.generate` call. Compatible means:
  * the same sampling: all greedy requests together; sampled requests with the same temperature / top_p / top_k
    and no seed together (one random seed per batch); a sampled request WITH a seed runs alone, because a row's
    random draws depend on the batch it is in, and a seed should reproduce the answer;
  * the same prefill chunk size (the engine picks it from the longest prompt of a call and prefills every row
    over the padded length): a 20-token question never pays for a 2,000-token neighbour;
  * the same number of visual tokens (0 for text only): the engine merges one [batch, n_vis, embed] block.
Batching does not change what a row attends to: the engine right-pads rows and masks every slot past a row's
length, so a row's logits equal its single-request logits up to float rounding (XLA picks matmul kernels by
matrix size, so the bits may differ: ~1e-7 in float32 on CPU). Greedy answers are therefore the same unless two
tokens tie within that rounding.
Each video is encoded on its own (batch of one) and kept in the VisualCache, so follow-up turns that re-send it
skip decoding and encoding. Calls are padded to a power-of-two batch (repeating a row) so a server compiles
one program per power of two, not per batch size. Rows stop streaming at their own max_tokens while the call
runs on for longer rows; a call ends at once when its other rows are answered and the rest were abandoned.
A row that ends with the stop token is answered when its call ends (the engine does not report stops early).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import secrets
import sys
import threading
import time
import traceback

import jax
import jax.numpy as jnp

from kangaroo_jax.attention.context_parallel import context_size
from kangaroo_jax.inference.chat import IncrementalDecoder
from kangaroo_jax.inference.engine import Engine, prefill_chunk_length
from kangaroo_jax.serve.errors import ApiError, overloaded
from kangaroo_jax.serve.prepare import Prepared


class Job:
  """One request in flight. The worker thread reports through `emit`, into an asyncio queue of the request's
  event loop: ("text", piece), then ("end", finish_reason) or ("error", ApiError)."""

  def __init__(self, prepared: Prepared, loop: asyncio.AbstractEventLoop, tokenizer):
    self.prepared, self.loop = prepared, loop
    self.events: asyncio.Queue = asyncio.Queue()
    self.tokens: list[int] = []
    self.finished = False
    self.cancelled = False  # the client went away: skip it, or drop what it would still get
    self.decoder = IncrementalDecoder(tokenizer, lambda piece: self.emit(("text", piece)))

  def emit(self, event: tuple) -> None:
    self.loop.call_soon_threadsafe(self.events.put_nowait, event)

  def finish(self, reason: str) -> None:
    if not self.finished:
      self.finished = True
      self.decoder.finish()
      self.emit(("end", reason))

  def fail(self, error: ApiError) -> None:
    if not self.finished:
      self.finished = True
      self.emit(("error", error))


@dataclasses.dataclass
class Stats:
  """generate_calls: engine calls; batch_sizes: {real rows in a call: calls}; rows: answers produced."""

  generate_calls: int = 0
  batch_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  rows: int = 0
  rejected: int = 0
  cut_short: int = 0  # calls ended early: every row was answered or abandoned, at least one abandoned

  def as_dict(self, pending: int) -> dict:
    return {
        "generate_calls": self.generate_calls,
        "rows": self.rows,
        "rejected_overloaded": self.rejected,
        "cut_short": self.cut_short,
        "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
        "max_batch": max(self.batch_sizes, default=0),
        "pending": pending,
    }


class _NobodyWaits(Exception):
  """Raised from the token callback to end an engine call whose rows are all answered or abandoned."""


def _pow2(n: int) -> int:
  p = 1
  while p < n:
    p *= 2
  return p


class Batcher:

  def __init__(
      self, engine: Engine, tokenizer, *, max_batch: int = 8, max_queue: int = 64, window_s: float = 0.01, mesh=None
  ):
    if max_batch < 1 or max_queue < 1:
      raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
    self.engine, self.tokenizer = engine, tokenizer
    self.max_batch, self.max_queue, self.window_s, self.mesh = max_batch, max_queue, window_s, mesh
    self.stats = Stats()
    self._pending: collections.deque[Job] = collections.deque()
    self._cond = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None

  # --- the request side ----------------------------------------------------------------------------------------

  def submit(self, job: Job) -> None:
    """Queues `job`; ApiError 503 when `max_queue` jobs already wait."""
    with self._cond:
      if len(self._pending) >= self.max_queue:
        self.stats.rejected += 1
        raise overloaded(
            f"the server is busy: {len(self._pending)} requests are waiting (--max-queue "
            f"{self.max_queue}); retry later"
        )
      self._pending.append(job)
      self._cond.notify()

  def pending(self) -> int:
    with self._cond:
      return len(self._pending)

  def stats_dict(self) -> dict:
    with self._cond:
      return self.stats.as_dict(len(self._pending))

  # --- the worker ----------------------------------------------------------------------------------------------

  def start(self) -> None:
    self._thread = threading.Thread(target=self._loop, name="kangaroo-batcher", daemon=True)
    self._thread.start()

  def stop(self, timeout: float = 30.0) -> None:
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)
    with self._cond:
      left, self._pending = list(self._pending), collections.deque()
    for job in left:
      job.fail(overloaded("the server is shutting down"))

  def group_key(self, p: Prepared, job: Job) -> tuple:
    s = p.sampling
    sampling = (
        ("greedy",)
        if s.greedy
        else ("seeded", id(job))
        if p.seed is not None
        else ("sampled", s.temperature, s.top_p, s.top_k)
    )
    chunk = prefill_chunk_length(len(p.ids), self.engine.prefill_chunk, context_size())
    n_visual = int((p.ids == self.engine.visual_token_id).sum()) if self.engine.visual_token_id is not None else 0
    return sampling + (chunk, n_visual)

  def _take_group(self) -> list[Job] | None:
    """Blocks for the next group (removed from the queue); None when stopping."""
    with self._cond:
      waited = False
      while True:
        while self._pending and self._pending[0].cancelled:  # clients that left while waiting
          self._pending.popleft()
        if self._pending and waited:
          break
        if self._pending:
          deadline, waited = time.monotonic() + self.window_s, True
          while not self._stopping and len(self._pending) < self.max_batch and time.monotonic() < deadline:
            self._cond.wait(max(deadline - time.monotonic(), 0.0))
          continue
        if self._stopping:
          return None
        waited = False
        self._cond.wait()
      first = self._pending[0]
      key = self.group_key(first.prepared, first)
      group = [j for j in self._pending if not j.cancelled and self.group_key(j.prepared, j) == key]
      group = group[: self.max_batch]
      taken = set(map(id, group))
      self._pending = collections.deque(j for j in self._pending if id(j) not in taken and not j.cancelled)
      return group

  def _loop(self) -> None:
    if self.mesh is not None and not self.mesh.empty:
      jax.set_mesh(self.mesh)  # the mesh context is per thread: this one runs every computation
    while True:
      group = self._take_group()
      if group is None:
        return
      try:
        self.run_group(group)
      except Exception as e:  # a failed call ends its requests with 500, never the server
        traceback.print_exc(file=sys.stderr)
        for job in group:
          job.fail(ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))

  def _visual_tokens(self, group: list[Job]):
    """[padded batch, n_vis, embed] for a video group, each video encoded alone once (then cached), or None."""
    visuals = [j.prepared.visual for j in group]
    if visuals[0] is None:
      return None
    for v in visuals:
      if v.tokens is None:
        v.tokens = self.engine.encode_frames(v.frames[None], v.timestamps[None])
        v.frames = None  # the host frames are not needed again
    return jnp.concatenate([v.tokens for v in visuals], axis=0)

  def run_group(self, group: list[Job]) -> None:
    """One Engine.generate call for compatible jobs (see the module doc); streams each row to its job."""
    n_real = len(group)
    rows = group + [group[0]] * (min(_pow2(n_real), max(self.max_batch, n_real)) - n_real)
    visual = self._visual_tokens(rows)
    first = group[0].prepared
    seed = first.seed if first.seed is not None else secrets.randbelow(2**31)
    stop_ids = self.tokenizer.stop_ids

    def on_token(row: int, token: int) -> None:
      if row >= n_real:
        return
      job = group[row]
      if not (job.finished or job.cancelled):
        job.tokens.append(token)
        job.decoder(row, token)
        if len(job.tokens) >= job.prepared.max_new_tokens:
          job.finish("length")
      # Rows end at their own max_tokens (finished) or when their client goes away (cancelled, unfinished); once
      # every row has, and one went away, nobody waits for the tokens still to come.
      if all(j.finished or j.cancelled for j in group) and any(j.cancelled and not j.finished for j in group):
        raise _NobodyWaits()

    with self._cond:
      self.stats.generate_calls += 1
      self.stats.batch_sizes[n_real] += 1
    try:
      gen = self.engine.generate(
          [j.prepared.ids.tolist() for j in rows],
          visual=visual,
          max_new_tokens=max(j.prepared.max_new_tokens for j in group),
          sampling=first.sampling,
          stop_ids=stop_ids,
          seed=seed & 0x7FFFFFFF,
          on_token=on_token,
      )
      for r, job in enumerate(group):
        job.finish("stop" if gen.stopped[r] else "length")
    except _NobodyWaits:
      with self._cond:
        self.stats.cut_short += 1
    with self._cond:
      self.stats.rows += n_real
