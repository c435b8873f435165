"""kangaroo_jax.layers.resize against torch.nn.functional.interpolate (CPU, float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from kangaroo_jax.layers.resize import resize_2d, resize_weights  # noqa: E402

# (in, out) per axis: upsample, odd upsample, downsample, odd downsample, identity.
SIZE_PAIRS = [(16, 32), (16, 23), (32, 16), (37, 11), (16, 16)]
METHODS = ["bicubic", "bilinear"]


def _torch_resize_nhwc(x: np.ndarray, out_hw, method: str, antialias: bool) -> np.ndarray:
  """torch reference on a channels-last numpy array [b, h, w, c]."""
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  y = F.interpolate(xt, size=tuple(out_hw), mode=method, align_corners=False, antialias=antialias)
  return y.permute(0, 2, 3, 1).numpy()


def _torch_weights(in_size: int, out_size: int, method: str, antialias: bool) -> np.ndarray:
  """torch's 1-D resampling matrix [out, in], read off by resizing basis vectors along H.

  W is kept at 3: torch 2.13's CPU antialias kernel returns wrong values when the output width is 1.
  """
  basis = torch.eye(in_size, dtype=torch.float32).reshape(in_size, 1, in_size, 1).expand(-1, -1, -1, 3)
  y = F.interpolate(basis.contiguous(), size=(out_size, 3), mode=method, align_corners=False, antialias=antialias)
  return y[:, 0, :, 1].T.numpy()


def _assert_close(actual, expected, rel=1e-5):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  value_range = max(float(np.ptp(expected)), 1.0)
  err = float(np.max(np.abs(actual - expected)))
  assert err <= rel * value_range, f"max abs err {err:.3e} > {rel:g} * range {value_range:.3f}"


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_resize_weights_match_torch(method, antialias):
  pairs = SIZE_PAIRS + [(1, 5), (5, 1), (2, 3), (3, 2), (7, 100), (100, 7), (224, 37)]
  for in_size, out_size in pairs:
    w = resize_weights(in_size, out_size, method=method, antialias=antialias)
    assert w.shape == (out_size, in_size) and w.dtype == np.float32
    _assert_close(w, _torch_weights(in_size, out_size, method, antialias), rel=2e-6)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)  # all four kernels preserve constants


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", range(len(SIZE_PAIRS)))
def test_resize_2d_matches_torch(k, method, antialias):
  (h, oh), (w, ow) = SIZE_PAIRS[k], SIZE_PAIRS[(k + 1) % len(SIZE_PAIRS)]  # non-square mixes too
  rng = np.random.default_rng(1000 + k)
  x = rng.standard_normal((2, h, w, 5)).astype(np.float32)
  y = resize_2d(jnp.asarray(x), (oh, ow), method=method, antialias=antialias)
  assert y.shape == (2, oh, ow, 5) and y.dtype == jnp.float32
  _assert_close(y, _torch_resize_nhwc(x, (oh, ow), method, antialias))


def test_square_identity_and_pos_embed_like_grid():
  """timm-style pos-embed resample: [1, gh, gw, d] grid, bicubic + antialias, both directions."""
  rng = np.random.default_rng(0)
  grid = rng.standard_normal((1, 16, 16, 32)).astype(np.float32)
  for out_hw in [(16, 16), (24, 24), (37, 20), (11, 11)]:
    y = resize_2d(grid, out_hw, method="bicubic", antialias=True)
    _assert_close(y, _torch_resize_nhwc(grid, out_hw, "bicubic", True))
  np.testing.assert_array_equal(np.asarray(resize_2d(grid, (16, 16))), grid)


def test_jit_leading_dims_and_dtype():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 2, 16, 23, 4)).astype(np.float32)
  fn = jax.jit(lambda a: resize_2d(a, (11, 32), method="bicubic", antialias=True))
  y = fn(jnp.asarray(x))
  assert y.shape == (3, 2, 11, 32, 4)
  ref = _torch_resize_nhwc(x.reshape(6, 16, 23, 4), (11, 32), "bicubic", True).reshape(3, 2, 11, 32, 4)
  _assert_close(y, ref)
  yb = resize_2d(jnp.asarray(x, jnp.bfloat16), (11, 32))
  assert yb.dtype == jnp.bfloat16  # float32 compute, returned in the input float dtype
  yi = resize_2d(jnp.ones((4, 4, 1), jnp.uint8), (8, 8))
  assert yi.dtype == jnp.float32


def test_torch_semantics_documented():
  """Facts the module docstring relies on, checked against torch and jax.image.resize."""
  # Antialiased bicubic *upsampling* is a different kernel from plain bicubic (a=-0.5 vs -0.75) ...
  up_aa = resize_weights(16, 32, method="bicubic", antialias=True)
  up = resize_weights(16, 32, method="bicubic", antialias=False)
  assert np.abs(up_aa - up).max() > 1e-2
  # ... while antialiased bilinear upsampling coincides with plain bilinear.
  np.testing.assert_allclose(
      resize_weights(16, 32, method="bilinear", antialias=True), resize_weights(16, 32, method="bilinear"), atol=1e-5
  )
  # jax.image.resize's cubic (Keys a=-0.5, no border clamping) does not reproduce torch's bicubic.
  x = np.random.default_rng(2).standard_normal((1, 16, 16, 3)).astype(np.float32)
  ref = _torch_resize_nhwc(x, (32, 32), "bicubic", False)
  jax_cubic = np.asarray(jax.image.resize(jnp.asarray(x), (1, 32, 32, 3), method="cubic"))
  assert np.abs(jax_cubic - ref).max() > 1e-2


def test_bad_arguments():
  with pytest.raises(ValueError):
    resize_weights(4, 8, method="nearest")
  with pytest.raises(ValueError):
    resize_weights(0, 8)
  with pytest.raises(ValueError):
    resize_2d(jnp.ones((4, 4, 1)), (4, 4), method="lanczos")
  with pytest.raises(ValueError):
    resize_2d(jnp.ones((4, 4)), (8, 8))
