"""The preallocated KV cache: explicit arrays stacked like the scanned decoder layers.

Slot t of row b holds the keys/values of the token at position t of that row, so a row's valid
slots are exactly 0 .. lengths[b]-1 and positions never need storing. Rows of different lengths
share one array (right padding); whatever lies beyond a row's length is never attended to and is
overwritten as the row grows. `max_len` comes from a small set of buckets so the jitted decode
step compiles once per bucket, not once per length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from kangaroo_jax.config import LlamaConfig
from kangaroo_jax.models.llama import CACHE_AXES
from kangaroo_jax.parallel.rules import current_mesh, logical_to_spec

# [layers, batch, max_len, kv_heads, head_dim]; "layers" is never sharded, the rest follow the activations.
MIN_BUCKET = 128
LINEAR_BUCKET = 1024  # above this, buckets grow in steps of this many slots instead of doubling


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """k, v: [layers, batch, max_len, kv_heads, head_dim]; lengths: int32 [batch] valid slots per row."""

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def batch(self) -> int:
    return self.k.shape[1]

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def bucket_length(n: int, multiple: int = 1) -> int:
  """Cache slots for n tokens: powers of two from MIN_BUCKET to LINEAR_BUCKET, then multiples of
  LINEAR_BUCKET (decode reads every slot, so a long context should not pay for up to 2x padding);
  rounded up to `multiple` (the context-axis split)."""
  if n < 0:
    raise ValueError(f"cache length must be >= 0, got {n}")
  b = MIN_BUCKET
  while b < n and b < LINEAR_BUCKET:
    b *= 2
  if b < n:
    b = -(-n // LINEAR_BUCKET) * LINEAR_BUCKET
  return -(-b // multiple) * multiple


def cache_sharding(shape):
  """NamedSharding of a cache array on the current mesh (`jax.set_mesh`), or None without one."""
  mesh = current_mesh(concrete=True)
  if mesh is None:
    return None
  return NamedSharding(mesh, logical_to_spec(CACHE_AXES, dict(mesh.shape), shape))


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype) -> KVCache:
  """An empty cache (all lengths 0), placed on the current mesh with the logical-axis rules."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  sharding = cache_sharding(shape)

  # Two separate buffers: the decode step donates both.
  def make():
    zeros = jnp.zeros(shape, dtype)
    return zeros if sharding is None else jax.device_put(zeros, sharding)

  return KVCache(make(), make(), jnp.zeros((batch,), jnp.int32))


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
  """The same cache with room for `max_len` slots (existing slots keep their contents)."""
  if max_len < cache.max_len:
    raise ValueError(f"cannot shrink a KV cache from {cache.max_len} to {max_len} slots")
  if max_len == cache.max_len:
    return cache
  pad = [(0, 0)] * 5
  pad[2] = (0, max_len - cache.max_len)
  k, v = jnp.pad(cache.k, pad), jnp.pad(cache.v, pad)
  sharding = cache_sharding(k.shape)
  if sharding is not None:
    k, v = jax.device_put(k, sharding), jax.device_put(v, sharding)
  return KVCache(k, v, cache.lengths)


def with_lengths(cache: KVCache, lengths) -> KVCache:
  """Rolls rows back to `lengths` valid slots (e.g. to reuse only a common prefix of a conversation)."""
  lengths = jnp.asarray(lengths, jnp.int32)
  if lengths.shape != cache.lengths.shape:
    raise ValueError(f"lengths must be [{cache.batch}], got shape {lengths.shape}")
  return dataclasses.replace(cache, lengths=lengths)
