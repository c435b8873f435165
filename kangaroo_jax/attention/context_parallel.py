"""Context-parallel attention: `shard_map` wrappers that place ring / all-gather attention on the mesh.

Both take the global arrays (inside `jit` under `jax.set_mesh`) with the sequence sharded over
`context`, batch over (`data`, `fsdp`) and heads over `tensor`, and validate the shapes against the
mesh before tracing the collective code, so a bad combination fails with a sentence, not an XLA error.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kangaroo_jax.attention.reference import MASK_VALUE, attention_mask, reference_attention
from kangaroo_jax.attention.ring import ring_attention_shard

CONTEXT = "context"


class ContextParallelError(ValueError):
  """A sequence / head / batch shape that the current mesh cannot split."""


def _mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def context_size() -> int:
  mesh = _mesh()
  return 1 if mesh is None or CONTEXT not in mesh.shape else mesh.shape[CONTEXT]


def _specs(mesh, batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, what: str):
  n = mesh.shape[CONTEXT]
  for name, length in (("query", q_len), ("key/value", kv_len)):
    if length % n:
      raise ContextParallelError(f"{what}: {name} length {length} is not divisible by the context axis ({n}); "
                                 f"pad the sequence to a multiple of {n} (2*{n} for zigzag load balancing)")
  batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
  size = 1
  for a in batch_axes:
    size *= mesh.shape[a]
  if batch % size:
    raise ContextParallelError(f"{what}: batch {batch} is not divisible by data*fsdp = {size}")
  t = mesh.shape.get("tensor", 1)
  head_axis = "tensor" if t > 1 else None
  if t > 1 and (heads % t or kv_heads % t):
    raise ContextParallelError(f"{what}: heads ({heads}) and kv heads ({kv_heads}) must be divisible by tensor={t}")
  b = batch_axes if batch_axes else None
  return P(b, CONTEXT, head_axis, None), P(b, CONTEXT)


def _defaults(q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
  b, sq = q.shape[:2]
  sk = k.shape[1]
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(sq, dtype=jnp.int32), (b, sq))
  if kv_positions is None:
    kv_positions = jnp.broadcast_to(jnp.arange(sk, dtype=jnp.int32), (b, sk))
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("segment ids must be given for both queries and keys, or for neither")
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros((b, sq), jnp.int32)
    kv_segment_ids = jnp.zeros((b, sk), jnp.int32)
  return q_positions, kv_positions, q_segment_ids, kv_segment_ids


def ring_attention(q, k, v, *, causal: bool, q_positions=None, kv_positions=None, q_segment_ids=None,
                   kv_segment_ids=None, scale: float | None = None, block_q: int = 512, block_kv: int = 512,
                   tile_impl: str = "auto"):
  """Ring attention over `context`; same contract as `reference_attention`.

  q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]. Falls back to the
  reference when no mesh is set or the context axis has size 1.
  """
  mesh = _mesh()
  if mesh is None or context_size() == 1:
    return reference_attention(q, k, v, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
                               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)
  qp, kp, qs, ks = _defaults(q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  head_spec, tok_spec = _specs(mesh, q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1], "ring attention")
  n = mesh.shape[CONTEXT]

  def per_device(q, k, v, qp, kp, qs, ks):
    return ring_attention_shard(q, k, v, causal=causal, q_positions=qp, kv_positions=kp, q_segment_ids=qs,
                                kv_segment_ids=ks, axis_name=CONTEXT, axis_size=n, scale=scale, block_q=block_q,
                                block_kv=block_kv, tile_impl=tile_impl)

  return jax.shard_map(per_device, in_specs=(head_spec,) * 3 + (tok_spec,) * 4, out_specs=head_spec,
                       check_vma=False)(q, k, v, qp, kp, qs, ks)


def local_attention_kernel(kernel: str, dtype) -> str:
  """Which dense kernel a device runs: "cudnn" (fused, GPU, half precision) or "xla"."""
  if kernel not in ("auto", "xla", "cudnn"):
    raise ValueError(f"unknown dense attention kernel {kernel!r}; expected 'auto', 'xla' or 'cudnn'")
  if kernel == "auto":
    fused_ok = jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if fused_ok else "xla"
  return kernel


def dense_local_attention(q, k, v, *, causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale,
                          kernel: str = "auto"):
  """Dense attention on one device through `jax.nn.dot_product_attention` (cuDNN flash on GPU).

  The mask is built from positions and segment ids exactly as in `reference_attention`.
  """
  impl = local_attention_kernel(kernel, q.dtype)
  mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal)
  mask = None if mask is None else mask[:, None]  # [b, 1, q, kv], broadcast over heads
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)


def all_gather_attention(q, k, v, *, causal: bool, q_positions=None, kv_positions=None, q_segment_ids=None,
                         kv_segment_ids=None, scale: float | None = None, kernel: str = "auto"):
  """Queries stay sharded over `context`; K/V (and their positions / segments) are all-gathered.

  Memory per device is O(seq/context * seq) for the logits; simple and fast up to ~20-30k tokens.
  The per-device attention is `reference_attention` unless `kernel` resolves to "cudnn" (GPU, bf16/fp16).
  """
  mesh = _mesh()
  if mesh is None or context_size() == 1:
    return reference_attention(q, k, v, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
                               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)
  qp, kp, qs, ks = _defaults(q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  head_spec, tok_spec = _specs(mesh, q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1],
                               "all-gather attention")

  local = reference_attention if local_attention_kernel(kernel, q.dtype) == "xla" else functools.partial(
      dense_local_attention, kernel=kernel)

  def per_device(q, k, v, qp, kp, qs, ks):
    gather = lambda x: jax.lax.all_gather(x, CONTEXT, axis=1, tiled=True)
    return local(q, gather(k), gather(v), causal=causal, q_positions=qp, kv_positions=gather(kp),
                 q_segment_ids=qs, kv_segment_ids=gather(ks), scale=scale)

  return jax.shard_map(per_device, in_specs=(head_spec,) * 3 + (tok_spec,) * 4, out_specs=head_spec,
                       check_vma=False)(q, k, v, qp, kp, qs, ks)


def decode_attention(q, k_cache, v_cache, *, q_positions, cache_positions, cache_valid, scale: float | None = None):
  """One new query token against a KV cache whose length is sharded over `context`.

  Each device reduces its cache shard to partial (o, l, m); the shards are merged with a
  log-sum-exp reduction (pmax / psum), so the cache is never gathered.

  Args:
    q: [batch, 1, heads, head_dim]
    k_cache, v_cache: [batch, cache_len, kv_heads, head_dim]
    q_positions: [batch, 1]; cache_positions: [batch, cache_len]; cache_valid: [batch, cache_len] bool.
  Returns: [batch, 1, heads, head_dim]
  """
  b, one, h, d = q.shape
  if one != 1:
    raise ValueError(f"decode_attention takes one query token, got q_len={one}")
  kvh = k_cache.shape[2]
  scale = d ** -0.5 if scale is None else scale

  def partial(q, k, v, qp, kp, valid):
    kv_local = k.shape[2]
    qg = q.reshape(q.shape[0], kv_local, q.shape[2] // kv_local, d)
    s = jnp.einsum("bkgd,btkd->bkgt", qg, k, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST) * scale
    ok = valid & (kp <= qp)
    s = jnp.where(ok[:, None, None, :], s, MASK_VALUE)
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    return jnp.einsum("bkgt,btkd->bkgd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST), \
        jnp.sum(p, axis=-1), m

  def finish(o, l, m, dtype):
    return (o / l[..., None]).reshape(o.shape[0], 1, o.shape[1] * o.shape[2], d).astype(dtype)

  mesh = _mesh()
  if mesh is None or context_size() == 1:
    return finish(*partial(q, k_cache, v_cache, q_positions, cache_positions, cache_valid), q.dtype)
  head_spec, tok_spec = _specs(mesh, b, h, kvh, k_cache.shape[1], k_cache.shape[1], "decode attention")
  q_spec = P(head_spec[0], None, head_spec[2], None)

  def per_device(q, k, v, qp, kp, valid):
    o, l, m = partial(q, k, v, qp, kp, valid)
    m_all = jax.lax.pmax(m, CONTEXT)
    w = jnp.exp(m - m_all)
    o = jax.lax.psum(o * w[..., None], CONTEXT)
    l = jax.lax.psum(l * w, CONTEXT)
    return finish(o, l, m_all, q.dtype)

  return jax.shard_map(per_device, in_specs=(q_spec, head_spec, head_spec, P(head_spec[0], None), tok_spec, tok_spec),
                       out_specs=q_spec, check_vma=False)(q, k_cache, v_cache, q_positions, cache_positions,
                                                          cache_valid)
