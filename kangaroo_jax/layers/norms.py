"""Normalisation layers. Statistics are always computed in float32, whatever the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kangaroo_jax.layers.linear import param


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last dim (Llama). Params: scale [d]."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    # Cast before scaling, as transformers does, so bf16 runs round at the same place.
    return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


class LayerNorm(nnx.Module):
  """Standard LayerNorm over the last dim (EVA). Params: scale [d], bias [d]."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("norm",), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros_init(), (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)
