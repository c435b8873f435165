"""Dense masked attention: the oracle every other attention implementation is tested against.

Computed in query chunks (each chunk rematerialised in the backward pass), so no [q_len, kv_len]
float32 score matrix larger than one chunk's ever exists, forward or backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kangaroo_jax.attention.numerics import attention_einsum

# Finite, so fully-masked rows give a uniform softmax instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Query rows per chunk: [batch, heads, 512, kv_len] float32 scores at a time.
QUERY_CHUNK = 512


def attention_mask(
    q_positions: jax.Array | None,
    kv_positions: jax.Array | None,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    causal: bool,
) -> jax.Array | None:
  """Boolean mask [batch, q_len, kv_len] (True = may attend), or None when nothing is masked.

  Causality compares *positions*, not array indices, so reordered (load-balanced) or packed
  sequences mask correctly as long as positions increase within each segment.
  """
  mask = None
  if causal:
    if q_positions is None or kv_positions is None:
      raise ValueError("causal attention needs q_positions and kv_positions")
    mask = q_positions[:, :, None] >= kv_positions[:, None, :]
  if q_segment_ids is not None or kv_segment_ids is not None:
    if q_segment_ids is None or kv_segment_ids is None:
      raise ValueError("segment ids must be given for both queries and keys, or for neither")
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = same if mask is None else mask & same
  return mask


def query_chunk(q_len: int, target: int = QUERY_CHUNK) -> int:
  """The largest divisor of q_len that is <= target (odd lengths still split exactly)."""
  for c in range(min(q_len, target), 0, -1):
    if q_len % c == 0:
      return c
  return q_len


def _dense(qg, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale):
  """qg [b, q, kvh, g, d]; k, v [b, t, kvh, d] -> [b, q, kvh, g, d] float32."""
  logits = attention_einsum("bqkgd,btkd->bkgqt", qg, k) * scale
  mask = attention_mask(q_pos, kv_pos, q_seg, kv_seg, causal)
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  return attention_einsum("bkgqt,btkd->bqkgd", probs.astype(v.dtype), v)


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_q: int = QUERY_CHUNK,
) -> jax.Array:
  """softmax(q k^T * scale + mask) v with grouped-query heads, logits and softmax in float32.

  Args:
    q: [batch, q_len, heads, head_dim]
    k, v: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0. K/V are never repeated in
      memory: queries are grouped as [batch, q_len, kv_heads, group, head_dim] instead.
    q_positions / kv_positions: [batch, q_len] / [batch, kv_len] ints; when causal and both are
      omitted they default to 0..len-1.
    q_segment_ids / kv_segment_ids: [batch, q_len] / [batch, kv_len] ints; tokens attend only
      within equal ids (packed samples).
    block_q: query rows per chunk (see module docstring).
  Returns: [batch, q_len, heads, head_dim] in q's dtype.
  """
  b, sq, h, d = q.shape
  kvh = k.shape[2]
  if h % kvh:
    raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kvh})")
  scale = d**-0.5 if scale is None else scale
  if causal and q_positions is None and kv_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(sq, dtype=jnp.int32), (b, sq))
    kv_positions = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (b, k.shape[1]))
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  qg = q.reshape(b, sq, kvh, h // kvh, d)
  chunk = query_chunk(sq, block_q)
  if chunk == sq:
    out = _dense(qg, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=causal, scale=scale)
    return out.reshape(b, sq, h, d).astype(q.dtype)

  n = sq // chunk
  split = lambda x: None if x is None else jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731

  @jax.checkpoint
  def one_chunk(args):
    q_c, qp_c, qs_c = args
    out = _dense(q_c, k, v, qp_c, kv_positions, qs_c, kv_segment_ids, causal=causal, scale=scale)
    return out.astype(q.dtype)

  out = jax.lax.map(one_chunk, (split(qg), split(q_positions), split(q_segment_ids)))
  return jnp.moveaxis(out, 0, 1).reshape(b, sq, h, d)
