"""Ring attention over the `context` mesh axis (per-device code, called inside `jax.shard_map`).

Each device keeps its query shard and passes its K/V shard (with the keys' positions and segment
ids) around the ring with `lax.ppermute`. Softmax is accumulated online in float32. The backward
pass is a second ring in which K, V and their gradient accumulators travel together, so after a
full turn every device holds the complete dK/dV for its own shard.

Work is split into (query chunk x key chunk) tiles. A tile whose mask is provably empty is skipped
with `lax.cond` (`tile_is_masked`); with the zigzag layout (`kangaroo_jax.attention.layout`) this
gives every device the same number of live tiles under a causal mask.

GQA: queries are grouped [batch, kv_heads, group, ...]; K/V are never repeated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kangaroo_jax.attention.reference import MASK_VALUE
from kangaroo_jax.attention.tiles import tile_backward_jnp, tile_forward_jnp


def pick_block(n: int, target: int) -> int:
  """The largest divisor of n that is <= target (so odd lengths still tile exactly)."""
  for b in range(min(n, target), 0, -1):
    if n % b == 0:
      return b
  return n


def tile_is_masked(causal: bool, q_pos, kv_pos, q_seg, kv_seg):
  """True when no (query, key) pair of the tile may attend. Conservative: False means "maybe live".

  Works on numpy and jax arrays alike (the benchmark counts tiles with the same predicate).
  Positions: [batch, tq] / [batch, tk]; segments likewise.
  """
  xp = jnp if isinstance(q_pos, jax.Array) else __import__("numpy")
  no_segment_overlap = (xp.max(q_seg) < xp.min(kv_seg)) | (xp.min(q_seg) > xp.max(kv_seg))
  if not causal:
    return no_segment_overlap
  # Packed segments restart their positions, so the causal test is only valid within one segment
  # per side; with a single segment everywhere it is exact.
  single = (xp.min(q_seg) == xp.max(q_seg)) & (xp.min(kv_seg) == xp.max(kv_seg))
  all_future = xp.max(q_pos) < xp.min(kv_pos)
  return no_segment_overlap | (single & all_future)


def _chunks(x, block, axis):
  """Splits `axis` into [n_chunks, ...] leading chunks of size `block`."""
  n = x.shape[axis] // block
  x = x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1 :])
  return jnp.moveaxis(x, axis, 0)


def _unchunk(x, axis):
  """Inverse of `_chunks`."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def ring_permutation(n: int, stride: int = 1) -> list[tuple[int, int]]:
  """ppermute pairs of a ring of `n` over an axis of n * stride devices: device i -> i + stride (mod n * stride).

  stride > 1 runs `stride` independent rings side by side (USP: the devices of one ring hold the same
  head group, and ring member j is devices j * stride .. j * stride + stride - 1).
  """
  size = n * stride
  return [(i, (i + stride) % size) for i in range(size)]


def ring_index(axis_name: str, stride: int = 1):
  """This device's place in its ring (see `ring_permutation`)."""
  return jax.lax.axis_index(axis_name) // stride


def rotate(axis_name: str, n: int, *xs, stride: int = 1):
  """Sends each array one place on around the ring of `axis_name` (ring member j -> j + 1)."""
  perm = ring_permutation(n, stride)
  return tuple(jax.lax.ppermute(x, axis_name, perm) for x in xs)


# ---------------------------------------------------------------- forward


def _fwd_shard(qg, k, v, q_pos, kv_pos, q_seg, kv_seg, acc, *, causal, scale, block_q, block_kv):
  """Accumulates one K/V shard into the running (o, l, m) of every query chunk.

  qg: [b, kvh, g, sq, d]; k, v: [b, sk, kvh, d]; acc = (o [b,kvh,g,sq,d], l, m [b,kvh,g,sq]).
  """
  o, l, m = acc
  tile_fwd = tile_forward_jnp
  qc = _chunks(qg, block_q, 3)
  q_pos_c, q_seg_c = _chunks(q_pos, block_q, 1), _chunks(q_seg, block_q, 1)
  kc, vc = _chunks(k, block_kv, 1), _chunks(v, block_kv, 1)
  kv_pos_c, kv_seg_c = _chunks(kv_pos, block_kv, 1), _chunks(kv_seg, block_kv, 1)

  def per_q_chunk(args):
    q_i, qp, qs, o_i, l_i, m_i = args

    def per_kv_chunk(carry, kv):
      k_j, v_j, kp, ks = kv

      def live(carry):
        return tile_fwd(q_i, k_j, v_j, qp, kp, qs, ks, *carry, causal=causal, scale=scale)

      skip = tile_is_masked(causal, qp, kp, qs, ks)
      return jax.lax.cond(skip, lambda c: c, live, carry), None

    (o_i, l_i, m_i), _ = jax.lax.scan(per_kv_chunk, (o_i, l_i, m_i), (kc, vc, kv_pos_c, kv_seg_c))
    return o_i, l_i, m_i

  o, l, m = jax.lax.map(
      per_q_chunk, (qc, q_pos_c, q_seg_c, _chunks(o, block_q, 3), _chunks(l, block_q, 3), _chunks(m, block_q, 3))
  )
  return _unchunk(o, 3), _unchunk(l, 3), _unchunk(m, 3)


