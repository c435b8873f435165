"""Stage 6 trains 135k positions: its RoPE base and position limit are raised, and export/import carry them."""

import dataclasses

from configs.stage6_long_video import get_config
from kangaroo_jax.config import kangaroo_8b
from tools.convert_weights.hf_config import hf_from_llama, llama_from_hf
from train.config import from_configdict


def _stage6():
  c = get_config("mode=full")
  c.data.source = "synthetic"  # the shapes matter here, not the records
  return from_configdict(c)


def test_stage6_raises_rope_theta_and_positions_to_its_length():
  cfg = _stage6()
  assert cfg.model.llm.rope_theta == 1e7 > kangaroo_8b().llm.rope_theta
  assert cfg.model.llm.max_position_embeddings == cfg.data.seq_len == 135168
  assert cfg.model.vision_chunk_frames == 1024
  assert (cfg.data.batch_size * cfg.data.max_frames) % cfg.model.vision_chunk_frames == 0


def test_export_and_import_carry_the_long_context_rope():
  llm = _stage6().model.llm
  hf = hf_from_llama(llm, "bfloat16")
  assert hf["rope_theta"] == 1e7 and hf["max_position_embeddings"] == 135168
  back = llama_from_hf(hf, kangaroo_8b().llm)
  assert back.rope_theta == llm.rope_theta and back.max_position_embeddings == llm.max_position_embeddings
  assert dataclasses.replace(back, eos_token_ids=llm.eos_token_ids) == llm
