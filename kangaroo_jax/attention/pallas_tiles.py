"""Pallas versions of the attention tile (same contract as `tiles.py`).

One kernel instance per (batch, kv head, query group); it sees one [tq, d] query block and one
[tk, d] key/value block, builds the position/segment mask in-register and never writes the
[tq, tk] scores to memory. On TPU and GPU Pallas compiles it (Mosaic / Triton); on CPU it runs in
interpret mode, which is how the tests check it against the jnp tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kangaroo_jax.attention.reference import MASK_VALUE

_HI = jax.lax.Precision.HIGHEST


def _interpret() -> bool:
  return jax.default_backend() == "cpu"


def _mask(qp, kp, qs, ks, causal):
  mask = qs[:, None] == ks[None, :]
  if causal:
    mask = mask & (qp[:, None] >= kp[None, :])
  return mask


def _dot(a, b, contract):
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32, precision=_HI)


def _fwd_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, o_ref, l_ref, m_ref,
                o_out, l_out, m_out, *, causal, scale):
  q = q_ref[...].astype(jnp.float32)
  s = _dot(q, k_ref[...].astype(jnp.float32), ((1,), (1,))) * scale  # [tq, tk]
  s = jnp.where(_mask(qp_ref[...], kp_ref[...], qs_ref[...], ks_ref[...], causal), s, MASK_VALUE)
  m_prev = m_ref[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))
  p = jnp.exp(s - m_new[:, None])
  corr = jnp.exp(m_prev - m_new)
  o_out[...] = o_ref[...] * corr[:, None] + _dot(p, v_ref[...].astype(jnp.float32), ((1,), (0,)))
  l_out[...] = l_ref[...] * corr + jnp.sum(p, axis=-1)
  m_out[...] = m_new


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, kp_ref, qs_ref, ks_ref,
                dq_out, dk_out, dv_out, *, causal, scale):
  q = q_ref[...].astype(jnp.float32)
  k = k_ref[...].astype(jnp.float32)
  v = v_ref[...].astype(jnp.float32)
  do = do_ref[...]
  s = _dot(q, k, ((1,), (1,))) * scale
  s = jnp.where(_mask(qp_ref[...], kp_ref[...], qs_ref[...], ks_ref[...], causal), s, MASK_VALUE)
  p = jnp.exp(s - lse_ref[...][:, None])
  dv_out[...] = _dot(p, do, ((0,), (0,)))
  ds = p * (_dot(do, v, ((1,), (1,))) - delta_ref[...][:, None]) * scale
  dq_out[...] = _dot(ds, k, ((1,), (0,)))
  dk_out[...] = _dot(ds, q, ((0,), (0,)))


def _specs(b, kvh, g, tq, tk, d):
  """BlockSpecs over the grid (batch, kv head, group) for the operands in kernel order."""
  per_q = pl.BlockSpec((None, None, None, tq, d), lambda i, j, h: (i, j, h, 0, 0))
  per_q_row = pl.BlockSpec((None, None, None, tq), lambda i, j, h: (i, j, h, 0))
  per_kv = pl.BlockSpec((None, None, tk, d), lambda i, j, h: (i, j, 0, 0))  # k/v as [b, kvh, tk, d]
  q_tok = pl.BlockSpec((None, tq), lambda i, j, h: (i, 0))
  kv_tok = pl.BlockSpec((None, tk), lambda i, j, h: (i, 0))
  return per_q, per_q_row, per_kv, q_tok, kv_tok


def tile_forward_pallas(q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, l, m, *, causal, scale):
  b, kvh, g, tq, d = q.shape
  tk = k.shape[1]
  per_q, per_q_row, per_kv, q_tok, kv_tok = _specs(b, kvh, g, tq, tk, d)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, causal=causal, scale=scale),
      out_shape=(f32(o.shape), f32(l.shape), f32(m.shape)),
      grid=(b, kvh, g),
      in_specs=[per_q, per_kv, per_kv, q_tok, kv_tok, q_tok, kv_tok, per_q, per_q_row, per_q_row],
      out_specs=(per_q, per_q_row, per_q_row),
      interpret=_interpret(),
      name="kangaroo_attention_tile_fwd",
  )(q, kt, vt, q_pos, kv_pos, q_seg, kv_seg, o, l, m)


def tile_backward_pallas(q, k, v, do, lse, delta, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale):
  b, kvh, g, tq, d = q.shape
  tk = k.shape[1]
  per_q, per_q_row, per_kv, q_tok, kv_tok = _specs(b, kvh, g, tq, tk, d)
  per_kv_group = pl.BlockSpec((None, None, None, tk, d), lambda i, j, h: (i, j, h, 0, 0))
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  dq, dk, dv = pl.pallas_call(
      functools.partial(_bwd_kernel, causal=causal, scale=scale),
      out_shape=(f32(q.shape), f32((b, kvh, g, tk, d)), f32((b, kvh, g, tk, d))),
      grid=(b, kvh, g),
      in_specs=[per_q, per_kv, per_kv, per_q, per_q_row, per_q_row, q_tok, kv_tok, q_tok, kv_tok],
      out_specs=(per_q, per_kv_group, per_kv_group),
      interpret=_interpret(),
      name="kangaroo_attention_tile_bwd",
  )(q, kt, vt, do, lse, delta, q_pos, kv_pos, q_seg, kv_seg)
  # Sum the query groups that share a kv head, back to [b, tk, kvh, d].
  return dq, dk.sum(axis=2).transpose(0, 2, 1, 3), dv.sum(axis=2).transpose(0, 2, 1, 3)
