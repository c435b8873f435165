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
  assert cfg.run.vision_chunk_frames == 1024 and cfg.run.compute_dtype == "bfloat16"
  assert cfg.run.attention_impl == "usp" and cfg.run.ulysses_degree == 2 and cfg.mesh.context == 16
  assert (cfg.data.batch_size * cfg.data.max_frames) % cfg.run.vision_chunk_frames == 0


def test_export_and_import_carry_the_long_context_rope():
  llm = _stage6().model.llm
  hf = hf_from_llama(llm, "bfloat16")
  assert hf["rope_theta"] == 1e7 and hf["max_position_embeddings"] == 135168
  back = llama_from_hf(hf, kangaroo_8b().llm)
  assert back.rope_theta == llm.rope_theta and back.max_position_embeddings == llm.max_position_embeddings
  assert dataclasses.replace(back, eos_token_ids=llm.eos_token_ids) == llm


def test_stage7_is_a_million_token_usp_row_over_the_whole_slice():
  from configs.stage7_million import get_config as stage7
  from kangaroo_jax.parallel.validate import validate_mesh_for_model

  c = stage7("mode=full")
  c.data.source = "synthetic"
  cfg = from_configdict(c)
  m, r, d = cfg.model, cfg.run, cfg.data
  assert d.max_frames == 8192 and d.batch_size == 1 and d.seq_len == 1_052_672 >= 8192 // 2 * 256
  assert r.attention_impl == "usp" and r.ulysses_degree == 8 and r.load_balance and r.remat_policy == "full"
  assert m.llm.rope_theta == 5e7 and m.llm.max_position_embeddings == d.seq_len
  assert (cfg.mesh.context, cfg.mesh.fsdp) == (-1, 1)
  assert (d.batch_size * d.max_frames) % r.vision_chunk_frames == 0
  for chips in (64, 128, 256):  # the row splits over any of these slices, zigzag included
    validate_mesh_for_model(m, r, {"context": chips}, batch=1, seq_len=d.seq_len, frames_per_row=d.max_frames)
