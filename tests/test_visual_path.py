"""Projector parity vs torch, hand-checked TPE / patchify values, and visual-token placement."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kangaroo_jax.config import ConfigError, ProjectorConfig, preset
from kangaroo_jax.models import Kangaroo, MultimodalProjector, TemporalPatchify, merge_visual_tokens
from kangaroo_jax.models.projector import sinusoidal_time_embedding
from tests.helpers import max_rel_error


def test_projector_matches_torch_sequential_with_exact_gelu():
  torch.manual_seed(0)
  ref = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 40)).eval()
  ours = MultimodalProjector(24, 40, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  ours.linear_1.kernel[...] = ref[0].weight.detach().numpy().T
  ours.linear_1.bias[...] = ref[0].bias.detach().numpy()
  ours.linear_2.kernel[...] = ref[2].weight.detach().numpy().T
  ours.linear_2.bias[...] = ref[2].bias.detach().numpy()
  x = np.random.default_rng(0).normal(scale=3.0, size=(2, 7, 24)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x)).numpy()
  err = max_rel_error(np.asarray(ours(jnp.asarray(x))), expected)
  print(f"projector parity: max rel err {err:.2e}")
  assert err <= 1e-5
  # The tanh approximation (JAX's default) would not pass: the exact-erf choice is what is tested.
  tanh_ref = torch.nn.Sequential(ref[0], torch.nn.GELU(approximate="tanh"), ref[2])
  with torch.no_grad():
    assert max_rel_error(np.asarray(ours(jnp.asarray(x))), tanh_ref(torch.from_numpy(x)).numpy()) > 1e-4


def test_sinusoidal_time_embedding_hand_values():
  emb = np.asarray(sinusoidal_time_embedding(jnp.array([0.0, 1.0]), 4, base=10000.0))
  np.testing.assert_allclose(emb[0], [0, 0, 1, 1], atol=1e-7)
  np.testing.assert_allclose(emb[1], [np.sin(1), np.sin(1e-2), np.cos(1), np.cos(1e-2)], rtol=1e-6)


def _features():
  """[1, 4 frames, 4, 4, 2] with value frame*100 + row*10 + col (+0.5 in channel 1)."""
  f, r, c = np.meshgrid(np.arange(4), np.arange(4), np.arange(4), indexing="ij")
  base = (f * 100 + r * 10 + c).astype(np.float32)
  return jnp.asarray(np.stack([base, base + 0.5], axis=-1)[None])


def _patchify(**kw):
  return TemporalPatchify(ProjectorConfig(**kw), 2, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_avg_patchify_hand_values_and_token_order():
  out = np.asarray(_patchify(tpe="none", patchify="avg")(_features(), None))
  assert out.shape == (1, 2, 4, 2)
  # Group 0 = frames {0, 1}; token 0 = rows {0, 1} x cols {0, 1}: mean(0,1,10,11,100,101,110,111) = 55.5
  assert out[0, 0, 0, 0] == pytest.approx(55.5)
  assert out[0, 0, 1, 0] == pytest.approx(57.5)  # token 1: cols {2, 3} (row-major)
  assert out[0, 0, 2, 0] == pytest.approx(75.5)  # token 2: rows {2, 3}
  assert out[0, 1, 0, 0] == pytest.approx(255.5)  # group 1 = frames {2, 3}
  assert out[0, 1, 3, 1] == pytest.approx(277.5 + 0.5)


def test_tpe_is_added_per_frame_before_averaging():
  ts = jnp.array([[0.0, 1.5, 3.0, 4.5]])
  with_tpe = np.asarray(_patchify(tpe="sinusoidal")(_features(), ts))
  without = np.asarray(_patchify(tpe="none")(_features(), None))
  emb = np.asarray(sinusoidal_time_embedding(ts[0], 2))
  np.testing.assert_allclose(with_tpe[0, 0] - without[0, 0], np.broadcast_to((emb[0] + emb[1]) / 2, (4, 2)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(with_tpe[0, 1] - without[0, 1], np.broadcast_to((emb[2] + emb[3]) / 2, (4, 2)),
                             rtol=1e-5, atol=1e-5)


def test_conv3d_patchify_default_equals_avg_and_random_matches_loop():
  feats = _features()
  conv = _patchify(tpe="none", patchify="conv3d")
  np.testing.assert_allclose(np.asarray(conv(feats, None)), np.asarray(_patchify(tpe="none")(feats, None)), rtol=1e-6)
  rng = np.random.default_rng(0)
  kernel, bias = rng.normal(size=(2, 2, 2, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)
  conv.conv_kernel[...], conv.conv_bias[...] = kernel, bias
  x = np.asarray(feats)[0]
  expected = np.zeros((2, 4, 2), np.float32)
  for g in range(2):
    for i in range(2):
      for j in range(2):
        window = x[2 * g:2 * g + 2, 2 * i:2 * i + 2, 2 * j:2 * j + 2]  # [t, s, s, d]
        expected[g, i * 2 + j] = (window * kernel).sum(axis=(0, 1, 2)) + bias
  np.testing.assert_allclose(np.asarray(conv(feats, None))[0], expected, rtol=1e-5)


def test_patchify_none_and_learned_tpe():
  out = _patchify(tpe="none", patchify="none")(_features(), None)
  assert out.shape == (1, 4, 16, 2)
  learned = _patchify(tpe="learned", patchify="none", tpe_max_seconds=3)
  table = np.arange(6, dtype=np.float32).reshape(3, 2)
  learned.tpe_table[...] = table
  rows = np.asarray(learned.time_embedding(jnp.array([[0.2, 1.6, 2.4, 99.0]]), 2))[0]
  np.testing.assert_array_equal(rows, table[[0, 2, 2, 2]])  # rounded seconds, clamped to the last row


def test_patchify_errors():
  with pytest.raises(ValueError, match="not a multiple of ProjectorConfig.temporal_patch=2"):
    _patchify(tpe="none")(_features()[:, :3], None)
  with pytest.raises(ValueError, match="needs per-frame timestamps"):
    _patchify(tpe="sinusoidal")(_features(), None)
  with pytest.raises(ValueError, match="not divisible by ProjectorConfig.spatial_patch=2"):
    _patchify(tpe="none")(_features()[:, :, :3], None)
  with pytest.raises(ConfigError, match="ProjectorConfig.patchify"):
    ProjectorConfig(patchify="maxpool")


def test_merge_visual_tokens_hand_values():
  embeds = jnp.zeros((1, 6, 1))
  is_visual = jnp.array([[False, True, False, True, True, False]])
  visual = jnp.array([[[10.0], [20.0], [30.0]]])
  out = np.asarray(merge_visual_tokens(embeds, visual, is_visual))[0, :, 0]
  np.testing.assert_array_equal(out, [0, 10, 0, 20, 30, 0])


@pytest.fixture(scope="module")
def tiny_model():
  cfg = preset("tiny")
  return cfg, Kangaroo(cfg, rngs=nnx.Rngs(0))


def _video(cfg, frames=4, batch=2):
  rng = np.random.default_rng(1)
  size = cfg.vision.image_size
  return (jnp.asarray(rng.normal(size=(batch, frames, size, size, 3)).astype(np.float32)),
          jnp.asarray(np.tile(np.arange(frames, dtype=np.float32), (batch, 1))))


def test_model_places_visual_tokens_at_placeholders(tiny_model):
  cfg, model = tiny_model
  frames, ts = _video(cfg)
  n_vis = model.num_visual_tokens(4, cfg.vision.image_size, cfg.vision.image_size)
  text = np.random.default_rng(2).integers(0, cfg.llm.vocab_size, (2, 10))
  ids = np.concatenate([text[:, :3], np.full((2, n_vis), cfg.visual_token_id), text[:, 3:]], axis=1)
  logits = np.asarray(model(jnp.asarray(ids), frames, ts))
  visual = model.encode_frames(frames, ts)
  embeds = model.llm.model.embed(jnp.asarray(np.where(ids < 0, 0, ids)))
  embeds = embeds.at[:, 3:3 + n_vis].set(visual)
  expected = np.asarray(model.llm(inputs_embeds=embeds))
  assert max_rel_error(logits, expected) <= 1e-6
  # Text-only input is plain Llama.
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(text))), np.asarray(model.llm(jnp.asarray(text))),
                             rtol=1e-6)


def test_placeholder_count_mismatch_is_a_clear_error(tiny_model):
  cfg, model = tiny_model
  frames, ts = _video(cfg)
  n_vis = model.num_visual_tokens(4, cfg.vision.image_size, cfg.vision.image_size)
  ids = np.concatenate([np.full((2, n_vis), cfg.visual_token_id), np.ones((2, 4), int)], axis=1)
  ids[1, 0] = 5  # row 1 has one placeholder too few
  with pytest.raises(ValueError, match=rf"row 1: {n_vis - 1} placeholders vs {n_vis} visual tokens"):
    model(jnp.asarray(ids), frames, ts)
  with pytest.raises(ValueError, match="no frames were given"):
    model(jnp.asarray(ids))
