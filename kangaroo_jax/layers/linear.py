"""Dense layers whose parameters carry logical axis names (resolved by kangaroo_jax.parallel.rules)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

default_kernel_init = nnx.initializers.normal(stddev=0.02)


def dense(
    in_features: int,
    out_features: int,
    names: Sequence[str],
    *,
    use_bias: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    kernel_init=default_kernel_init,
) -> nnx.Linear:
  """nnx.Linear with kernel [in, out] named `names` and bias [out] named `names[1:]`."""
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(kernel_init, tuple(names)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), tuple(names[1:])),
      precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None,
      rngs=rngs,
  )


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str], param_dtype) -> nnx.Param:
  """A free-standing parameter (biases, tokens, tables) with logical axis names."""
  return nnx.Param(init(rngs.params(), tuple(shape), param_dtype), out_sharding=tuple(names))
