"""First-fit packing of variable-length samples (tokens + frames) into fixed rows, as a Grain IterDataset.

A sample (from `pipeline.PrepareSample`) is {"input_ids" int32 [n], "loss_mask" bool [n], "frames" uint8
[f, H, W, 3], "timestamps" float32 [f]} or a skip marker {"skip": reason index, optionally "need": the
tokens / frames the sample needed}. Up to `bins` rows are open; each sample goes into the first row where
both its tokens and its frames fit. When none fits and all bins are open, every open row is emitted (a
"window") and packing restarts with that sample.

Checkpointing replays instead of storing frames: the state is the parent's state at the start of the
current window plus how many of the window's rows were already emitted. Restoring re-reads the window
(deterministic) and drops those rows, so resumed batches are identical.

Skipped samples and the number of samples read are counted per window and reported on the window's first
row (`_skips` int32 [len(SKIP_REASONS)], `_seen` int32), so counts survive multiprocessing workers.

Those counts only reach the trainer with a row, so when (nearly) every sample is skipped the trainer would wait
forever for a first batch. The packer therefore enforces the skip rate itself while its current window holds
no sample yet, over everything it read since it was started or restored, and stops after `spin_limit`
consecutive skipped samples whatever the rate. It raises SkipRateExceeded, which Grain re-raises from its
worker processes in the caller.
"""

from __future__ import annotations

import grain
import numpy as np

from kangaroo_jax.data.config import SKIP_REASONS, SkipRateExceeded


def make_row(samples: list[dict], seq_len: int, max_frames: int, frame_hw: tuple[int, int], gap: int = 0) -> dict:
  """Packs samples into one row with the keys of contract section 3 (shapes [L] / [F, H, W, 3] / [F]).

  The one builder of the row contract: the packer and the synthetic source (train.synthetic) both call it.
  A sample is {"input_ids" int32 [n] (visual placeholders < 0), "loss_mask" [n] (token i is a target),
  "frames" uint8 [f, H, W, 3], "timestamps" float32 [f]}. `gap`: padding slots left after each sample (the
  synthetic rows keep one so that segment boundaries are not always adjacent); the packer packs tight."""
  h, w = frame_hw
  ids = np.zeros(seq_len, np.int32)
  tgt = np.zeros(seq_len, np.int32)
  mask = np.zeros(seq_len, np.float32)
  pos = np.zeros(seq_len, np.int32)
  seg = np.zeros(seq_len, np.int32)
  frames = np.zeros((max_frames, h, w, 3), np.uint8)
  ts = np.zeros(max_frames, np.float32)
  t = fo = 0
  for k, s in enumerate(samples):
    x, m = s["input_ids"], s["loss_mask"]
    n, f = len(x), len(s["frames"])
    ids[t : t + n] = x
    # The target of token t is token t+1 of the same segment; visual placeholders are no targets.
    nxt = x[1:]
    tgt[t : t + n - 1] = np.where(nxt >= 0, nxt, 0)
    mask[t : t + n - 1] = m[1:]
    pos[t : t + n] = np.arange(n)
    seg[t : t + n] = k + 1
    frames[fo : fo + f] = s["frames"]
    ts[fo : fo + f] = s["timestamps"]
    t += n + gap
    fo += f
  return {
      "input_ids": ids,
      "targets": tgt,
      "loss_mask": mask,
      "positions": pos,
      "segment_ids": seg,
      "frames": frames,
      "timestamps": ts,
      "num_frames": np.int32(fo),
  }


