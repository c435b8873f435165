"""The assembled model: visual tokens land on the placeholders, in order (tiny preset, float32, CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kangaroo_jax
from kangaroo_jax.models import Kangaroo, merge_visual_tokens
from tests.helpers import max_rel_error

TOL = 1e-5
H = W = 56  # tiny preset: 4x4 patch grid -> 4 tokens per frame pair
F = 4


@pytest.fixture(scope="module")
def model():
  return Kangaroo(kangaroo_jax.preset("tiny"), rngs=nnx.Rngs(0))


def _prompt(cfg, n_vis, prefix=(1, 17, 33), suffix=(40, 41, 42, 2), vocab_seed=0):
  """[bos/text..., n_vis placeholders split into two runs with text between, text...]."""
  half = n_vis // 2
  ids = list(prefix) + [cfg.visual_token_id] * half + [77, 78] + [cfg.visual_token_id] * (n_vis - half)
  return ids + list(suffix)


def _inputs(model, batch=2, seed=0):
  cfg = model.cfg
  n_vis = model.num_visual_tokens(F, H, W)
  ids = np.array([_prompt(cfg, n_vis, prefix=(1, 17 + r, 33)) for r in range(batch)], np.int32)
  rs = np.random.RandomState(seed)
  frames = rs.normal(size=(batch, F, H, W, 3)).astype(np.float32)
  ts = np.sort(rs.uniform(0, 30, size=(batch, F)), axis=1).astype(np.float32)
  return ids, frames, ts


def test_merge_visual_tokens_hand_values():
  d = 3
  tok = np.arange(2 * 7 * d, dtype=np.float32).reshape(2, 7, d)
  vis = -1.0 - np.arange(2 * 3 * d, dtype=np.float32).reshape(2, 3, d)
  is_vis = np.zeros((2, 7), bool)
  is_vis[0, [1, 4, 6]] = True  # scattered
  is_vis[1, [0, 1, 2]] = True  # contiguous at the start
  out = np.asarray(merge_visual_tokens(jnp.asarray(tok), jnp.asarray(vis), jnp.asarray(is_vis)))
  want = tok.copy()
  want[0, 1], want[0, 4], want[0, 6] = vis[0, 0], vis[0, 1], vis[0, 2]
  want[1, 0], want[1, 1], want[1, 2] = vis[1, 0], vis[1, 1], vis[1, 2]
  np.testing.assert_array_equal(out, want)


def test_num_visual_tokens(model):
  assert model.visual_tokens_per_frame_group(H, W) == 4
  assert model.num_visual_tokens(F, H, W) == 8


def test_full_model_equals_manual_embedding(model):
  cfg = model.cfg
  ids, frames, ts = _inputs(model)
  logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(frames), jnp.asarray(ts)))
  assert logits.shape == (ids.shape[0], ids.shape[1], cfg.llm.vocab_size)
  assert np.all(np.isfinite(logits))

  visual = np.asarray(model.encode_frames(jnp.asarray(frames), jnp.asarray(ts)))
  assert visual.shape == (ids.shape[0], 8, cfg.llm.hidden_size)
  table = np.asarray(model.llm.model.embed_tokens.embedding[...])
  embeds = np.zeros((*ids.shape, cfg.llm.hidden_size), np.float32)
  for b in range(ids.shape[0]):
    k = 0
    for i, t in enumerate(ids[b]):
      if t == cfg.visual_token_id:
        embeds[b, i] = visual[b, k]
        k += 1
      else:
        embeds[b, i] = table[t]
    assert k == visual.shape[1]
  ref = np.asarray(model.llm(inputs_embeds=jnp.asarray(embeds)))
  err = max_rel_error(logits, ref)
  print(f"kangaroo vs manual embedding: max rel err {err:.2e}")
  assert err <= TOL


def test_text_only_equals_llm(model):
  ids = np.random.RandomState(3).randint(0, model.cfg.llm.vocab_size, size=(2, 11)).astype(np.int32)
  got = np.asarray(model(jnp.asarray(ids)))
  ref = np.asarray(model.llm(jnp.asarray(ids)))
  assert got.shape == (2, 11, model.cfg.llm.vocab_size)
  assert max_rel_error(got, ref) <= TOL


@pytest.mark.parametrize("delta", [-1, +1], ids=["one_too_few", "one_too_many"])
def test_placeholder_count_mismatch(model, delta):
  cfg = model.cfg
  n_vis = model.num_visual_tokens(F, H, W)
  _, frames, ts = _inputs(model)
  good = _prompt(cfg, n_vis)
  bad = _prompt(cfg, n_vis + delta)
  bad = bad + [5] * (len(good) - len(bad)) if len(bad) < len(good) else bad
  good = good + [5] * (len(bad) - len(good))
  ids = np.array([good, bad], np.int32)
  with pytest.raises(ValueError, match=rf"row 1: {n_vis + delta} placeholders vs {n_vis} visual tokens") as e:
    model(jnp.asarray(ids), jnp.asarray(frames), jnp.asarray(ts))
  assert "row 0" not in str(e.value)


def test_placeholders_without_frames(model):
  ids, _, _ = _inputs(model)
  with pytest.raises(ValueError, match="no frames"):
    model(jnp.asarray(ids))


def test_changing_a_frame_only_affects_later_positions(model):
  """Frame 3 belongs to the second frame group: logits before that group's first placeholder are
  unchanged (causal LLM, per-frame ViT), logits from it on change."""
  ids, frames, ts = _inputs(model, batch=1, seed=5)
  base = np.asarray(model(jnp.asarray(ids), jnp.asarray(frames), jnp.asarray(ts)))
  frames2 = frames.copy()
  frames2[0, 3] += np.random.RandomState(9).normal(size=frames2[0, 3].shape).astype(np.float32)
  moved = np.asarray(model(jnp.asarray(ids), jnp.asarray(frames2), jnp.asarray(ts)))
  vis_pos = np.nonzero(ids[0] == model.cfg.visual_token_id)[0]
  first = vis_pos[model.visual_tokens_per_frame_group(H, W)]  # first token of group 1
  np.testing.assert_allclose(moved[0, :first], base[0, :first], rtol=1e-5, atol=1e-5)
  assert np.all(np.max(np.abs(moved[0, first:] - base[0, first:]), axis=-1) > 1e-6)
