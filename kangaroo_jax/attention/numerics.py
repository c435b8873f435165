"""Flash-attention numerics shared by every XLA attention path.

Matmul operands stay in the compute dtype (bf16 on accelerators) and accumulate in float32
(`preferred_element_type`); softmax statistics are float32; probabilities are cast back to the
value dtype before P.V. `Precision.HIGHEST` is requested only when the operands are float32, which
is what the float32 parity tests run: on TPU/GPU a HIGHEST f32 matmul costs several bf16 passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul_precision(dtype) -> jax.lax.Precision:
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.dtype(jnp.float32) else jax.lax.Precision.DEFAULT


def attention_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum of two same-dtype operands with float32 accumulation and a float32 result."""
  if a.dtype != b.dtype:
    raise TypeError(f"attention matmul operands must share a dtype, got {a.dtype} and {b.dtype}")
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=matmul_precision(a.dtype))
