"""One (query chunk x key chunk) tile of blockwise attention in XLA (jnp), with flash numerics.

The ring's generic path (CPU, GPU, and any layout the TPU splash path does not cover) runs this.
  forward:  (q, k, v, positions/segments, o, l, m) -> updated (o, l, m)   online softmax in float32
  backward: (q, k, v, do, lse, delta, positions/segments) -> (dq, dk, dv) contributions of the tile
Shapes: q, do [b, kvh, g, tq, d] (compute dtype); o [b, kvh, g, tq, d] and l, m, lse, delta
[b, kvh, g, tq] float32; k, v [b, tk, kvh, d]; q_pos / q_seg [b, tq]; kv_pos / kv_seg [b, tk].
dq, dk, dv come back float32 (dk, dv as [b, tk, kvh, d]).
"""

from __future__ import annotations

import jax.numpy as jnp

from kangaroo_jax.attention.numerics import attention_einsum
from kangaroo_jax.attention.reference import MASK_VALUE


def tile_mask(causal, q_pos, kv_pos, q_seg, kv_seg):
  """[b, 1, 1, tq, tk] boolean (True = attend)."""
  mask = q_seg[:, :, None] == kv_seg[:, None, :]
  if causal:
    mask = mask & (q_pos[:, :, None] >= kv_pos[:, None, :])
  return mask[:, None, None]


def _scores(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, scale):
  s = attention_einsum("bkgqd,btkd->bkgqt", q, k.astype(q.dtype)) * scale
  return jnp.where(tile_mask(causal, q_pos, kv_pos, q_seg, kv_seg), s, MASK_VALUE)


def tile_forward_jnp(q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, l, m, *, causal, scale):
  s = _scores(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, scale)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  p = jnp.exp(s - m_new[..., None])
  corr = jnp.exp(m - m_new)
  pv = attention_einsum("bkgqt,btkd->bkgqd", p.astype(v.dtype), v)
  return o * corr[..., None] + pv, l * corr + jnp.sum(p, axis=-1), m_new


def tile_backward_jnp(q, k, v, do, lse, delta, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale):
  dt = q.dtype
  p = jnp.exp(_scores(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, scale) - lse[..., None])
  do = do.astype(dt)
  dv = attention_einsum("bkgqt,bkgqd->btkd", p.astype(dt), do)
  dp = attention_einsum("bkgqd,btkd->bkgqt", do, v.astype(dt))
  ds = p * (dp - delta[..., None]) * scale
  dq = attention_einsum("bkgqt,btkd->bkgqd", ds.astype(dt), k.astype(dt))
  dk = attention_einsum("bkgqt,bkgqd->btkd", ds.astype(dt), q)
  return dq, dk, dv
