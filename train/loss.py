"""Token cross-entropy over a large vocabulary without materialising the logits.

The loss of a [batch, length] batch needs softmax statistics over the whole vocabulary for every
token; with Llama-3's 128,256 entries the float32 logits of one 33k-token device shard are 17 GB,
and their gradient as much again. Here the LM head is applied one vocabulary chunk at a time inside
a rematerialised scan: a running max / sum-of-exponentials gives the log-sum-exp, and each token's
target logit is picked from the chunk that holds it. Peak memory is one chunk's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kangaroo_jax.attention.numerics import matmul_precision
from kangaroo_jax.parallel.rules import shard

LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")


def vocab_chunks(vocab: int, target: int) -> int:
  """The largest divisor of `vocab` that is <= target (the number of chunks)."""
  for k in range(max(1, min(target, vocab)), 0, -1):
    if vocab % k == 0:
      return k
  return 1


def chunked_cross_entropy(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, mask: jax.Array, *, dtype, num_chunks: int = 8
) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token cross-entropies, number of loss tokens), float32 [] each.

  hidden: [batch, length, embed] final hidden states; kernel: [embed, vocab] LM head (no bias);
  targets: [batch, length] int; mask: [batch, length] (0/1). Logits are `hidden @ kernel` with
  operands in `dtype` and float32 accumulation, as the model's own head computes them.
  """
  d, vocab = kernel.shape
  k = vocab_chunks(vocab, num_chunks)
  width = vocab // k
  h = hidden.astype(dtype)
  w_chunks = kernel.reshape(d, k, width).transpose(1, 0, 2)  # [k, embed, width]
  precision = matmul_precision(dtype)

  @jax.checkpoint
  def step(carry, xs):
    m, s, picked = carry
    w, first = xs
    logits = jnp.einsum("bld,dv->blv", h, w.astype(dtype), preferred_element_type=jnp.float32, precision=precision)
    logits = shard(logits, LOGITS_AXES)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
    local = targets - first
    inside = (local >= 0) & (local < width)
    hit = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[..., None], axis=-1)[..., 0]
    return (m_new, s, picked + jnp.where(inside, hit, 0.0)), None

  zeros = jnp.zeros(targets.shape, jnp.float32)
  init = (jnp.full(targets.shape, -jnp.inf, jnp.float32), zeros, zeros)
  (m, s, picked), _ = jax.lax.scan(step, init, (w_chunks, jnp.arange(k, dtype=targets.dtype) * width))
  ce = m + jnp.log(s) - picked
  mask = mask.astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(mask)
