"""USP: two-dimensional context parallelism, all-to-all over heads (Ulysses) inside a ring over sequence.

The `context` mesh axis of n devices is read as r rings of u devices each (n = u * r): device c is
member c % u of Ulysses group c // u. Each layer's attention

  1. all-to-alls q/k/v inside the group: heads split u ways, sequence gathered u ways, so each device
     holds h / u heads of the group's u * (seq / n) tokens (GQA: kv heads split the same way, so a
     query head stays with its kv head; needs kv_heads / tensor divisible by u);
  2. runs ring attention over the r groups (member j of every group is one ring, stride u on the axis),
     or dense attention when r = 1 (pure Ulysses);
  3. all-to-alls back to the sequence-sharded layout.

The all-to-all moves 4 * (seq / n) * heads * head_dim values per device per layer whatever r is; the ring
moves K/V r - 1 times. Few large groups suit long sequences with many heads; Llama-3-8B's 8 KV heads cap
u * tensor at 8.

Zigzag: the model orders the sequence as zigzag over all n devices (device c holds chunks c and
2n - 1 - c). A group then holds chunks j*u .. j*u + u - 1 (its early half) and 2n - 1 - j*u - (u - 1) ..
2n - 1 - j*u (its late half), i.e. zigzag over the r groups once the gathered pieces are reordered as
[early halves in member order, late halves in reverse member order] (`group_order`). With r = 1 that
order is the natural one, so dense kernels that mask by index (splash) apply.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kangaroo_jax.attention import splash
from kangaroo_jax.attention.ring import ring_attention_shard
from kangaroo_jax.attention.ring_splash import ring_attention_splash_shard


def groups(context: int, ulysses: int) -> list[list[int]]:
  """Device indices on the `context` axis of each Ulysses group: [[0..u-1], [u..2u-1], ...]."""
  if ulysses < 1 or context % ulysses:
    raise ValueError(f"the Ulysses degree {ulysses} must divide the context axis ({context})")
  return [list(range(j * ulysses, (j + 1) * ulysses)) for j in range(context // ulysses)]


def to_ring_layout(x, ulysses: int, layout: str):
  """A group's gathered tokens (member 0's shard, member 1's shard, ...) in the ring's layout order, along axis 1.

  For "zigzag" each shard is [early half, late half] and the result is [early halves of members 0..u-1, late
  halves of members u-1..0]; "contiguous" needs no reorder. Slices and a reverse, no gather: cheap, and so is
  its gradient. x: [batch, ulysses * shard, ...] -> the same shape.
  """
  if layout == "contiguous" or ulysses == 1:
    return x
  b, n = x.shape[:2]
  pieces = x.reshape(b, ulysses, 2, n // ulysses // 2, *x.shape[2:])
  early, late = pieces[:, :, 0], jnp.flip(pieces[:, :, 1], axis=1)
  return jnp.concatenate([early.reshape(b, n // 2, *x.shape[2:]), late.reshape(b, n // 2, *x.shape[2:])], axis=1)


def from_ring_layout(x, ulysses: int, layout: str):
  """The inverse of `to_ring_layout`."""
  if layout == "contiguous" or ulysses == 1:
    return x
  b, n = x.shape[:2]
  half = n // ulysses // 2
  early = x[:, : n // 2].reshape(b, ulysses, 1, half, *x.shape[2:])
  late = jnp.flip(x[:, n // 2 :].reshape(b, ulysses, 1, half, *x.shape[2:]), axis=1)
  return jnp.concatenate([early, late], axis=2).reshape(x.shape)


def usp_attention_shard(
    q,
    k,
    v,
    q_positions,
    kv_positions,
    q_segment_ids,
    kv_segment_ids,
    *,
    axis_name: str,
    context: int,
    ulysses: int,
    causal: bool,
    layout: str,
    kernel: str,
    scale: float,
    dense: Callable,
    block_q: int = 512,
    block_kv: int = 512,
    interpret: bool = False,
):
  """Per-device USP attention (inside shard_map, sequence sharded over `axis_name` of `context` devices).

  Args:
    q: [batch, shard, heads, head_dim]; k, v: [batch, shard, kv_heads, head_dim]; heads and kv_heads
      divisible by `ulysses`.
    q_positions, kv_positions, q_segment_ids, kv_segment_ids: [batch, shard] int32.
    layout: "zigzag" or "contiguous" (how the model split the sequence over `axis_name`).
    kernel: "splash" (masks by index: needs the model's layout), else the XLA ring (masks by positions).
    dense: with one ring (ulysses == context) and no splash, the per-device dense attention to run (the
      XLA reference or cuDNN), with `reference_attention`'s signature.
  Returns: [batch, shard, heads, head_dim].
  """
  u, r = ulysses, context // ulysses
  if q.shape[2] % u or k.shape[2] % u:
    raise ValueError(
        f"USP: heads ({q.shape[2]}) and kv heads ({k.shape[2]}) per device must be divisible by the "
        f"Ulysses degree {u}"
    )
  index_groups = groups(context, u)
  to_seq = lambda x: jax.lax.all_to_all(x, axis_name, 2, 1, axis_index_groups=index_groups, tiled=True)  # noqa: E731
  to_heads = lambda x: jax.lax.all_to_all(x, axis_name, 1, 2, axis_index_groups=index_groups, tiled=True)  # noqa: E731
  gather = lambda x: jax.lax.all_gather(x, axis_name, axis=1, axis_index_groups=index_groups, tiled=True)  # noqa: E731
  if layout == "zigzag" and q.shape[1] % 2:
    raise ValueError(f"zigzag needs an even shard length, got {q.shape[1]}")
  reorder = lambda x: to_ring_layout(x, u, layout)  # noqa: E731
  qg, kg, vg = (reorder(to_seq(x)) for x in (q, k, v))
  qp, kp, qs, ks = (reorder(gather(x)) for x in (q_positions, kv_positions, q_segment_ids, kv_segment_ids))

  if r == 1 and kernel == "splash":
    kind = "causal" if causal else "full"
    out = splash.dense(
        splash.make_kernel(kind, qg.shape[1], kg.shape[1], qg.shape[2], interpret=interpret),
        qg,
        kg,
        vg,
        qs,
        ks,
        scale=scale,
    )
  elif r == 1:
    out = dense(
        qg, kg, vg, causal=causal, q_positions=qp, kv_positions=kp, q_segment_ids=qs, kv_segment_ids=ks, scale=scale
    )
  elif kernel == "splash":
    out = ring_attention_splash_shard(
        qg, kg, vg, qs, ks, axis_name=axis_name, axis_size=r, layout=layout, scale=scale, interpret=interpret, stride=u
    )
  else:
    out = ring_attention_shard(
        qg,
        kg,
        vg,
        causal=causal,
        q_positions=qp,
        kv_positions=kp,
        q_segment_ids=qs,
        kv_segment_ids=ks,
        axis_name=axis_name,
        axis_size=r,
        scale=scale,
        block_q=block_q,
        block_kv=block_kv,
        stride=u,
    )
  return to_heads(from_ring_layout(out, u, layout))
