"""Dense masked attention: the oracle every other attention implementation is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so fully-masked rows give a uniform softmax instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_positions: jax.Array | None, kv_positions: jax.Array | None,
                   q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                   causal: bool) -> jax.Array | None:
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


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                        q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
                        q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                        scale: float | None = None) -> jax.Array:
  """softmax(q k^T * scale + mask) v with grouped-query heads, logits and softmax in float32.

  Args:
    q: [batch, q_len, heads, head_dim]
    k, v: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0. K/V are never repeated in
      memory: queries are grouped as [batch, q_len, kv_heads, group, head_dim] instead.
    q_positions / kv_positions: [batch, q_len] / [batch, kv_len] ints; when causal and both are
      omitted they default to 0..len-1.
    q_segment_ids / kv_segment_ids: [batch, q_len] / [batch, kv_len] ints; tokens attend only
      within equal ids (packed samples).
  Returns: [batch, q_len, heads, head_dim] in q's dtype.
  """
  b, sq, h, d = q.shape
  kvh = k.shape[2]
  if h % kvh:
    raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kvh})")
  scale = d ** -0.5 if scale is None else scale
  if causal and q_positions is None and kv_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(sq, dtype=jnp.int32), (b, sq))
    kv_positions = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (b, k.shape[1]))
  qg = q.reshape(b, sq, kvh, h // kvh, d)
  logits = jnp.einsum("bqkgd,btkd->bkgqt", qg, k, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST) * scale
  mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal)
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgqt,btkd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, sq, h, d).astype(q.dtype)
