"""Ring attention for TPU: one splash kernel call per ring step, partial results merged by log-sum-exp.

Per-device code (inside `jax.shard_map` over `context`), for causal attention in one of the model's
two layouts (see `splash.py`): "zigzag", where device i holds sequence chunks i and 2n-1-i, or
"contiguous", where it holds shard i. Which part of a step's (query, key) block can attend is then
known from the two device indices alone, so every step runs a static-mask kernel:

  zigzag, source j == i: causal over the local block            (own K/V, step 0)
          source j <  i: every query vs the first half of K/V   (chunk j is earlier than both)
          source j >  i: second half of the queries vs all K/V  (chunk 2n-1-i is later than both)
  contiguous, j == i: causal;  j < i: full;  j > i: nothing.

Zigzag gives every device the same work per step (half a block). The backward pass is a second
ring in which dK/dV travel with their K/V and arrive home after a full turn; each step's gradients
come from splash's fused backward kernel against the global log-sum-exp of the forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kangaroo_jax.attention import splash
from kangaroo_jax.attention.ring import ring_index, rotate
from kangaroo_jax.attention.splash import heads_major

LAYOUTS = ("zigzag", "contiguous")


def _neg_inf(shape):
  return jnp.full(shape, -jnp.inf, jnp.float32)


def _forward_cases(layout: str, interpret: bool):
  """Branches for the steps after the first: (qh, kh, vh, qs, ks) -> (o f32, lse) over all local queries."""
  fwd = functools.partial(splash.step_forward, interpret=interpret)
  full = lambda qh, kh, vh, qs, ks: tuple(x.astype(jnp.float32) for x in fwd("full", qh, kh, vh, qs, ks))  # noqa: E731

  def kv_first_half(qh, kh, vh, qs, ks):
    c = kh.shape[2] // 2
    return full(qh, kh[:, :, :c], vh[:, :, :c], qs, ks[:, :c])

  def q_second_half(qh, kh, vh, qs, ks):
    c = qh.shape[2] // 2
    o, lse = full(qh[:, :, c:], kh, vh, qs[:, c:], ks)
    return (jnp.concatenate([jnp.zeros_like(o), o], axis=2), jnp.concatenate([_neg_inf(lse.shape), lse], axis=2))

  def nothing(qh, kh, vh, qs, ks):
    return jnp.zeros(qh.shape, jnp.float32), _neg_inf(qh.shape[:3])

  return (kv_first_half, q_second_half) if layout == "zigzag" else (full, nothing)


def _backward_cases(layout: str, interpret: bool):
  """Branches for the steps after the first: (qh, kh, vh, qs, ks, doh, lse, di) -> (dq, dk, dv) float32."""
  bwd = functools.partial(splash.step_backward, interpret=interpret)
  f32 = lambda xs: tuple(x.astype(jnp.float32) for x in xs)  # noqa: E731
  full = lambda *a: f32(bwd("full", *a))  # noqa: E731

  def kv_first_half(qh, kh, vh, qs, ks, doh, lse, di):
    c = kh.shape[2] // 2
    dq, dk, dv = full(qh, kh[:, :, :c], vh[:, :, :c], qs, ks[:, :c], doh, lse, di)
    pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x)], axis=2)  # noqa: E731
    return dq, pad(dk), pad(dv)

  def q_second_half(qh, kh, vh, qs, ks, doh, lse, di):
    c = qh.shape[2] // 2
    dq, dk, dv = full(qh[:, :, c:], kh, vh, qs[:, c:], ks, doh[:, :, c:], lse[:, :, c:], di[:, :, c:])
    return jnp.concatenate([jnp.zeros_like(dq), dq], axis=2), dk, dv

  def nothing(qh, kh, vh, qs, ks, doh, lse, di):
    return (jnp.zeros(qh.shape, jnp.float32), jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32))

  return (kv_first_half, q_second_half) if layout == "zigzag" else (full, nothing)


def _case(axis_name: str, n: int, t, stride: int):
  """Branch index for ring step t >= 1: 0 when the K/V held now come from an earlier ring member, else 1."""
  i = ring_index(axis_name, stride)
  source = (i - t) % n
  return jnp.where(source < i, 0, 1)


@functools.lru_cache(maxsize=None)
def _make_ring(scale: float, axis_name: str, n: int, layout: str, interpret: bool, stride: int):
  fwd_cases, bwd_cases = _forward_cases(layout, interpret), _backward_cases(layout, interpret)

  def forward(q, k, v, qs, ks):
    qh, kh, vh = heads_major(q * jnp.asarray(scale, q.dtype)), heads_major(k), heads_major(v)
    o, lse = splash.step_forward("causal", qh, kh, vh, qs, ks, interpret=interpret)
    o = o.astype(jnp.float32)

    def step(carry, t):
      o, lse, kh, vh, ks = carry
      kh, vh, ks = rotate(axis_name, n, kh, vh, ks, stride=stride)
      o_t, lse_t = jax.lax.switch(_case(axis_name, n, t, stride), fwd_cases, qh, kh, vh, qs, ks)
      lse_new = jnp.logaddexp(lse, lse_t)
      o = o * jnp.exp(lse - lse_new)[..., None] + o_t * jnp.exp(lse_t - lse_new)[..., None]
      return (o, lse_new, kh, vh, ks), None

    (o, lse, _, _, _), _ = jax.lax.scan(step, (o, lse, kh, vh, ks), jnp.arange(1, n))
    return heads_major(o).astype(q.dtype), lse

  @jax.custom_vjp
  def ring(q, k, v, qs, ks):
    return forward(q, k, v, qs, ks)[0]

  def ring_fwd(q, k, v, qs, ks):
    out, lse = forward(q, k, v, qs, ks)
    return out, (q, k, v, qs, ks, out, lse)

  def ring_bwd(res, dout):
    q, k, v, qs, ks, out, lse = res
    qh, kh, vh = heads_major(q * jnp.asarray(scale, q.dtype)), heads_major(k), heads_major(v)
    doh = heads_major(dout.astype(q.dtype))
    di = jnp.sum(heads_major(out).astype(jnp.float32) * doh.astype(jnp.float32), axis=-1)
    dq, dk, dv = (
        x.astype(jnp.float32)
        for x in splash.step_backward("causal", qh, kh, vh, qs, ks, doh, lse, di, interpret=interpret)
    )

    def step(carry, t):
      dq, kh, vh, ks, dk, dv = carry
      # dK/dV accumulators travel with the K/V they belong to.
      kh, vh, ks, dk, dv = rotate(axis_name, n, kh, vh, ks, dk, dv, stride=stride)
      dq_t, dk_t, dv_t = jax.lax.switch(_case(axis_name, n, t, stride), bwd_cases, qh, kh, vh, qs, ks, doh, lse, di)
      return (dq + dq_t, kh, vh, ks, dk + dk_t, dv + dv_t), None

    (dq, _, _, _, dk, dv), _ = jax.lax.scan(step, (dq, kh, vh, ks, dk, dv), jnp.arange(1, n))
    dk, dv = rotate(axis_name, n, dk, dv, stride=stride)  # one more hop brings every shard's gradient home
    return (
        heads_major(dq * scale).astype(q.dtype),
        heads_major(dk).astype(k.dtype),
        heads_major(dv).astype(v.dtype),
        None,
        None,
    )

  ring.defvjp(ring_fwd, ring_bwd)
  return ring


def ring_attention_splash_shard(
    q,
    k,
    v,
    q_segment_ids,
    kv_segment_ids,
    *,
    axis_name: str,
    axis_size: int,
    layout: str,
    scale: float | None = None,
    interpret: bool = False,
    stride: int = 1,
):
  """Per-device causal ring attention with splash kernels.

  Args:
    q: [batch, shard, heads, head_dim]; k, v: [batch, shard, kv_heads, head_dim] (compute dtype).
    q_segment_ids / kv_segment_ids: [batch, shard] int32 (packed rows; padding is its own segment).
    layout: "zigzag" or "contiguous" (how the global sequence was split over the ring's members).
    stride: > 1 runs that many rings side by side over `axis_name` (`ring.ring_permutation`).
  Returns: [batch, shard, heads, head_dim].
  """
  if layout not in LAYOUTS:
    raise ValueError(f"splash ring layout must be one of {LAYOUTS}, got {layout!r}")
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"splash ring needs equal query and key shards, got {q.shape[1]} and {k.shape[1]}")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  ring = _make_ring(float(scale), axis_name, int(axis_size), layout, bool(interpret), int(stride))
  return ring(q, k, v, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
