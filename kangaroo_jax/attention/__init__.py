"""Attention implementations behind one dispatcher, selected by `KangarooConfig.attention_impl`."""

from __future__ import annotations

from typing import Callable

from kangaroo_jax.attention.context_parallel import all_gather_attention, decode_attention, ring_attention
from kangaroo_jax.attention.reference import attention_mask, reference_attention

# Context-parallel impls fall back to `reference` when no mesh is set or the context axis is 1.
_IMPLS: dict[str, Callable] = {"reference": reference_attention, "ring": ring_attention,
                               "all_gather": all_gather_attention}


def get_attention(impl: str) -> Callable:
  """Returns the attention function for `impl` (same signature as `reference_attention`)."""
  try:
    return _IMPLS[impl]
  except KeyError:
    raise ValueError(f"unknown attention_impl {impl!r}; available: {sorted(_IMPLS)}") from None


__all__ = ["all_gather_attention", "attention_mask", "decode_attention", "get_attention", "reference_attention",
           "ring_attention"]