class PackIterDataset(grain.IterDataset):
  """`max_skip_rate` / `min_samples`: the trainer's skip-rate rule (see the module docstring for when the
  packer applies it); `spin_limit`: consecutive skipped samples that stop it regardless (default
  10 * min_samples)."""

  def __init__(
      self,
      parent: grain.IterDataset,
      *,
      seq_len: int,
      max_frames: int,
      frame_hw: tuple[int, int],
      bins: int = 4,
      max_skip_rate: float = 1.0,
      min_samples: int = 100,
      spin_limit: int | None = None,
  ):
    super().__init__(parent)
    self.seq_len, self.max_frames, self.frame_hw, self.bins = seq_len, max_frames, tuple(frame_hw), bins
    self.max_skip_rate, self.min_samples = max_skip_rate, min_samples
    self.spin_limit = 10 * min_samples if spin_limit is None else spin_limit

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self)


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, ds: PackIterDataset):
    super().__init__(parent)
    self._ds = ds
    self._window_start = parent.get_state()
    self._ready: list[dict] = []
    self._emitted = 0
    self._carry = None  # (sample, parent state before it) that opens the next window
    # Since start / restore, for the packer's own skip checks (the trainer keeps the checkpointed totals).
    self._total_seen = 0
    self._total_skips = np.zeros(len(SKIP_REASONS), np.int64)
    self._run_of_skips = 0
    self._least_need: dict[int, int] = {}  # reason -> smallest size a skipped sample needed (see `need`)

  def _read(self):
    """(sample, parent state before reading it) or None at the end."""
    if self._carry is not None:
      item, self._carry = self._carry, None
      return item
    state = self._parent.get_state()
    try:
      return next(self._parent), state
    except StopIteration:
      return None

  def _fill_window(self) -> None:
    ds = self._ds
    bins: list[list[dict]] = []
    used: list[list[int]] = []  # [tokens, frames] per bin
    skips = np.zeros(len(SKIP_REASONS), np.int32)
    seen = 0
    start = None
    while True:
      item = self._read()
      if item is None:
        break
      sample, state = item
      if start is None:
        start = state
      if "skip" in sample:
        reason = int(sample["skip"])
        skips[reason] += 1
        seen += 1
        self._count_skip(reason, sample.get("need"), window_empty=not bins)
        continue
      self._run_of_skips = 0
      n, f = len(sample["input_ids"]), len(sample["frames"])
      for b, (tn, tf) in enumerate(used):
        if tn + n <= ds.seq_len and tf + f <= ds.max_frames:
          bins[b].append(sample)
          used[b] = [tn + n, tf + f]
          break
      else:
        if len(bins) == ds.bins:
          self._carry = (sample, state)
          break
        bins.append([sample])
        used.append([n, f])
      seen += 1
      self._total_seen += 1
    if start is not None:
      self._window_start = start
    self._emitted = 0
    self._ready = [make_row(b, ds.seq_len, ds.max_frames, ds.frame_hw) for b in bins]
    if self._ready:
      self._ready[0]["_skips"], self._ready[0]["_seen"] = skips, np.int32(seen)
      for r in self._ready[1:]:
        r["_skips"], r["_seen"] = np.zeros_like(skips), np.int32(0)

  def _count_skip(self, reason: int, need, *, window_empty: bool) -> None:
    ds = self._ds
    self._total_seen += 1
    self._total_skips[reason] += 1
    self._run_of_skips += 1
    if need is not None:
      self._least_need[reason] = min(int(need), self._least_need.get(reason, int(need)))
    total, seen = int(self._total_skips.sum()), self._total_seen
    # With a sample in the window a row will come and carry the counts to the trainer's own check.
    if window_empty and seen >= ds.min_samples and total > ds.max_skip_rate * seen:
      raise SkipRateExceeded(
          f"data: {total} of {seen} samples skipped ({total / seen:.1%} > max_skip_rate {ds.max_skip_rate:.1%}) "
          f"before the packer could fill a row; reasons: {self._reasons()}. {self._hint()}"
      )
    if self._run_of_skips >= ds.spin_limit:
      raise SkipRateExceeded(
          f"data: the last {self._run_of_skips} samples read were all skipped, so no row can be packed "
          f"(max_skip_rate {ds.max_skip_rate:.1%} does not stop this); reasons: {self._reasons()} of {seen} "
          f"read. {self._hint()}"
      )

  def _reasons(self) -> dict[str, int]:
    return {r: int(n) for r, n in zip(SKIP_REASONS, self._total_skips) if n}

  def _hint(self) -> str:
    ds = self._ds
    top = SKIP_REASONS[int(np.argmax(self._total_skips))]
    need = self._least_need.get(SKIP_REASONS.index(top))
    if top == "too_long":
      return (
          f"Likely cause: seq_len {ds.seq_len} is shorter than the samples"
          + (f" (the shortest skipped one needs {need} tokens)" if need is not None else "")
          + "; raise seq_len or shorten the conversations."
      )
    if top == "too_many_frames":
      return (
          f"Likely cause: max_frames {ds.max_frames} (frame slots per row) is below the samples' frame counts"
          + (f" (the smallest skipped one has {need} frames)" if need is not None else "")
          + "; raise data.max_frames or sample fewer frames."
      )
    return "Likely cause: unusable records or videos (see the per-sample warnings); fix or rebuild the dataset."

  def __next__(self) -> dict:
    if not self._ready:
      self._fill_window()
      if not self._ready:
        raise StopIteration
    self._emitted += 1
    return self._ready.pop(0)

  def get_state(self) -> dict:
    if not self._ready:
      # Between windows: the next window starts at the carried sample (or wherever the parent is).
      parent = self._carry[1] if self._carry is not None else self._parent.get_state()
      return {"parent": parent, "emitted": 0}
    return {"parent": self._window_start, "emitted": self._emitted}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._carry = None
    self._ready = []
    self._fill_window()
    drop = int(state["emitted"])
    self._ready = self._ready[drop:]
    self._emitted = drop
