"""`data.source = "grain"`: the kangaroo_jax.data pipeline over the trainer's own DataConfig (one class)."""

from __future__ import annotations

from kangaroo_jax.config import ConfigError
from kangaroo_jax.data.config import DataConfigError
from kangaroo_jax.data.pipeline import make_train_iterator
from kangaroo_jax.tokenizer import load_tokenizer
from train.config import TrainConfig


def grain_iterator(cfg: TrainConfig, shard_index: int, shard_count: int):
  """Per-host packed batches of the rows this host holds (`data_shard_for_process`), resumable.

  `data.dataset` names ArrayRecord shards or a TFDS split ("tfds:NAME[:SPLIT]", read from
  `data.tfds_data_dir` through its declared mapping). A dataset that cannot be used (no shard readable, no
  such TFDS dataset or split, features that do not fit the mapping) is a ConfigError naming `data.dataset`
  (or the field at fault), which the CLI prints as one line (exit 2)."""
  try:
    return make_train_iterator(
        cfg.data, cfg.model, load_tokenizer(cfg.data.tokenizer), process_index=shard_index, process_count=shard_count
    )
  except DataConfigError as e:
    msg = str(e)
    raise ConfigError(msg if msg.startswith("data.") else f"data.dataset: {msg}") from None
