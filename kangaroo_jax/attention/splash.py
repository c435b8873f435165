"""TPU attention through jax's splash attention kernel (Pallas / Mosaic), dense and per ring step.

Splash takes one row at a time as q [heads, q_len, head_dim] and k, v [kv_heads, kv_len, head_dim]
(GQA native), applies segment ids in-kernel and skips fully masked blocks of its static mask. It
does not scale the logits: queries are pre-scaled here. With bf16 inputs it multiplies in bf16 with
float32 accumulation and float32 softmax statistics (flash numerics).

Causality is by *index* in splash, so these paths require the model's layouts: positions increase
with the index inside each segment (natural order), or the zigzag order of `layout.zigzag_order`
for the ring. Anything else goes through the XLA paths, which mask by positions.

The ring step functions use two private entry points of the pinned jax (`_splash_attention_bwd_dkv`
and the mask infos of a built kernel): the ring's backward needs the kernel's dK/dV/dQ against the
*global* log-sum-exp of all steps, which the public custom_vjp cannot take.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

LANES = 128  # Mosaic: the minor block dim must be a multiple of 128 (or the whole array)
DEFAULT_BLOCK = 512


def splash_block(length: int, target: int = DEFAULT_BLOCK) -> int | None:
  """The largest multiple of 128 that divides `length` and is <= target; None when there is none."""
  for b in range(min(target, length) // LANES * LANES, 0, -LANES):
    if length % b == 0:
      return b
  return None


def supports(q_len: int, kv_len: int) -> bool:
  """Whether splash can tile these (per-device) lengths under Mosaic's block rules."""
  return splash_block(q_len) is not None and splash_block(kv_len) is not None


def _block_sizes(q_len: int, kv_len: int) -> sk.BlockSizes:
  bq, bkv = splash_block(q_len), splash_block(kv_len)
  if bq is None or bkv is None:
    raise ValueError(f"splash attention needs lengths that are multiples of {LANES}, got q={q_len}, kv={kv_len}")
  return sk.BlockSizes(
      block_q=bq,
      block_kv=bkv,
      block_kv_compute=bkv,
      block_q_dkv=bq,
      block_kv_dkv=bkv,
      block_kv_dkv_compute=bkv,
      use_fused_bwd_kernel=True,
  )


def _mask(kind: str, shape: tuple[int, int], heads: int) -> sm.MultiHeadMask:
  base = sm.CausalMask(shape) if kind == "causal" else sm.FullMask(shape)
  return sm.MultiHeadMask([base] * heads)


def make_kernel(
    kind: str,
    q_len: int,
    kv_len: int,
    heads: int,
    *,
    q_seq_shards: int = 1,
    interpret: bool = False,
    save_residuals: bool = False,
) -> sk.SplashAttentionKernel:
  """A splash kernel for a "causal" or "full" mask over [q_len, kv_len] (global lengths when q_seq_shards > 1).

  Not cached: built inside a trace its mask tables are that trace's constants (a cached kernel would
  leak them into the next trace); building is block-level numpy work, done once per trace.
  """
  return sk.make_splash_mha(
      _mask(kind, (q_len, kv_len), heads),
      block_sizes=_block_sizes(q_len // q_seq_shards, kv_len),
      head_shards=1,
      q_seq_shards=q_seq_shards,
      save_residuals=save_residuals,
      interpret=interpret,
  )


def heads_major(x):
  """[b, s, h, d] -> [b, h, s, d]."""
  return x.transpose(0, 2, 1, 3)


def dense(kernel: sk.SplashAttentionKernel, q, k, v, q_seg, kv_seg, *, scale: float):
  """softmax(q k^T * scale) v per row with the kernel's mask and segment ids.

  q: [b, sq, h, d]; k, v: [b, sk, kvh, d]; q_seg / kv_seg: [b, sq] / [b, sk] int32.
  Returns [b, sq, h, d] in q's dtype.
  """
  qh, kh, vh = heads_major(q * jnp.asarray(scale, q.dtype)), heads_major(k), heads_major(v)
  run = lambda q1, k1, v1, qs1, ks1: kernel(q1, k1, v1, sk.SegmentIds(qs1, ks1))  # noqa: E731
  return heads_major(jax.vmap(run)(qh, kh, vh, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)))


# ---------------------------------------------------------------- ring steps (heads-major, pre-scaled q)


def step_forward(kind: str, qh, kh, vh, q_seg, kv_seg, *, interpret: bool):
  """One ring step's partial attention: (o [b, h, sq, d] in q's dtype, lse [b, h, sq] float32).

  qh: [b, h, sq, d] pre-scaled; kh, vh: [b, kvh, sk, d]; segments [b, sq] / [b, sk].
  """
  kernel = make_kernel(kind, qh.shape[2], kh.shape[2], qh.shape[1], interpret=interpret, save_residuals=True)

  def row(q1, k1, v1, qs1, ks1):
    out, (lse,) = kernel(q1, k1, v1, sk.SegmentIds(qs1, ks1))
    return out, lse

  return jax.vmap(row)(qh, kh, vh, q_seg, kv_seg)


def step_backward(kind: str, qh, kh, vh, q_seg, kv_seg, doh, lse, di, *, interpret: bool):
  """Gradient contributions of one ring step against the global softmax statistics.

  doh: [b, h, sq, d]; lse, di: [b, h, sq] float32 (log-sum-exp over *all* keys and rowsum(o * do)).
  Returns (dq [b, h, sq, d], dk, dv [b, kvh, sk, d]), dq with respect to the pre-scaled queries.
  """
  kernel = make_kernel(kind, qh.shape[2], kh.shape[2], qh.shape[1], interpret=interpret, save_residuals=True)
  blocks = kernel.kwargs["block_sizes"]

  def row(q1, k1, v1, qs1, ks1, do1, lse1, di1):
    dq, dk, dv = sk._splash_attention_bwd_dkv(  # noqa: SLF001 (see the module docstring)
        q1,
        k1,
        v1,
        sk.SegmentIds(qs1, ks1),
        None,
        lse1,
        do1,
        di1,
        bq=blocks.block_q_dkv,
        bkv=blocks.block_kv_dkv,
        bkv_compute=blocks.block_kv_dkv_compute,
        is_mqa=False,
        mask_info=kernel.dkv_mask_info,
        mask_value=kernel.kwargs["mask_value"],
        attn_logits_soft_cap=None,
        use_fused_bwd_kernel=True,
        q_layout=blocks.q_layout,
        k_layout=blocks.k_layout,
        v_layout=blocks.v_layout,
        mask_function=kernel.kwargs["mask_function"],
        interpret=interpret,
    )
    return dq, dk, dv

  return jax.vmap(row)(qh, kh, vh, q_seg, kv_seg, doh, lse, di)
