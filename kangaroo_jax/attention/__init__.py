"""Attention implementations behind one dispatcher, selected by `KangarooConfig.attention_impl`."""

from __future__ import annotations

from typing import Callable

from kangaroo_jax.attention.reference import attention_mask, reference_attention

_IMPLS: dict[str, Callable] = {"reference": reference_attention}


def get_attention(impl: str) -> Callable:
  """Returns the attention function for `impl` (same signature as `reference_attention`)."""
  try:
    return _IMPLS[impl]
  except KeyError:
    raise ValueError(f"unknown attention_impl {impl!r}; available: {sorted(_IMPLS)}") from None


__all__ = ["attention_mask", "get_attention", "reference_attention"]
