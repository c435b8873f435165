"""One (query chunk x key chunk) tile of blockwise attention: the unit a fused kernel replaces.

Contract shared by every implementation (`jnp` here, Pallas in `pallas_tiles.py`):
  forward:  (q, k, v, positions/segments, o, l, m) -> updated (o, l, m)   online softmax in float32
  backward: (q, k, v, do, lse, delta, positions/segments) -> (dq, dk, dv) contributions of the tile
Shapes: q, do, o [b, kvh, g, tq, d]; l, m, lse, delta [b, kvh, g, tq]; k, v [b, tk, kvh, d];
q_pos / q_seg [b, tq]; kv_pos / kv_seg [b, tk]. dk, dv come back [b, tk, kvh, d] in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kangaroo_jax.attention.reference import MASK_VALUE

_HI = jax.lax.Precision.HIGHEST


def tile_mask(causal, q_pos, kv_pos, q_seg, kv_seg):
  """[b, 1, 1, tq, tk] boolean (True = attend)."""
  mask = q_seg[:, :, None] == kv_seg[:, None, :]
  if causal:
    mask = mask & (q_pos[:, :, None] >= kv_pos[:, None, :])
  return mask[:, None, None]


def _scores(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, scale):
  s = jnp.einsum("bkgqd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32, precision=_HI) * scale
  return jnp.where(tile_mask(causal, q_pos, kv_pos, q_seg, kv_seg), s, MASK_VALUE)


def tile_forward_jnp(q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, l, m, *, causal, scale):
  s = _scores(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, scale)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  p = jnp.exp(s - m_new[..., None])
  corr = jnp.exp(m - m_new)
  pv = jnp.einsum("bkgqt,btkd->bkgqd", p, v.astype(jnp.float32), precision=_HI)
  return o * corr[..., None] + pv, l * corr + jnp.sum(p, axis=-1), m_new


def tile_backward_jnp(q, k, v, do, lse, delta, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale):
  p = jnp.exp(_scores(q, k, q_pos, kv_pos, q_seg, kv_seg, causal, scale) - lse[..., None])
  dv = jnp.einsum("bkgqt,bkgqd->btkd", p, do, precision=_HI)
  dp = jnp.einsum("bkgqd,btkd->bkgqt", do, v.astype(jnp.float32), precision=_HI)
  ds = p * (dp - delta[..., None]) * scale
  dq = jnp.einsum("bkgqt,btkd->bkgqd", ds, k.astype(jnp.float32), precision=_HI)
  dk = jnp.einsum("bkgqt,bkgqd->btkd", ds, q.astype(jnp.float32), precision=_HI)
  return dq, dk, dv