def _ring_forward(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale, axis_name, axis_size, block_q, block_kv, stride
):
  b, sq, h, d = q.shape
  kvh = k.shape[2]
  qg = jnp.moveaxis(q.reshape(b, sq, kvh, h // kvh, d), 1, 3)  # [b, kvh, g, sq, d]
  acc = (
      jnp.zeros(qg.shape, jnp.float32),
      jnp.zeros(qg.shape[:-1], jnp.float32),
      jnp.full(qg.shape[:-1], MASK_VALUE, jnp.float32),
  )
  shard_fn = functools.partial(_fwd_shard, causal=causal, scale=scale, block_q=block_q, block_kv=block_kv)

  def step(carry, _):
    acc, kv = carry
    acc = shard_fn(qg, *kv[:2], q_pos, kv[2], q_seg, kv[3], acc)
    return (acc, rotate(axis_name, axis_size, *kv, stride=stride)), None

  kv = (k, v, kv_pos, kv_seg)
  if axis_size > 1:
    (acc, kv), _ = jax.lax.scan(step, (acc, kv), None, length=axis_size - 1)
  o, l, m = shard_fn(qg, *kv[:2], q_pos, kv[2], q_seg, kv[3], acc)
  out = o / l[..., None]
  lse = m + jnp.log(l)
  return jnp.moveaxis(out, 3, 1).reshape(b, sq, h, d).astype(q.dtype), lse


# ---------------------------------------------------------------- backward


def _bwd_shard(qg, dog, lse, delta, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, scale, block_q, block_kv):
  """Gradient contributions of one K/V shard: (dq [b,kvh,g,sq,d], dk, dv [b,sk,kvh,d])."""
  tile_bwd = tile_backward_jnp
  qc, doc = _chunks(qg, block_q, 3), _chunks(dog, block_q, 3)
  lse_c, delta_c = _chunks(lse, block_q, 3), _chunks(delta, block_q, 3)
  q_pos_c, q_seg_c = _chunks(q_pos, block_q, 1), _chunks(q_seg, block_q, 1)
  kc, vc = _chunks(k, block_kv, 1), _chunks(v, block_kv, 1)
  kv_pos_c, kv_seg_c = _chunks(kv_pos, block_kv, 1), _chunks(kv_seg, block_kv, 1)

  def per_q_chunk(dkv, qargs):
    q_i, do_i, lse_i, delta_i, qp, qs = qargs

    def per_kv_chunk(dq_i, kv):
      k_j, v_j, kp, ks = kv

      def live(dq_i):
        dq_t, dk_j, dv_j = tile_bwd(q_i, k_j, v_j, do_i, lse_i, delta_i, qp, kp, qs, ks, causal=causal, scale=scale)
        return dq_i + dq_t, (dk_j, dv_j)

      def dead(dq_i):
        z = jnp.zeros(k_j.shape, jnp.float32)
        return dq_i, (z, z)

      return jax.lax.cond(tile_is_masked(causal, qp, kp, qs, ks), dead, live, dq_i)

    dq_i, (dk_c, dv_c) = jax.lax.scan(per_kv_chunk, jnp.zeros(q_i.shape, jnp.float32), (kc, vc, kv_pos_c, kv_seg_c))
    dk, dv = dkv
    return (dk + _unchunk(dk_c, 1), dv + _unchunk(dv_c, 1)), dq_i

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(per_q_chunk, (zeros, zeros), (qc, doc, lse_c, delta_c, q_pos_c, q_seg_c))
  return _unchunk(dq, 3), dk, dv


def _ring_backward(
    q,
    k,
    v,
    out,
    lse,
    dout,
    q_pos,
    kv_pos,
    q_seg,
    kv_seg,
    *,
    causal,
    scale,
    axis_name,
    axis_size,
    block_q,
    block_kv,
    stride,
):
  b, sq, h, d = q.shape
  kvh = k.shape[2]
  to_groups = lambda x: jnp.moveaxis(x.reshape(b, sq, kvh, h // kvh, d), 1, 3)
  qg, dog = to_groups(q), to_groups(dout)
  delta = jnp.sum(dog.astype(jnp.float32) * to_groups(out).astype(jnp.float32), axis=-1)
  shard_fn = functools.partial(_bwd_shard, causal=causal, scale=scale, block_q=block_q, block_kv=block_kv)

  def step(carry, _):
    dq, k, v, dk, dv, kp, ks = carry
    dq_s, dk_s, dv_s = shard_fn(qg, dog, lse, delta, k, v, q_pos, kp, q_seg, ks)
    # dK/dV travel with their K/V: after a full turn they are home with every device's share.
    k, v, dk, dv, kp, ks = rotate(axis_name, axis_size, k, v, dk + dk_s, dv + dv_s, kp, ks, stride=stride)
    return (dq + dq_s, k, v, dk, dv, kp, ks), None

  zeros_kv = jnp.zeros(k.shape, jnp.float32)
  init = (jnp.zeros(qg.shape, jnp.float32), k, v, zeros_kv, zeros_kv, kv_pos, kv_seg)
  if axis_size > 1:
    (dq, _, _, dk, dv, _, _), _ = jax.lax.scan(step, init, None, length=axis_size)
  else:
    dq, dk, dv = shard_fn(qg, dog, lse, delta, k, v, q_pos, kv_pos, q_seg, kv_seg)
  dq = jnp.moveaxis(dq, 3, 1).reshape(b, sq, h, d)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ---------------------------------------------------------------- custom_vjp entry point


@functools.lru_cache(maxsize=None)
def _make_ring(causal: bool, scale: float, axis_name: str, axis_size: int, block_q: int, block_kv: int, stride: int):
  """A custom_vjp ring for one static configuration (statics closed over, not nondiff_argnums)."""
  kw = dict(
      causal=causal,
      scale=scale,
      axis_name=axis_name,
      axis_size=axis_size,
      block_q=block_q,
      block_kv=block_kv,
      stride=stride,
  )

  @jax.custom_vjp
  def ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, **kw)[0]

  def fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = _ring_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, **kw)
    return out, (q, k, v, out, lse, q_pos, kv_pos, q_seg, kv_seg)

  def bwd(res, dout):
    q, k, v, out, lse, q_pos, kv_pos, q_seg, kv_seg = res
    dq, dk, dv = _ring_backward(q, k, v, out, lse, dout, q_pos, kv_pos, q_seg, kv_seg, **kw)
    return dq, dk, dv, None, None, None, None

  ring.defvjp(fwd, bwd)
  return ring


def ring_attention_shard(
    q,
    k,
    v,
    *,
    causal: bool,
    q_positions,
    kv_positions,
    q_segment_ids,
    kv_segment_ids,
    axis_name: str,
    axis_size: int,
    scale: float | None = None,
    block_q: int = 512,
    block_kv: int = 512,
    stride: int = 1,
):
  """Per-device ring attention; call inside shard_map with the sequence sharded over `axis_name`.

  The ring has `axis_size` members; `stride` > 1 runs that many rings side by side (`ring_permutation`).

  Args:
    q: [batch, q_shard, heads, head_dim]; k, v: [batch, kv_shard, kv_heads, head_dim].
    q_positions, q_segment_ids: [batch, q_shard]; kv_positions, kv_segment_ids: [batch, kv_shard].
  Returns: [batch, q_shard, heads, head_dim].
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  bq, bk = pick_block(q.shape[1], block_q), pick_block(k.shape[1], block_kv)
  ring = _make_ring(bool(causal), float(scale), axis_name, int(axis_size), bq, bk, int(stride))
  # Under a differentiated layer scan, positions and segment ids are loop constants; without this
  # barrier JAX hoists every tile's mask out of the loop and materialises O(seq^2 / devices) of it.
  # Tying them to q makes them loop-variant, so masks are built tile by tile.
  q, q_positions, kv_positions, q_segment_ids, kv_segment_ids = jax.lax.optimization_barrier(
      (q, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  )
  return ring(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
