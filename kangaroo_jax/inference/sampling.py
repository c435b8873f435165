"""Next-token selection from float32 logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Hashable (a static argument of the jitted decode step).

  do_sample=False (or temperature == 0) is greedy argmax. top_k=0 and top_p=1.0 disable those filters.
  Filters apply in transformers' order: temperature, then top-k, then top-p.
  """

  do_sample: bool = False
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")

  @property
  def greedy(self) -> bool:
    return not self.do_sample or self.temperature == 0.0


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """logits [batch, vocab] float32 -> the same with filtered-out tokens at -inf (after temperature)."""
  logits = logits.astype(jnp.float32) / cfg.temperature
  neg = jnp.array(-jnp.inf, jnp.float32)
  if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if cfg.top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < cfg.top_p
    count = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(ordered, count - 1, axis=-1)
    logits = jnp.where(logits < threshold, neg, logits)
  return logits


def sample(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """logits [batch, vocab] -> token ids int32 [batch]."""
  if cfg.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)
