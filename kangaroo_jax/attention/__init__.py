"""Attention implementations behind one dispatcher, selected by `RunOptions.attention_impl`.

Each impl runs the platform's fused kernel per device (`RunOptions.attention_kernel`, "auto":
splash on TPU, cuDNN on GPU for dense attention, XLA elsewhere); see `context_parallel.resolve_kernel`.
"""

from __future__ import annotations

import functools
from typing import Callable

from kangaroo_jax.attention.context_parallel import (
    KERNELS,
    all_gather_attention,
    decode_attention,
    dense_attention,
    resolve_kernel,
    ring_attention,
    usp_attention,
)
from kangaroo_jax.attention.reference import attention_mask, reference_attention

# Context-parallel impls fall back to dense attention when no mesh is set or the context axis is 1.
# Keyed by the names of kangaroo_jax.run_options.ATTENTION_IMPLS (tests/test_config.py checks they agree).
_IMPLS: dict[str, Callable] = {
    "reference": dense_attention,
    "ring": ring_attention,
    "all_gather": all_gather_attention,
    "usp": usp_attention,
}


def get_attention(impl: str, block_size: int | None = None, kernel: str = "auto", ulysses: int = 0) -> Callable:
  """Returns the attention function for `impl` (same signature as `reference_attention`, plus `layout`).

  `block_size` sets the XLA ring's query and key tile length (tokens, also USP's ring); other impls have no
  tiles. `kernel` is the per-device kernel choice (one of `KERNELS`); `ulysses` is USP's all-to-all group
  size (0 = automatic, see `context_parallel.ulysses_degree`).
  """
  try:
    fn = _IMPLS[impl]
  except KeyError:
    raise ValueError(f"unknown attention_impl {impl!r}; available: {sorted(_IMPLS)}") from None
  if kernel not in KERNELS:
    raise ValueError(f"unknown attention kernel {kernel!r}; available: {KERNELS}")
  fn = functools.partial(fn, kernel=kernel)
  if impl == "usp":
    fn = functools.partial(fn, ulysses=ulysses)
  if impl in ("ring", "usp") and block_size is not None:
    if block_size < 1:
      raise ValueError(f"attention block_size must be positive, got {block_size}")
    return functools.partial(fn, block_q=block_size, block_kv=block_size)
  return fn


__all__ = [
    "KERNELS",
    "all_gather_attention",
    "attention_mask",
    "decode_attention",
    "dense_attention",
    "get_attention",
    "reference_attention",
    "resolve_kernel",
    "ring_attention",
    "usp_attention",
]
