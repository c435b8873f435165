"""Bad config values fail at construction with the field's name."""

import pytest

from kangaroo_jax.config import ConfigError, KangarooConfig, LlamaConfig, VisionConfig, preset


@pytest.mark.parametrize("build,field", [
    (lambda: LlamaConfig(num_heads=6, num_kv_heads=4), "LlamaConfig.num_kv_heads"),
    (lambda: LlamaConfig(head_dim=7), "LlamaConfig.head_dim"),
    (lambda: LlamaConfig(hidden_size=0), "LlamaConfig.hidden_size"),
    (lambda: VisionConfig(width=100, head_width=64), "VisionConfig.head_width"),
    (lambda: VisionConfig(feature_tap="cls"), "VisionConfig.feature_tap"),
    (lambda: VisionConfig(image_size=450), "VisionConfig.image_size"),
    (lambda: KangarooConfig(visual_token_id=5), "KangarooConfig.visual_token_id"),
    (lambda: KangarooConfig(attention_impl="flash"), "KangarooConfig.attention_impl"),
    (lambda: KangarooConfig(remat_policy="sometimes"), "KangarooConfig.remat_policy"),
    (lambda: preset("kangaroo-70b"), "unknown preset"),
    (lambda: VisionConfig().grid_for(448, 450), "frame width 450 is not a multiple"),
    (lambda: KangarooConfig.from_dict({"llm": {"hidden": 3}}), r"unknown config key\(s\) \['llm.hidden'\]"),
])
def test_invalid_fields_are_named(build, field):
  with pytest.raises(ConfigError, match=field):
    build()
