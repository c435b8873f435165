"""Small training configs and runners shared by the tests/test_train_*.py files."""

from __future__ import annotations

import copy

import jax
import ml_collections
import numpy as np

from configs.common import base
from train.config import from_configdict


def tiny_config(**changes) -> "train.config.TrainConfig":  # noqa: F821
  """The tiny model on synthetic rows: 8 fake devices, 16 rows of 64 tokens, 4 frames of 56 px.

  `changes` are dotted keys ("optim.lr") -> values.
  """
  c = base("test")
  c.model.preset = "tiny"
  c.total_steps = 6
  c.log_every = 1
  c.data.update(
      source="synthetic", batch_size=16, seq_len=64, frame_size=56, max_frames=4, num_frames=4, worker_count=0
  )
  c.optim.update(lr=3e-3, warmup_steps=1)
  c.ckpt.update(every=3, keep=5)
  c.export = False
  return with_changes(c, changes)


def losses(result) -> list[float]:
  return [h["loss"] for h in result.history]


def host_params(state) -> dict:
  from train.params import combine, flatten

  return {k: np.asarray(jax.device_get(v)) for k, v in flatten(combine(state["params"], state["frozen"])).items()}


def with_changes(c: ml_collections.ConfigDict, changes: dict) -> "train.config.TrainConfig":  # noqa: F821
  """Applies dotted-key changes ("optim.lr" -> value) to a config dict and validates it."""
  for key, value in changes.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return from_configdict(ml_collections.ConfigDict(copy.deepcopy(c.to_dict())))


class BatchRecorder:
  """Forwards to a batch iterator and keeps a copy of every batch it handed out."""

  def __init__(self, inner):
    self.inner, self.batches = inner, []

  def __iter__(self):
    return self

  def __next__(self):
    b = next(self.inner)
    self.batches.append({k: v.copy() for k, v in b.items()})
    return b

  def __getattr__(self, name):  # get_state, set_state, metrics, close
    return getattr(self.inner, name)
