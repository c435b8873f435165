"""PyTorch-exact separable image / grid resizing.

Why this exists: PyTorch checkpoints (EVA / timm vision towers) resize their
absolute position embeddings with ``torch.nn.functional.interpolate`` and the
matching preprocessing resizes images the same way.  ``jax.image.resize`` cannot
reproduce either: its ``"cubic"`` kernel is the Keys cubic with a = -0.5 and it
renormalises the taps that fall outside the input instead of clamping indices
at the border, while torch's plain bicubic uses a = -0.75 with border-clamped
indices, and torch's ``antialias=True`` path uses its own support / centre /
truncation rules.  The functions here build the exact 1-D weight matrices torch
uses (``align_corners=False``) and apply them separably with ``einsum``.

Torch semantics reproduced (``scale = in_size / out_size``):

* ``bicubic``, ``antialias=False`` (``upsample_bicubic2d``): source coordinate
  ``x = scale * (i + 0.5) - 0.5`` (not clamped), taps ``floor(x) - 1 .. floor(x) + 2``
  with Keys cubic weights (a = -0.75) of ``t = x - floor(x)``; tap indices are
  clamped to ``[0, in_size - 1]`` so border taps accumulate on the edge sample.
* ``bilinear``, ``antialias=False`` (``upsample_bilinear2d``): ``x`` as above but
  clamped to ``>= 0``; ``i0 = floor(x)``, ``i1 = min(i0 + 1, in_size - 1)``,
  weights ``1 - t`` and ``t``.
* ``antialias=True`` (``_upsample_bicubic2d_aa`` / ``_upsample_bilinear2d_aa``),
  used for up- *and* down-sampling: ``support = r * max(scale, 1)`` with
  ``r = 2`` (bicubic) or ``1`` (bilinear), ``centre = scale * (i + 0.5)``; input
  samples ``j`` in ``[trunc(centre - support + 0.5), trunc(centre + support + 0.5))``
  (cut to the input) get ``filter((j + 0.5 - centre) / max(scale, 1))``, then
  each row is normalised to sum to 1.  The filter is the Keys cubic with
  a = -0.5 (bicubic) or the triangle ``max(0, 1 - |x|)`` (bilinear).  Hence
  an antialiased *upsample* differs from the plain one (different ``a`` and
  renormalisation instead of clamping at the borders).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["resize_weights", "resize_2d"]

_METHODS = ("bicubic", "bilinear")


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic convolution kernel evaluated at ``x`` (any shape, float64)."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0  # |x| < 1
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a  # 1 <= |x| < 2
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
  """Linear (tent) kernel ``max(0, 1 - |x|)``."""
  return np.maximum(0.0, 1.0 - np.abs(x))


def _source_coords(out_size: int, scale: np.float32) -> np.ndarray:
  """``scale * (i + 0.5) - 0.5`` rounded like torch's float32 kernels, returned as float64.

  torch evaluates this in float32 as a fused multiply-add (one rounding); the product of
  the float32 scale and ``i + 0.5`` is exact in float64, so rounding the float64 result
  once to float32 reproduces it bit for bit.
  """
  i = np.arange(out_size, dtype=np.float64)
  src = np.float64(scale) * (i + 0.5) - 0.5
  return src.astype(np.float32).astype(np.float64)


def _weights_bicubic(in_size: int, out_size: int, scale: np.float32) -> np.ndarray:
  """torch ``upsample_bicubic2d`` (align_corners=False) weights, [out, in] float64."""
  src = _source_coords(out_size, scale)  # cubic: no clamp to >= 0
  base = np.floor(src)
  t = src - base  # exact: fractional part of a float32
  base = base.astype(np.int64)
  # Keys a = -0.75 at distances t + 1, t, 1 - t, 2 - t for taps base-1 .. base+2.
  taps = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=1)  # [out, 4]
  w = _keys_cubic(taps, a=-0.75)
  idx = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
  mat = np.zeros((out_size, in_size), dtype=np.float64)
  rows = np.broadcast_to(np.arange(out_size)[:, None], idx.shape)
  np.add.at(mat, (rows, idx), w)  # clamped border taps accumulate
  return mat


def _weights_bilinear(in_size: int, out_size: int, scale: np.float32) -> np.ndarray:
  """torch ``upsample_bilinear2d`` (align_corners=False) weights, [out, in] float64."""
  src = np.maximum(_source_coords(out_size, scale), 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam1 = np.clip(src - i0, 0.0, 1.0)
  mat = np.zeros((out_size, in_size), dtype=np.float64)
  rows = np.arange(out_size)
  np.add.at(mat, (rows, i0), 1.0 - lam1)
  np.add.at(mat, (rows, i1), lam1)
  return mat


def _weights_aa(in_size: int, out_size: int, scale: np.float32, method: str) -> np.ndarray:
  """torch ``_upsample_{bicubic,bilinear}2d_aa`` (align_corners=False) weights, [out, in] float64."""
  if method == "bicubic":
    radius, kernel = 2.0, lambda x: _keys_cubic(x, a=-0.5)
  else:
    radius, kernel = 1.0, _triangle
  scale64 = float(scale)
  support = radius * scale64 if scale64 >= 1.0 else radius
  invscale = 1.0 / scale64 if scale64 >= 1.0 else 1.0
  # torch rounds the centre to float32 (opmath); the rest is computed in float64 here.
  centre = (scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5))).astype(np.float64)
  # C++ static_cast<int64_t> truncates toward zero; negative lower bounds are clipped to 0 anyway.
  lo = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
  hi = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size)
  j = np.arange(in_size, dtype=np.int64)[None, :]  # [1, in]
  inside = (j >= lo[:, None]) & (j < hi[:, None])
  w = np.where(inside, kernel((j + 0.5 - centre[:, None]) * invscale), 0.0)
  total = w.sum(axis=1, keepdims=True)
  return np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)


def resize_weights(
    in_size: int,
    out_size: int,
    *,
    method: str = "bicubic",
    antialias: bool = False,
) -> np.ndarray:
  """1-D resampling matrix matching ``torch.nn.functional.interpolate``.

  Semantics are ``F.interpolate(x, size=..., mode=method, align_corners=False,
  antialias=antialias)`` along one axis (see the module docstring).

  Args:
    in_size: input length (> 0).
    out_size: output length (> 0).
    method: ``"bicubic"`` or ``"bilinear"``.
    antialias: use torch's antialiased kernels (``_upsample_*2d_aa``).

  Returns:
    float32 array ``W`` of shape ``[out_size, in_size]`` (computed in float64)
    such that ``y[o] = sum_i W[o, i] * x[i]``.
  """
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
  in_size, out_size = int(in_size), int(out_size)
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
  # torch: area_pixel_compute_scale with size given (no scale_factor), in float32 opmath.
  # Rounding scale and the source coordinates to float32 like torch keeps the weights within
  # ~1e-6 of torch's (measured <= 8e-7) instead of drifting to ~1e-5 as sizes grow.
  scale = np.float32(in_size) / np.float32(out_size)
  if antialias:
    mat = _weights_aa(in_size, out_size, scale, method)
  elif method == "bicubic":
    mat = _weights_bicubic(in_size, out_size, scale)
  else:
    mat = _weights_bilinear(in_size, out_size, scale)
  return mat.astype(np.float32)


def resize_2d(
    x: jax.Array,
    out_hw: Sequence[int],
    *,
    method: str = "bicubic",
    antialias: bool = False,
) -> jax.Array:
  """Resize the two spatial axes of a channels-last array exactly like torch.

  Equivalent to ``F.interpolate(x_nchw, size=out_hw, mode=method,
  align_corners=False, antialias=antialias)`` after moving channels first.

  Args:
    x: ``[..., h, w, c]`` array (any leading batch dims).
    out_hw: ``(out_h, out_w)``; static Python ints.
    method: ``"bicubic"`` or ``"bilinear"``.
    antialias: use torch's antialiased kernels.

  Returns:
    ``[..., out_h, out_w, c]`` array, computed in float32 and returned in
    ``x.dtype`` when that is a floating dtype, else float32.
  """
  x = jnp.asarray(x)
  if x.ndim < 3:
    raise ValueError(f"expected x of shape [..., h, w, c], got {x.shape}")
  out_h, out_w = (int(s) for s in out_hw)
  h, w = x.shape[-3], x.shape[-2]
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  xf = x.astype(jnp.float32)
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
  hi = jax.lax.Precision.HIGHEST  # avoid TF32 / bf16 passes on accelerators
  # An axis whose size is unchanged is skipped: all four torch kernels are the identity there.
  if out_h != h:
    wh = jnp.asarray(resize_weights(h, out_h, method=method, antialias=antialias))
    xf = jnp.einsum("Hh,...hwc->...Hwc", wh, xf, precision=hi)
  if out_w != w:
    ww = jnp.asarray(resize_weights(w, out_w, method=method, antialias=antialias))
    xf = jnp.einsum("Ww,...hwc->...hWc", ww, xf, precision=hi)
  return xf.astype(out_dtype)
