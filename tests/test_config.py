"""Presets: released parameter counts and shapes (abstract init), validation, dict round trip."""

import dataclasses
import json
import math

import jax
import pytest
from flax import nnx

import kangaroo_jax
from kangaroo_jax.config import (ConfigError, KangarooConfig, LlamaConfig, ProjectorConfig, RopeScaling,
                                 VisionConfig)
from kangaroo_jax.models import Kangaroo


def _num_params(module) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.fixture(scope="module")
def abstract_8b():
  cfg = kangaroo_jax.preset("kangaroo-8b")
  return nnx.eval_shape(lambda: Kangaroo(cfg, rngs=nnx.Rngs(0)))


def test_8b_parameter_counts(abstract_8b):
  m = abstract_8b
  assert _num_params(m.llm) == 8_030_261_248
  assert _num_params(m.vision_tower) == 304_104_384
  assert _num_params(m.mm_projector) == 20_979_712  # 1024*4096 + 4096 + 4096*4096 + 4096
  assert _num_params(m.patchify) == 0  # avg patchify + sinusoidal TPE


def test_8b_key_shapes(abstract_8b):
  m = abstract_8b
  layers = m.llm.model.layers
  assert layers.self_attn.q_proj.kernel.shape == (32, 4096, 4096)
  assert layers.self_attn.k_proj.kernel.shape == (32, 4096, 1024)
  assert layers.self_attn.v_proj.kernel.shape == (32, 4096, 1024)
  assert layers.mlp.gate_proj.kernel.shape == (32, 4096, 14336)
  assert m.llm.model.embed_tokens.embedding.shape == (128256, 4096)
  assert m.llm.lm_head.kernel.shape == (4096, 128256)
  assert m.vision_tower.pos_embed.shape == (1025, 1024)
  assert m.vision_tower.patch_embed_kernel.shape == (14, 14, 3, 1024)
  assert m.mm_projector.linear_1.kernel.shape == (1024, 4096)
  assert m.mm_projector.linear_2.kernel.shape == (4096, 4096)


@pytest.mark.parametrize("build, field", [
    (lambda: LlamaConfig(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (lambda: VisionConfig(width=1000, head_width=64), "head_width"),
    (lambda: VisionConfig(feature_tap="middle"), "feature_tap"),
    (lambda: KangarooConfig(visual_token_id=0), "visual_token_id"),
    (lambda: KangarooConfig(visual_token_id=5), "visual_token_id"),
    (lambda: ProjectorConfig(patchify="maxpool"), "patchify"),
    (lambda: KangarooConfig(attention_block=0), "attention_block"),
], ids=["kv_heads", "vision_head_width", "feature_tap", "visual_id_zero", "visual_id_positive", "patchify",
        "attention_block"])
def test_invalid_config_names_field(build, field):
  with pytest.raises(ConfigError, match=field):
    build()


def test_unknown_preset():
  with pytest.raises(ConfigError, match="kangaroo-70b"):
    kangaroo_jax.preset("kangaroo-70b")


def test_grid_for_rejects_non_multiple_frames():
  v = VisionConfig()
  assert v.grid_for(448, 224) == (32, 16)
  with pytest.raises(ConfigError, match="height 450.*patch_size"):
    v.grid_for(450, 448)
  with pytest.raises(ConfigError, match="width 100.*patch_size"):
    v.grid_for(448, 100)


@pytest.mark.parametrize("name", ["tiny", "kangaroo-8b"])
@pytest.mark.parametrize("scaled", [False, True], ids=["no_rope_scaling", "rope_scaling"])
def test_dict_round_trip(name, scaled):
  cfg = kangaroo_jax.preset(name)
  if scaled:
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, rope_scaling=RopeScaling(factor=4.0,
                                                                               original_max_position_embeddings=64)))
  back = KangarooConfig.from_dict(cfg.to_dict())
  assert back == cfg
  assert isinstance(back.llm.eos_token_ids, tuple)
  assert (back.llm.rope_scaling is not None) == scaled
  assert KangarooConfig.from_dict(json.loads(cfg.to_json())) == cfg  # JSON turns tuples into lists


def test_from_dict_unknown_key_is_named():
  d = kangaroo_jax.preset("tiny").to_dict()
  d["vision"]["patch_sz"] = 14
  with pytest.raises(ConfigError, match="vision.patch_sz"):
    KangarooConfig.from_dict(d)
  d = kangaroo_jax.preset("tiny").to_dict()
  d["bogus_top_level"] = 1
  with pytest.raises(ConfigError, match="bogus_top_level"):
    KangarooConfig.from_dict(d)
