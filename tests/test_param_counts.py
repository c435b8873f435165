"""The kangaroo-8b preset has exactly the released parameter counts (abstract init, no memory)."""

import math

import jax
from flax import nnx

from kangaroo_jax.config import KangarooConfig, preset
from kangaroo_jax.models import Kangaroo


def _count(module) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_kangaroo_8b_parameter_counts():
  model = nnx.eval_shape(lambda: Kangaroo(preset("kangaroo-8b"), rngs=nnx.Rngs(0)))
  assert _count(model.llm) == 8_030_261_248
  assert _count(model.vision_tower) == 304_104_384  # without the CLIP head
  assert _count(model.mm_projector) == 20_979_712
  assert _count(model.patchify) == 0  # avg patchify + sinusoidal TPE carry no weights
  assert model.llm.model.layers.self_attn.k_proj.kernel.shape == (32, 4096, 1024)
  assert model.vision_tower.pos_embed.shape == (1025, 1024)
  assert model.vision_tower.blocks.mlp.w1.kernel.shape == (24, 1024, 2730)
  assert model.num_visual_tokens(64, 448, 448) == 64 * 128  # 256 tokens per frame pair


def test_config_json_round_trip():
  for name in ("tiny", "kangaroo-8b"):
    cfg = preset(name)
    assert KangarooConfig.from_dict(cfg.to_dict()) == cfg
