"""Sequence layouts for causal context parallelism.

With a contiguous split, device i of n only has work for key shards 0..i under a causal mask, so
the last device does n times the work of the first. The zigzag layout cuts the sequence into 2n
chunks and gives device i chunks i and 2n-1-i: every device then holds one early and one late
chunk and the live (query, key) tiles are the same count everywhere. Positions travel with the
tokens, so masks stay correct in any order.
"""

from __future__ import annotations

import numpy as np


def zigzag_order(seq_len: int, num_shards: int) -> np.ndarray:
  """Permutation [seq_len]: position k of the reordered sequence holds original token order[k]."""
  if seq_len % (2 * num_shards):
    raise ValueError(f"zigzag load balancing needs seq_len ({seq_len}) divisible by 2 * context ({2 * num_shards})")
  chunks = np.arange(seq_len).reshape(2 * num_shards, seq_len // (2 * num_shards))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * num_shards - 1 - i]]) for i in range(num_shards)])


def inverse_order(order: np.ndarray) -> np.ndarray:
  inv = np.empty_like(order)
  inv[order] = np.arange(order.size)
  return inv
