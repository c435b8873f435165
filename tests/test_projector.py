"""Projector, temporal position embedding and spatial-temporal patchify (float32, CPU)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kangaroo_jax.config import ProjectorConfig
from kangaroo_jax.models import MultimodalProjector, TemporalPatchify, sinusoidal_time_embedding
from tests.helpers import max_rel_error

TOL = 1e-5
F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)


# ---------------------------------------------------------------------------------------------- projector


def _projector_pair(dv=24, d=40, seed=0):
  torch.manual_seed(seed)
  ref = torch.nn.Sequential(torch.nn.Linear(dv, d), torch.nn.GELU(), torch.nn.Linear(d, d)).eval()
  ours = MultimodalProjector(dv, d, rngs=nnx.Rngs(seed), **F32)
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  ours.linear_1.kernel[...] = jnp.asarray(sd["0.weight"].T)
  ours.linear_1.bias[...] = jnp.asarray(sd["0.bias"])
  ours.linear_2.kernel[...] = jnp.asarray(sd["2.weight"].T)
  ours.linear_2.bias[...] = jnp.asarray(sd["2.bias"])
  return ours, ref


def _torch_apply(ref, x, approximate="none"):
  with torch.no_grad():
    h = ref[0](torch.from_numpy(x))
    h = torch.nn.functional.gelu(h, approximate=approximate)
    return ref[2](h).numpy()


def test_projector_matches_torch_sequential():
  ours, ref = _projector_pair()
  x = np.random.RandomState(0).normal(size=(2, 7, 24)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  got = np.asarray(ours(jnp.asarray(x)))
  assert got.shape == (2, 7, 40)
  err = max_rel_error(got, want)
  print(f"projector parity: max rel err {err:.2e}")
  assert err <= TOL


def test_projector_uses_exact_erf_gelu_not_tanh():
  """Negative control: on large pre-activations the tanh GELU is measurably different, so the parity
  test above really pins the exact (erf) GELU."""
  ours, ref = _projector_pair(seed=1)
  # Inputs scaled up (pre-activations std ~1.2, tails to ~5) to cover where the two GELUs differ most.
  x = (2.0 * np.random.RandomState(1).normal(size=(4, 16, 24))).astype(np.float32)
  exact = _torch_apply(ref, x, "none")
  tanh = _torch_apply(ref, x, "tanh")
  got = np.asarray(ours(jnp.asarray(x)))
  assert max_rel_error(got, exact) <= TOL
  gap = max_rel_error(tanh, exact)
  print(f"tanh vs erf GELU gap: {gap:.2e}")
  assert gap > 5 * TOL
  assert max_rel_error(got, tanh) > TOL


# ------------------------------------------------------------------------------------ time embedding


def test_sinusoidal_time_embedding_hand_values():
  emb = np.asarray(sinusoidal_time_embedding(jnp.asarray([0.0, 1.0, 2.5]), 4, 10000.0))
  assert emb.shape == (3, 4)
  np.testing.assert_allclose(emb[0], [0.0, 0.0, 1.0, 1.0], atol=1e-7)
  # half = 2: w = [1, 10000^(-1/2) = 1e-2]
  np.testing.assert_allclose(emb[1], [math.sin(1), math.sin(1e-2), math.cos(1), math.cos(1e-2)], rtol=1e-6)
  np.testing.assert_allclose(emb[2], [math.sin(2.5), math.sin(2.5e-2), math.cos(2.5), math.cos(2.5e-2)], rtol=1e-6)
  # batch dims are kept; dim 6, base 100: w = [1, 100^(-1/3), 100^(-2/3)]
  t = jnp.asarray([[3.0, 4.0]])
  emb6 = np.asarray(sinusoidal_time_embedding(t, 6, 100.0))
  assert emb6.shape == (1, 2, 6)
  w = np.array([1.0, 100 ** (-1 / 3), 100 ** (-2 / 3)])
  np.testing.assert_allclose(emb6[0, 1], np.concatenate([np.sin(4 * w), np.cos(4 * w)]), rtol=1e-6)
  with pytest.raises(ValueError, match="even"):
    sinusoidal_time_embedding(t, 5)


# ------------------------------------------------------------------------------------------- patchify


def _features(f=4, gh=4, gw=4):
  """[1, f, gh, gw, 2]: channel 0 = frame*100 + row*10 + col, channel 1 = 7 - channel 0."""
  fr, r, c = np.meshgrid(np.arange(f), np.arange(gh), np.arange(gw), indexing="ij")
  v = (fr * 100 + r * 10 + c).astype(np.float32)
  return np.stack([v, 7.0 - v], axis=-1)[None]


def _patchify(d=2, **kw):
  return TemporalPatchify(ProjectorConfig(**kw), d, rngs=nnx.Rngs(0), **F32)


def _np_window_mean(x, t=2, s=2):
  b, f, gh, gw, d = x.shape
  out = np.zeros((b, f // t, (gh // s) * (gw // s), d), np.float64)
  for g in range(f // t):
    for i in range(gh // s):
      for j in range(gw // s):
        win = x[:, g * t : (g + 1) * t, i * s : (i + 1) * s, j * s : (j + 1) * s]
        out[:, g, i * (gw // s) + j] = win.mean(axis=(1, 2, 3))
  return out


def test_avg_patchify_hand_values_and_row_major_order():
  x = _features()
  out = np.asarray(_patchify(tpe="none", patchify="avg")(jnp.asarray(x), None))
  assert out.shape == (1, 2, 4, 2)
  # group 0 (frames 0-1): mean frame 0.5 -> 50; rows {0,1} -> 5; cols {0,1} -> 0.5
  np.testing.assert_allclose(out[0, 0, :, 0], [55.5, 57.5, 75.5, 77.5], rtol=1e-6)  # row-major 2x2 grid
  np.testing.assert_allclose(out[0, 1, :, 0], [255.5, 257.5, 275.5, 277.5], rtol=1e-6)  # frames 2-3: +200
  np.testing.assert_allclose(out[0, :, :, 1], 7.0 - out[0, :, :, 0], rtol=1e-6)
  np.testing.assert_allclose(out, _np_window_mean(x), rtol=1e-6)


def test_sinusoidal_tpe_added_per_frame_before_averaging():
  x = _features()
  ts = np.array([[0.0, 1.5, 3.0, 7.0]], np.float32)
  out = np.asarray(_patchify(tpe="sinusoidal", patchify="avg")(jnp.asarray(x), jnp.asarray(ts)))
  # d = 2 -> one frequency (w = 1): emb(t) = [sin t, cos t]
  emb = np.stack([np.sin(ts[0]), np.cos(ts[0])], axis=-1)  # [f, 2]
  base = _np_window_mean(x)
  for g in range(2):
    want = base[0, g] + 0.5 * (emb[2 * g] + emb[2 * g + 1])[None, :]
    np.testing.assert_allclose(out[0, g], want, rtol=1e-6, atol=1e-5)
  # and it is not merely the embedding of the mean timestamp (sin/cos are non-linear)
  mean_t_emb = np.array([np.sin(0.75), np.cos(0.75)])
  assert np.max(np.abs(out[0, 0] - (base[0, 0] + mean_t_emb))) > 1e-3


def test_conv3d_default_init_equals_avg():
  x = np.random.RandomState(0).normal(size=(2, 4, 4, 6, 4)).astype(np.float32)
  ts = np.random.RandomState(1).uniform(0, 50, size=(2, 4)).astype(np.float32)
  avg = np.asarray(_patchify(d=4, patchify="avg")(jnp.asarray(x), jnp.asarray(ts)))
  conv = np.asarray(_patchify(d=4, patchify="conv3d")(jnp.asarray(x), jnp.asarray(ts)))
  assert conv.shape == avg.shape == (2, 2, 6, 4)
  assert max_rel_error(conv, avg) <= TOL


def test_conv3d_random_kernel_matches_numpy_loop():
  t, s, d = 2, 2, 3
  rs = np.random.RandomState(2)
  x = rs.normal(size=(2, 4, 4, 6, d)).astype(np.float32)
  kernel = rs.normal(size=(t, s, s, d)).astype(np.float32)
  bias = rs.normal(size=(d,)).astype(np.float32)
  m = _patchify(d=d, tpe="none", patchify="conv3d")
  m.conv_kernel[...] = jnp.asarray(kernel)
  m.conv_bias[...] = jnp.asarray(bias)
  got = np.asarray(m(jnp.asarray(x), None))
  b, f, gh, gw, _ = x.shape
  want = np.zeros((b, f // t, (gh // s) * (gw // s), d), np.float64)
  for bi in range(b):
    for g in range(f // t):
      for i in range(gh // s):
        for j in range(gw // s):
          acc = bias.astype(np.float64).copy()
          for dt in range(t):
            for di in range(s):
              for dj in range(s):
                acc += x[bi, g * t + dt, i * s + di, j * s + dj] * kernel[dt, di, dj]  # depthwise
          want[bi, g, i * (gw // s) + j] = acc
  assert got.shape == want.shape
  assert max_rel_error(got, want) <= TOL


def test_patchify_none_keeps_every_frame():
  x = _features(f=3, gh=4, gw=2)  # odd frame count is fine without temporal merging
  ts = np.array([[0.0, 1.0, 2.0]], np.float32)
  out = np.asarray(_patchify(tpe="none", patchify="none")(jnp.asarray(x), jnp.asarray(ts)))
  assert out.shape == (1, 3, 8, 2)
  np.testing.assert_allclose(out, x.reshape(1, 3, 8, 2))


def test_learned_tpe_rounds_and_clamps():
  m = _patchify(tpe="learned", tpe_max_seconds=5, patchify="none")
  assert m.tpe_table.shape == (5, 2)
  table = np.stack([np.arange(5), 10.0 * np.arange(5)], axis=-1).astype(np.float32)  # row i = [i, 10 i]
  m.tpe_table[...] = jnp.asarray(table)
  x = np.zeros((1, 6, 2, 2, 2), np.float32)
  ts = np.array([[0.4, 1.6, 2.4, 4.0, 100.0, -3.0]], np.float32)
  out = np.asarray(m(jnp.asarray(x), jnp.asarray(ts)))
  rows = [0, 2, 2, 4, 4, 0]  # rounded, clamped to [0, tpe_max_seconds - 1]
  for k, r in enumerate(rows):
    np.testing.assert_allclose(out[0, k], np.broadcast_to(table[r], (4, 2)))


def test_patchify_errors():
  x4 = jnp.asarray(_features(f=4))
  with pytest.raises(ValueError, match="temporal_patch"):
    _patchify(tpe="none")(jnp.asarray(_features(f=3)), None)
  with pytest.raises(ValueError, match="timestamps"):
    _patchify(tpe="sinusoidal")(x4, None)
  with pytest.raises(ValueError, match="timestamps"):
    _patchify(tpe="sinusoidal")(x4, jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match="spatial_patch"):
    _patchify(tpe="none")(jnp.asarray(_features(f=4, gh=3, gw=4)), None)
