"""`data.source = "grain"`: the kangaroo_jax.data pipeline configured from the trainer's DataConfig."""

from __future__ import annotations

from kangaroo_jax.data import config as data_config
from kangaroo_jax.data.pipeline import make_train_iterator
from kangaroo_jax.tokenizer import load_tokenizer
from train.config import TrainConfig


def grain_iterator(cfg: TrainConfig, shard_index: int, shard_count: int):
  """Per-host packed batches of the rows this host holds (`data_shard_for_process`), resumable."""
  d = cfg.data
  dcfg = data_config.DataConfig(data=d.dataset, seq_len=d.seq_len, global_batch_size=d.batch_size,
                                frame_size=(d.frame_size, d.frame_size), max_frames_per_row=d.max_frames,
                                num_frames=d.num_frames, seed=d.shuffle_seed, worker_count=d.worker_count,
                                max_skip_rate=d.max_skip_rate)
  return make_train_iterator(dcfg, cfg.model, load_tokenizer(d.tokenizer), process_index=shard_index,
                             process_count=shard_count)
