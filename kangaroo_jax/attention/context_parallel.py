"""Context-parallel attention: `shard_map` wrappers that place ring / all-gather attention on the mesh.

Both take the global arrays (inside `jit` under `jax.set_mesh`) with the sequence, batch and heads sharded
as the rules table says (`activation_length`: `context`; `activation_batch`: `data`, `fsdp`;
`activation_heads`: `tensor`, by default; see kangaroo_jax.parallel.rules), and validate the shapes against the
mesh before tracing the collective code, so a bad combination fails with a sentence, not an XLA error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kangaroo_jax.attention import splash
from kangaroo_jax.attention.numerics import attention_einsum
from kangaroo_jax.attention.reference import MASK_VALUE, attention_mask, reference_attention
from kangaroo_jax.attention.ring import ring_attention_shard
from kangaroo_jax.attention.ring_splash import LAYOUTS as RING_LAYOUTS
from kangaroo_jax.attention.ring_splash import ring_attention_splash_shard
from kangaroo_jax.attention.usp import usp_attention_shard
from kangaroo_jax.parallel.rules import current_mesh, mesh_axes_for, mesh_axes_in
from kangaroo_jax.run_options import ATTENTION_KERNELS


class ContextParallelError(ValueError):
  """A sequence / head / batch shape that the current mesh cannot split."""


def context_axis() -> str | None:
  """The mesh axis the sequence is split over: the rules table's `activation_length` (None: not split).

  Ring, all-gather and USP run their collectives over this one axis, so the rules may give it at most one."""
  axes = mesh_axes_for("activation_length")
  if len(axes) > 1:
    raise ContextParallelError(
        f"activation_length: context-parallel attention splits the sequence over one mesh "
        f"axis, the sharding rules give {axes}"
    )
  return axes[0] if axes else None


def context_size() -> int:
  mesh = current_mesh()
  ctx = context_axis()
  return 1 if mesh is None or ctx is None else mesh.shape.get(ctx, 1)


def _size(mesh, axes) -> int:
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  return n


def _specs(mesh, batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, what: str, context: bool = True):
  """(head spec [b, s, h, d], token spec [b, s]); the sequence is sharded over the context axis unless told not
  to. Mesh axes come from the rules table (activation_batch / activation_length / activation_heads)."""
  ctx = context_axis() if context else None
  n = mesh.shape.get(ctx, 1) if ctx is not None else 1
  for name, length in (("query", q_len), ("key/value", kv_len)):
    if length % n:
      raise ContextParallelError(
          f"{what}: {name} length {length} is not divisible by the context axis ({n}); "
          f"pad the sequence to a multiple of {n} (2*{n} for zigzag load balancing)"
      )
  batch_axes = mesh_axes_in(mesh.shape, "activation_batch")
  size = _size(mesh, batch_axes)
  if batch % size:
    raise ContextParallelError(
        f"{what}: batch {batch} is not divisible by " f"{'*'.join(mesh_axes_for('activation_batch'))} = {size}"
    )
  head_axes = tuple(a for a in mesh_axes_in(mesh.shape, "activation_heads") if a not in batch_axes and a != ctx)
  t = _size(mesh, head_axes)
  if t > 1 and (heads % t or kv_heads % t):
    raise ContextParallelError(
        f"{what}: heads ({heads}) and kv heads ({kv_heads}) must be divisible by " f"{'*'.join(head_axes)}={t}"
    )
  b = batch_axes if batch_axes else None
  seq = ctx if n > 1 else None
  h = None if not head_axes else head_axes[0] if len(head_axes) == 1 else head_axes
  return P(b, seq, h, None), P(b, seq)


def _head_shards(mesh, head_spec) -> int:
  """Devices one head dim is split over, from a `_specs` head spec."""
  h = head_spec[2]
  return 1 if h is None else _size(mesh, (h,) if isinstance(h, str) else h)


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


KERNELS = ATTENTION_KERNELS  # the choices are spelled once, in kangaroo_jax.run_options


def platform() -> str:
  """The platform being compiled for: the current mesh's devices', else the default backend.

  Never `jax.default_backend()` alone: a CPU host compiling ahead of time for a TPU mesh must pick
  the TPU kernels (and run Pallas natively, not in interpret mode).
  """
  mesh = current_mesh()
  device = None if mesh is None else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def resolve_kernel(kernel: str, *, dtype, q_len: int, kv_len: int, layout: str | None, ring: bool = False) -> str:
  """The per-device kernel an attention call runs: "splash" (TPU), "cudnn" (GPU, dense only) or "xla".

  "auto" picks splash on TPU when the layout is one splash can mask by index and the per-device
  lengths tile under Mosaic's rules, cuDNN flash attention for dense attention on GPU in half
  precision, and the XLA path otherwise. "splash" off TPU runs in Pallas interpret mode (tests).
  """
  if kernel not in KERNELS:
    raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  splash_ok = (
      layout is not None
      and splash.supports(q_len, kv_len)
      and (not ring or layout != "zigzag" or splash.supports(q_len // 2, kv_len // 2))
  )
  if kernel == "auto":
    where = platform()
    if where == "tpu" and splash_ok:
      return "splash"
    if where == "gpu" and half and not ring:
      return "cudnn"
    return "xla"
  if kernel == "splash" and not splash_ok:
    raise ContextParallelError(
        f"splash attention needs the model's sequence layout (got layout={layout!r}) and per-device lengths that "
        f"are multiples of {splash.LANES} (x2 for zigzag halves), got q={q_len}, kv={kv_len}"
    )
  if kernel == "cudnn" and ring:
    raise ContextParallelError("cuDNN attention is a dense kernel; the ring uses 'xla' tiles on GPU")
  return kernel


def ring_attention(
    q,
    k,
    v,
    *,
    causal: bool,
    q_positions=None,
    kv_positions=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    scale: float | None = None,
    block_q: int = 512,
    block_kv: int = 512,
    kernel: str = "auto",
    layout: str | None = None,
):
  """Ring attention over `context`; same contract as `reference_attention`.

  q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]. Falls back to dense
  attention when no mesh is set or the context axis has size 1. `layout` ("natural", "zigzag", or
  None for arbitrary positions) says how the sequence is ordered, which the splash ring needs.
  """
  mesh = current_mesh()
  if mesh is None or context_size() == 1:
    return dense_attention(
        q,
        k,
        v,
        causal=causal,
        q_positions=q_positions,
        kv_positions=kv_positions,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        scale=scale,
        kernel=kernel,
        layout=layout,
    )
  # The model's natural order split over `context` is the contiguous ring layout.
  layout = {"natural": "contiguous"}.get(layout, layout)
  qp, kp, qs, ks = _defaults(q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  head_spec, tok_spec = _specs(mesh, q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1], "ring attention")
  ctx = context_axis()
  n = mesh.shape[ctx]
  use = resolve_kernel(
      kernel, dtype=q.dtype, q_len=q.shape[1] // n, kv_len=k.shape[1] // n, layout=layout if causal else None, ring=True
  )
  if use == "splash":
    interpret = platform() != "tpu"

    def per_device_splash(q, k, v, qs, ks):
      return ring_attention_splash_shard(
          q, k, v, qs, ks, axis_name=ctx, axis_size=n, layout=layout, scale=scale, interpret=interpret
      )

    return jax.shard_map(
        per_device_splash, in_specs=(head_spec,) * 3 + (tok_spec,) * 2, out_specs=head_spec, check_vma=False
    )(q, k, v, qs, ks)

  def per_device(q, k, v, qp, kp, qs, ks):
    return ring_attention_shard(
        q,
        k,
        v,
        causal=causal,
        q_positions=qp,
        kv_positions=kp,
        q_segment_ids=qs,
        kv_segment_ids=ks,
        axis_name=ctx,
        axis_size=n,
        scale=scale,
        block_q=block_q,
        block_kv=block_kv,
    )

  return jax.shard_map(per_device, in_specs=(head_spec,) * 3 + (tok_spec,) * 4, out_specs=head_spec, check_vma=False)(
      q, k, v, qp, kp, qs, ks
  )


def ulysses_degree(requested: int, context: int, kv_heads_local: int) -> int:
  """The Ulysses group size of USP: `requested`, or for 0 the largest divisor of both the context axis and the
  kv heads per device (all-to-all is cheaper than ring steps, so the ring only takes what heads cannot)."""
  if requested == 0:
    return max(u for u in range(1, context + 1) if context % u == 0 and kv_heads_local % u == 0)
  if requested < 0 or context % requested:
    raise ContextParallelError(f"USP: the Ulysses degree {requested} must divide the context axis ({context})")
  if kv_heads_local % requested:
    raise ContextParallelError(
        f"USP: {kv_heads_local} kv heads per device (after tensor parallelism) cannot be split "
        f"{requested} ways; use a Ulysses degree that divides them"
    )
  return requested


def usp_attention(
    q,
    k,
    v,
    *,
    causal: bool,
    q_positions=None,
    kv_positions=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    scale: float | None = None,
    block_q: int = 512,
    block_kv: int = 512,
    kernel: str = "auto",
    layout: str | None = None,
    ulysses: int = 0,
):
  """USP (Ulysses all-to-all over heads x ring over sequence) on `context`; same contract as `ring_attention`.

  `ulysses` is the all-to-all group size (0: `ulysses_degree`'s choice); context / ulysses devices form
  each ring. Falls back to dense attention without a mesh or with context 1.
  """
  mesh = current_mesh()
  if mesh is None or context_size() == 1:
    return dense_attention(
        q,
        k,
        v,
        causal=causal,
        q_positions=q_positions,
        kv_positions=kv_positions,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        scale=scale,
        kernel=kernel,
        layout=layout,
    )
  ring_layout = {"natural": "contiguous"}.get(layout, layout)
  qp, kp, qs, ks = _defaults(q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  head_spec, tok_spec = _specs(mesh, q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1], "USP attention")
  ctx = context_axis()
  n = mesh.shape[ctx]
  t = _head_shards(mesh, head_spec)
  u = ulysses_degree(ulysses, n, k.shape[2] // t)
  r = n // u
  if q.shape[1] != k.shape[1]:
    raise ContextParallelError(f"USP attention needs equal query and key lengths, got {q.shape[1]} and {k.shape[1]}")
  local = q.shape[1] // n * u  # tokens per device after the all-to-all
  if r == 1:
    index_layout = "natural" if ring_layout in RING_LAYOUTS else None
    use = resolve_kernel(kernel, dtype=q.dtype, q_len=local, kv_len=local, layout=index_layout if causal else None)
  else:
    use = resolve_kernel(
        kernel, dtype=q.dtype, q_len=local, kv_len=local, layout=ring_layout if causal else None, ring=True
    )
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  interpret = platform() != "tpu"
  shard_layout = ring_layout if ring_layout in RING_LAYOUTS else "contiguous"
  dense = cudnn_attention if use == "cudnn" else reference_attention

  def per_device(q, k, v, qp, kp, qs, ks):
    return usp_attention_shard(
        q,
        k,
        v,
        qp,
        kp,
        qs,
        ks,
        axis_name=ctx,
        context=n,
        ulysses=u,
        causal=causal,
        layout=shard_layout,
        kernel=use,
        scale=scale,
        dense=dense,
        block_q=block_q,
        block_kv=block_kv,
        interpret=interpret,
    )

  return jax.shard_map(per_device, in_specs=(head_spec,) * 3 + (tok_spec,) * 4, out_specs=head_spec, check_vma=False)(
      q, k, v, qp, kp, qs, ks
  )


def cudnn_attention(
    q, k, v, *, causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale, implementation: str = "cudnn"
):
  """Dense attention on one device through `jax.nn.dot_product_attention` (cuDNN flash on GPU).

  The mask is built from positions and segment ids exactly as in `reference_attention`.
  """
  mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal)
  mask = None if mask is None else mask[:, None]  # [b, 1, q, kv], broadcast over heads
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)


def _splash_dense(q, k, v, qs, ks, *, causal, scale, mesh, gather: bool):
  """Splash over the mesh: queries sharded over `context` (K/V all-gathered when `gather`), batch over
  (data, fsdp), heads over `tensor`. Mosaic kernels cannot be auto-partitioned, hence the shard_map."""
  ctx = context_axis() if gather else None
  n = mesh.shape.get(ctx, 1) if ctx is not None else 1
  head_spec, tok_spec = _specs(
      mesh, q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1], "splash attention", context=gather
  )
  h_local = q.shape[2] // _head_shards(mesh, head_spec)
  kernel = splash.make_kernel(
      "causal" if causal else "full", q.shape[1], k.shape[1], h_local, q_seq_shards=n, interpret=platform() != "tpu"
  )
  kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(None, ctx if n > 1 else None)))
  scale = q.shape[-1] ** -0.5 if scale is None else scale

  def per_device(kernel, q, k, v, qs, ks):
    if n > 1:
      gather_seq = lambda x: jax.lax.all_gather(x, ctx, axis=1, tiled=True)  # noqa: E731
      k, v, ks = gather_seq(k), gather_seq(v), gather_seq(ks)
    return splash.dense(kernel, q, k, v, qs, ks, scale=scale)

  return jax.shard_map(
      per_device, in_specs=(kernel_spec,) + (head_spec,) * 3 + (tok_spec,) * 2, out_specs=head_spec, check_vma=False
  )(kernel, q, k, v, qs, ks)


def dense_attention(
    q,
    k,
    v,
    *,
    causal: bool,
    q_positions=None,
    kv_positions=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    scale: float | None = None,
    kernel: str = "auto",
    layout: str | None = None,
):
  """The `reference` impl: dense attention with the fused kernel of the platform (same contract).

  XLA (`reference_attention`, query-chunked) on CPU; cuDNN on GPU in half precision; splash on TPU
  when `layout` is "natural" (positions increase with the index inside each segment).
  """
  mesh = current_mesh()
  use = resolve_kernel(kernel, dtype=q.dtype, q_len=q.shape[1] // context_size(), kv_len=k.shape[1], layout=layout)
  kw = dict(
      causal=causal,
      q_positions=q_positions,
      kv_positions=kv_positions,
      q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids,
      scale=scale,
  )
  if use == "xla":
    return reference_attention(q, k, v, **kw)
  if use == "cudnn":
    return cudnn_attention(q, k, v, **kw)
  _, _, qs, ks = _defaults(q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  if mesh is None:
    kernel_fn = splash.make_kernel(
        "causal" if causal else "full", q.shape[1], k.shape[1], q.shape[2], interpret=platform() != "tpu"
    )
    return splash.dense(kernel_fn, q, k, v, qs, ks, scale=q.shape[-1] ** -0.5 if scale is None else scale)
  return _splash_dense(q, k, v, qs, ks, causal=causal, scale=scale, mesh=mesh, gather=context_size() > 1)


def all_gather_attention(
    q,
    k,
    v,
    *,
    causal: bool,
    q_positions=None,
    kv_positions=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    scale: float | None = None,
    kernel: str = "auto",
    layout: str | None = None,
):
  """Queries stay sharded over `context`; K/V (and their positions / segments) are all-gathered.

  Memory per device is O(seq/context * seq) for the XLA path's logits (one query chunk at a time);
  simple and fast up to ~20-30k tokens. Per device it runs splash (TPU), cuDNN (GPU) or XLA.
  """
  mesh = current_mesh()
  kw = dict(
      causal=causal,
      q_positions=q_positions,
      kv_positions=kv_positions,
      q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids,
      scale=scale,
      kernel=kernel,
  )
  if mesh is None or context_size() == 1:
    return dense_attention(q, k, v, layout=layout, **kw)
  qp, kp, qs, ks = _defaults(q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  head_spec, tok_spec = _specs(mesh, q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1], "all-gather attention")
  ctx = context_axis()
  n = mesh.shape[ctx]
  use = resolve_kernel(kernel, dtype=q.dtype, q_len=q.shape[1] // n, kv_len=k.shape[1], layout=layout)
  if use == "splash":
    return _splash_dense(q, k, v, qs, ks, causal=causal, scale=scale, mesh=mesh, gather=True)
  local = reference_attention if use == "xla" else cudnn_attention

  def per_device(q, k, v, qp, kp, qs, ks):
    gather = lambda x: jax.lax.all_gather(x, ctx, axis=1, tiled=True)  # noqa: E731
    return local(
        q,
        gather(k),
        gather(v),
        causal=causal,
        q_positions=qp,
        kv_positions=gather(kp),
        q_segment_ids=qs,
        kv_segment_ids=gather(ks),
        scale=scale,
    )

  return jax.shard_map(per_device, in_specs=(head_spec,) * 3 + (tok_spec,) * 4, out_specs=head_spec, check_vma=False)(
      q, k, v, qp, kp, qs, ks
  )


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
  scale = d**-0.5 if scale is None else scale

  def partial(q, k, v, qp, kp, valid):
    kv_local = k.shape[2]
    qg = q.reshape(q.shape[0], kv_local, q.shape[2] // kv_local, d)
    s = attention_einsum("bkgd,btkd->bkgt", qg, k.astype(qg.dtype)) * scale
    ok = valid & (kp <= qp)
    s = jnp.where(ok[:, None, None, :], s, MASK_VALUE)
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    return attention_einsum("bkgt,btkd->bkgd", p.astype(qg.dtype), v.astype(qg.dtype)), jnp.sum(p, axis=-1), m

  def finish(o, l, m, dtype):
    return (o / l[..., None]).reshape(o.shape[0], 1, o.shape[1] * o.shape[2], d).astype(dtype)

  mesh = current_mesh()
  if mesh is None or context_size() == 1:
    return finish(*partial(q, k_cache, v_cache, q_positions, cache_positions, cache_valid), q.dtype)
  head_spec, tok_spec = _specs(mesh, b, h, kvh, k_cache.shape[1], k_cache.shape[1], "decode attention")
  q_spec = P(head_spec[0], None, head_spec[2], None)
  ctx = context_axis()

  def per_device(q, k, v, qp, kp, valid):
    o, l, m = partial(q, k, v, qp, kp, valid)
    m_all = jax.lax.pmax(m, ctx)
    w = jnp.exp(m - m_all)
    o = jax.lax.psum(o * w[..., None], ctx)
    l = jax.lax.psum(l * w, ctx)
    return finish(o, l, m_all, q.dtype)

  return jax.shard_map(
      per_device,
      in_specs=(q_spec, head_spec, head_spec, P(head_spec[0], None), tok_spec, tok_spec),
      out_specs=q_spec,
      check_vma=False,
  )(q, k_cache, v_cache, q_positions, cache_positions, cache_valid)
