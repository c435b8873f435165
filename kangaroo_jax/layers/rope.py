"""Rotary position embeddings in the two layouts this model mixes.

* Llama: 1-D, *half-split* rotation (dims [0, d/2) pair with [d/2, d)), theta 500000, optional
  llama3 frequency scaling.
* EVA02: 2-D, *interleaved-pair* rotation ((x0, x1), (x2, x3), ...), the first half of each head
  rotated by the row coordinate and the second half by the column coordinate, with positions
  rescaled from the frame grid onto the pre-training grid (`pt_hw_seq_len`).

Mixing the two up is the classic silent converter bug, so each has its own function and test.
Tables are built in numpy float64 (static shapes) and applied in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kangaroo_jax.config import RopeScaling


def llama_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
  """Inverse frequencies [head_dim // 2], with Llama-3.1 style scaling when `scaling` is set."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return inv_freq.astype(np.float32)
  old_len = scaling.original_max_position_embeddings
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_llama_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Half-split rotation.

  Args:
    x: [batch, seq, heads, head_dim]
    positions: [batch, seq] integer positions.
    inv_freq: [head_dim // 2]
  Returns: x rotated, same shape and dtype.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, s, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def eva_rope_tables(
    grid_h: int, grid_w: int, head_dim: int, pt_seq_len: int, theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
  """cos, sin tables [grid_h * grid_w, head_dim] for row-major patch tokens.

  Each coordinate gets head_dim // 4 frequencies theta^(-k / (head_dim // 4)), each used for one
  interleaved pair; positions are `arange(n) / n * pt_seq_len` so a grid of any size spans the
  pre-training range.
  """
  num_freqs = head_dim // 4
  freqs = 1.0 / theta ** (np.arange(num_freqs, dtype=np.float64) / num_freqs)
  pos_h = np.arange(grid_h, dtype=np.float64) / grid_h * pt_seq_len
  pos_w = np.arange(grid_w, dtype=np.float64) / grid_w * pt_seq_len
  ang_h = np.repeat(np.outer(pos_h, freqs), 2, axis=-1)  # [gh, head_dim / 2]
  ang_w = np.repeat(np.outer(pos_w, freqs), 2, axis=-1)  # [gw, head_dim / 2]
  ang = np.concatenate(
      [
          np.broadcast_to(ang_h[:, None, :], (grid_h, grid_w, head_dim // 2)),
          np.broadcast_to(ang_w[None, :, :], (grid_h, grid_w, head_dim // 2)),
      ],
      axis=-1,
  ).reshape(grid_h * grid_w, head_dim)
  return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_interleaved_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Interleaved-pair rotation: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).

  Args:
    x: [batch, tokens, heads, head_dim]
    cos, sin: [tokens, head_dim]
  """
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)
