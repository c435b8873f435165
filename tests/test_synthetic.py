"""The synthetic source builds its rows with the pipeline's row builder (packing.make_row): same contract."""

import numpy as np
import pytest

from kangaroo_jax.config import preset
from kangaroo_jax.data.packing import make_row
from train.synthetic import SyntheticIterator


def _oracle_row(it: SyntheticIterator, step: int, row: int) -> dict:
  """The row layout written out by hand, position by position (what the synthetic source built before it
  used make_row): samples one padding slot apart, loss on the second half of each text, frames in order."""
  rng = np.random.default_rng([it.seed, step, row])
  L, V, vocab = it.seq_len, it.cfg.visual_token_id, it.cfg.llm.vocab_size
  out = dict(
      input_ids=np.zeros(L, np.int32),
      targets=np.zeros(L, np.int32),
      loss_mask=np.zeros(L, np.float32),
      positions=np.zeros(L, np.int32),
      segment_ids=np.zeros(L, np.int32),
      frames=np.zeros((it.max_frames, it.size, it.size, 3), np.uint8),
      timestamps=np.zeros(it.max_frames, np.float32),
  )
  pos = 0
  for s in range(it.samples_per_row):
    start, stride = rng.integers(3, vocab), rng.integers(1, 4)
    text = (start + stride * np.arange(it.text_per_sample)) % (vocab - 3) + 3
    sample = np.concatenate([np.full(it.vis_per_sample, V), text]).astype(np.int32)
    n = sample.size
    out["input_ids"][pos : pos + n] = sample
    out["targets"][pos : pos + n - 1] = np.clip(sample[1:], 0, None)
    half = it.vis_per_sample + it.text_per_sample // 2
    out["loss_mask"][pos + half - 1 : pos + n - 1] = 1.0
    out["positions"][pos : pos + n] = np.arange(n)
    out["segment_ids"][pos : pos + n] = s + 1
    f0 = s * it.frames_per_sample
    out["frames"][f0 : f0 + it.frames_per_sample] = rng.integers(
        0, 256, (it.frames_per_sample, it.size, it.size, 3), dtype=np.uint8
    )
    out["timestamps"][f0 : f0 + it.frames_per_sample] = np.arange(it.frames_per_sample, dtype=np.float32) * 0.5
    pos += n + 1
  out["num_frames"] = np.int32(it.samples_per_row * it.frames_per_sample)
  return out


def _samples_of(row: dict, frames_per_segment: int) -> list[dict]:
  """Splits a contract row back into make_row samples (tokens by segment id, loss mask shifted back)."""
  samples = []
  for k in range(1, int(row["segment_ids"].max()) + 1):
    at = np.flatnonzero(row["segment_ids"] == k)
    mask = np.zeros(at.size, np.float32)
    mask[1:] = row["loss_mask"][at[:-1]]
    f = slice((k - 1) * frames_per_segment, k * frames_per_segment)
    samples.append(
        dict(input_ids=row["input_ids"][at], loss_mask=mask, frames=row["frames"][f], timestamps=row["timestamps"][f])
    )
  return samples


@pytest.mark.parametrize(
    "kw",
    [
        dict(seq_len=64, frame_size=56, max_frames=4),
        dict(seq_len=256, frame_size=28, max_frames=8),
        dict(seq_len=200, frame_size=56, max_frames=2),
    ],
)  # one sample per row
def test_synthetic_rows_equal_make_row_rows(kw):
  it = SyntheticIterator(preset("tiny"), global_batch=4, shard_index=1, shard_count=2, seed=3, **kw)
  batch = it.batch(5)
  for r in range(it.rows):
    row = {k: v[r] for k, v in batch.items()}
    oracle = _oracle_row(it, 5, it.first_row + r)
    rebuilt = make_row(_samples_of(row, it.frames_per_sample), it.seq_len, it.max_frames, (it.size, it.size), gap=1)
    assert row.keys() == oracle.keys() == rebuilt.keys()
    for k in row:
      assert row[k].dtype == oracle[k].dtype, k
      np.testing.assert_array_equal(row[k], oracle[k], err_msg=k)
      np.testing.assert_array_equal(row[k], rebuilt[k], err_msg=k)
