"""`data.source = "grain"`: the kangaroo_jax.data pipeline configured from the trainer's DataConfig."""

from __future__ import annotations

from kangaroo_jax.config import ConfigError
from kangaroo_jax.data import config as data_config
from kangaroo_jax.data.pipeline import make_train_iterator
from kangaroo_jax.tokenizer import load_tokenizer
from train.config import TrainConfig


def grain_iterator(cfg: TrainConfig, shard_index: int, shard_count: int):
  """Per-host packed batches of the rows this host holds (`data_shard_for_process`), resumable.

  `data.dataset` names ArrayRecord shards or a TFDS split ("tfds:NAME[:SPLIT]", read from
  `data.tfds_data_dir` through its declared mapping). A dataset that cannot be used (no shard readable, no
  such TFDS dataset or split, features that do not fit the mapping) is a ConfigError naming `data.dataset`,
  which the CLI prints as one line (exit 2)."""
  d = cfg.data
  try:
    dcfg = data_config.DataConfig(dataset=d.dataset, seq_len=d.seq_len, batch_size=d.batch_size,
                                  frame_size=d.frame_size, max_frames=d.max_frames,
                                  num_frames=d.num_frames, shuffle_seed=d.shuffle_seed, worker_count=d.worker_count,
                                  max_skip_rate=d.max_skip_rate, tfds_data_dir=d.tfds_data_dir,
                                  tfds_mapping=d.tfds_mapping)
    return make_train_iterator(dcfg, cfg.model, load_tokenizer(d.tokenizer), process_index=shard_index,
                               process_count=shard_count)
  except data_config.DataConfigError as e:
    msg = str(e)
    raise ConfigError(msg if msg.startswith("data.") else f"data.dataset: {msg}") from None
