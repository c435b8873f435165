"""From per-frame ViT features to LLM-width visual tokens (docs/model.md sections 1 and 3).

features [b, f, gh, gw, dv]
  -> + temporal position embedding of each frame's timestamp
  -> spatial-temporal patchify: merge `temporal_patch` frames x `spatial_patch`^2 patches
  -> mlp2x_gelu projector (Linear, exact erf GELU, Linear) -> [b, groups * tokens_per_group, d_llm]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kangaroo_jax.config import ProjectorConfig
from kangaroo_jax.layers.linear import dense, param


def sinusoidal_time_embedding(timestamps: jax.Array, dim: int, base: float = 10000.0) -> jax.Array:
  """[..., ] seconds -> [..., dim]: [sin(t w_i), cos(t w_i)] with w_i = base^(-i / (dim/2)), i < dim/2."""
  if dim % 2:
    raise ValueError(f"sinusoidal time embedding needs an even dim, got {dim}")
  half = dim // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = timestamps.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class TemporalPatchify(nnx.Module):
  """Adds the temporal position embedding and merges frames/patches into token groups."""

  def __init__(self, cfg: ProjectorConfig, vision_width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    if cfg.tpe == "learned":
      self.tpe_table = param(
          rngs,
          nnx.initializers.normal(stddev=0.02),
          (cfg.tpe_max_seconds, vision_width),
          ("positions", "embed"),
          param_dtype,
      )
    if cfg.patchify == "conv3d":
      t, s = cfg.temporal_patch, cfg.spatial_patch
      # Initialised to the average, so a fresh conv3d model starts out equal to the parameter-free one.
      self.conv_kernel = param(
          rngs,
          nnx.initializers.constant(1.0 / (t * s * s)),
          (t, s, s, vision_width),
          (None, None, None, "embed"),
          param_dtype,
      )
      self.conv_bias = param(rngs, nnx.initializers.zeros_init(), (vision_width,), ("embed",), param_dtype)

  def time_embedding(self, timestamps: jax.Array, dim: int) -> jax.Array:
    """[b, f] seconds -> [b, f, dim]."""
    if self.cfg.tpe == "sinusoidal":
      return sinusoidal_time_embedding(timestamps, dim, self.cfg.tpe_base).astype(self.dtype)
    rows = jnp.clip(jnp.round(timestamps).astype(jnp.int32), 0, self.cfg.tpe_max_seconds - 1)
    return jnp.take(self.tpe_table[...], rows, axis=0).astype(self.dtype)

  def __call__(self, features: jax.Array, timestamps: jax.Array | None) -> jax.Array:
    """features [b, f, gh, gw, d], timestamps [b, f] seconds -> [b, groups, tokens_per_group, d]."""
    b, f, gh, gw, d = features.shape
    cfg = self.cfg
    x = features.astype(self.dtype)
    if cfg.tpe != "none":
      if timestamps is None:
        raise ValueError(f"ProjectorConfig.tpe={cfg.tpe!r} needs per-frame timestamps [batch, frames] in seconds")
      if timestamps.shape != (b, f):
        raise ValueError(f"timestamps must have shape [batch, frames] = {(b, f)}, got {timestamps.shape}")
      x = x + self.time_embedding(timestamps, d)[:, :, None, None, :]
    if cfg.patchify == "none":
      return x.reshape(b, f, gh * gw, d)
    t, s = cfg.temporal_patch, cfg.spatial_patch
    if f % t:
      raise ValueError(
          f"{f} frames per row is not a multiple of ProjectorConfig.temporal_patch={t}; "
          "pad by repeating the last frame"
      )
    if gh % s or gw % s:
      raise ValueError(f"patch grid {gh}x{gw} is not divisible by ProjectorConfig.spatial_patch={s}")
    windows = x.reshape(b, f // t, t, gh // s, s, gw // s, s, d)
    if cfg.patchify == "avg":
      merged = jnp.mean(windows.astype(jnp.float32), axis=(2, 4, 6)).astype(self.dtype)
    else:
      kernel = self.conv_kernel[...].astype(self.dtype)
      merged = jnp.einsum("bgthiwjd,tijd->bghwd", windows, kernel) + self.conv_bias[...].astype(self.dtype)
    return merged.reshape(b, f // t, (gh // s) * (gw // s), d)


class MultimodalProjector(nnx.Module):
  """mlp2x_gelu: Linear(dv -> d) -> exact (erf) GELU -> Linear(d -> d), as torch nn.GELU() computes it."""

  def __init__(self, in_features: int, out_features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = dense(in_features, out_features, ("embed", "mlp"), **kw)
    self.linear_2 = dense(out_features, out_features, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., dv] -> [..., d]."""
    return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))
