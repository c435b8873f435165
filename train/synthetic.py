"""Generated training rows in the batch contract (docs/pipeline_contracts.md section 3).

Used by tests and benchmarks, and by `data.source = "synthetic"`: no files, deterministic in
(seed, step), with the iterator-state protocol of section 4 so resume can be tested exactly.
Each row packs two samples, each with its own frames (`frames_per_sample`) and a text that follows
a learnable rule (token t+1 = token t + stride, stride drawn per sample), assistant loss on the
second half of each sample's text, packed by the pipeline's own row builder (`packing.make_row`, one
padding slot after each sample). The global batch is the same whatever the process count; each
process yields its block of rows.
"""

from __future__ import annotations

import numpy as np

from kangaroo_jax.config import KangarooConfig
from kangaroo_jax.data.packing import make_row


class SyntheticIterator:
  """Yields per-host batches (numpy dicts). State: {"step": next batch index}."""

  def __init__(
      self,
      model_cfg: KangarooConfig,
      *,
      global_batch: int,
      seq_len: int,
      frame_size: int,
      max_frames: int,
      seed: int = 0,
      shard_index: int = 0,
      shard_count: int = 1,
      samples_per_row: int = 2,
  ):
    if global_batch % shard_count:
      raise ValueError(f"global batch {global_batch} not divisible into {shard_count} row shards")
    self.cfg = model_cfg
    self.global_batch, self.seq_len, self.size, self.max_frames = global_batch, seq_len, frame_size, max_frames
    self.seed = seed
    self.rows = global_batch // shard_count
    self.first_row = shard_index * self.rows
    gh, gw = model_cfg.vision.grid_for(frame_size, frame_size)
    per_group = model_cfg.projector.frames_per_group
    samples_per_row = max(1, min(samples_per_row, max_frames // per_group))  # an image row holds one sample
    self.samples_per_row = samples_per_row
    self.frames_per_sample = max_frames // samples_per_row
    if self.frames_per_sample % per_group:
      raise ValueError(f"max_frames {max_frames} / {samples_per_row} samples is not a multiple of {per_group}")
    self.vis_per_sample = self.frames_per_sample // per_group * model_cfg.projector.tokens_per_group(gh, gw)
    self.text_per_sample = seq_len // samples_per_row - self.vis_per_sample - 1  # 1 slot of padding per sample
    if self.text_per_sample < 4:
      raise ValueError(f"seq_len {seq_len} leaves {self.text_per_sample} text tokens per sample; raise it")
    self.step = 0

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch(self.step)
    self.step += 1
    return batch

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rows = [self._row(step, self.first_row + r) for r in range(self.rows)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def _row(self, step: int, row: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, step, row])
    V, vocab = self.cfg.visual_token_id, self.cfg.llm.vocab_size
    samples = []
    for _ in range(self.samples_per_row):
      start, stride = rng.integers(3, vocab), rng.integers(1, 4)
      text = (start + stride * np.arange(self.text_per_sample)) % (vocab - 3) + 3
      ids = np.concatenate([np.full(self.vis_per_sample, V), text]).astype(np.int32)
      mask = np.zeros(ids.size, np.float32)
      mask[self.vis_per_sample + self.text_per_sample // 2 :] = 1.0  # predict the second half of the text
      frames = rng.integers(0, 256, (self.frames_per_sample, self.size, self.size, 3), dtype=np.uint8)
      samples.append(
          dict(
              input_ids=ids,
              loss_mask=mask,
              frames=frames,
              timestamps=np.arange(self.frames_per_sample, dtype=np.float32) * 0.5,
          )
      )
    return make_row(samples, self.seq_len, self.max_frames, (self.size, self.size), gap=1)
