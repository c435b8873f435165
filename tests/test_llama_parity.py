"""Llama decoder vs transformers' LlamaForCausalLM on tiny random configs (float32, CPU)."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from kangaroo_jax.config import LlamaConfig, RopeScaling
from kangaroo_jax.models import LlamaForCausalLM
from tests.helpers import max_rel_error, torch_state_numpy
from tools.convert_weights.assemble import load_released_tensors
from tools.convert_weights.hf_config import transformers_llama_config

TOL = 1e-4


def _configs(rope_scaling: RopeScaling | None):
  ours = LlamaConfig(
      vocab_size=211,
      hidden_size=48,
      intermediate_size=112,
      num_layers=3,
      num_heads=6,
      num_kv_heads=2,
      head_dim=8,
      rope_theta=500000.0,
      rope_scaling=rope_scaling,
      max_position_embeddings=4096,
      rms_norm_eps=1e-5,
  )
  hf = transformers_llama_config(ours, attn_implementation="eager")
  return ours, hf


def _pair(rope_scaling=None, seed=0):
  ours_cfg, hf_cfg = _configs(rope_scaling)
  torch.manual_seed(seed)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  # Random norm scales too, so a mis-mapped norm weight cannot hide behind all-ones.
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  ours = LlamaForCausalLM(ours_cfg, rngs=nnx.Rngs(1))
  report = load_released_tensors(ours, torch_state_numpy(hf), prefix=("llm",))
  assert report.mapped == 3 + ours_cfg.num_layers * 9
  return ours, hf, ours_cfg


@pytest.mark.parametrize(
    "rope_scaling",
    [None, RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)],
    ids=["plain", "llama3_scaling"],
)
def test_logits_match_transformers_text_only(rope_scaling):
  ours, hf, cfg = _pair(rope_scaling)
  # Long enough (300 > 64 original positions) that llama3 scaling changes the result.
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(2, 300))
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids)).logits.numpy()
  got = np.asarray(ours(ids))
  err = max_rel_error(got, ref)
  print(f"llama parity ({'scaled' if rope_scaling else 'plain'}): max rel err {err:.2e}")
  assert err <= TOL


def test_logits_match_transformers_inputs_embeds():
  ours, hf, cfg = _pair(seed=3)
  embeds = np.random.RandomState(1).normal(size=(2, 37, cfg.hidden_size)).astype(np.float32)
  with torch.no_grad():
    ref = hf(inputs_embeds=torch.from_numpy(embeds)).logits.numpy()
  got = np.asarray(ours(inputs_embeds=embeds))
  err = max_rel_error(got, ref)
  print(f"llama parity (inputs_embeds): max rel err {err:.2e}")
  assert err <= TOL


def test_rope_scaling_changes_logits():
  """Guards the scaled test above against testing nothing: scaling must matter at this length."""
  scaled, _, cfg = _pair(RopeScaling(original_max_position_embeddings=64))
  plain = LlamaForCausalLM(_configs(None)[0], rngs=nnx.Rngs(1))
  nnx.update(plain, nnx.state(scaled, nnx.Param))
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(1, 300))
  assert max_rel_error(np.asarray(scaled(ids)), np.asarray(plain(ids))) > 1e-3


def test_positions_and_segments_match_separate_sequences():
  """Two packed samples with restarted positions and segment ids == each run on its own."""
  ours, _, cfg = _pair(seed=5)
  rng = np.random.RandomState(2)
  a, b = rng.randint(0, cfg.vocab_size, size=(1, 9)), rng.randint(0, cfg.vocab_size, size=(1, 6))
  packed = np.concatenate([a, b], axis=1)
  positions = np.concatenate([np.arange(9), np.arange(6)])[None]
  segments = np.concatenate([np.ones(9, int), np.full(6, 2)])[None]
  got = np.asarray(ours(packed, positions=positions, segment_ids=segments))
  alone = np.concatenate([np.asarray(ours(a)), np.asarray(ours(b))], axis=1)
  assert max_rel_error(got, alone) <= 1e-5
