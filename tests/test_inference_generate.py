"""KV-cache generation (kangaroo_jax.inference.Engine) against full-sequence forwards and transformers."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import kangaroo_jax
from kangaroo_jax.inference import Engine, SamplingConfig, filter_logits, sample
from kangaroo_jax.models import Kangaroo, LlamaForCausalLM
from kangaroo_jax.parallel.mesh import MeshConfig, make_mesh
from kangaroo_jax.run_options import RunOptions
from tests.test_llama_parity import _pair

H = W = 56
F = 4
LENGTHS = (5, 23, 40)  # with prefill_chunk=16: one, two and three prefill chunks


def _prompts(vocab, lengths=LENGTHS, seed=0):
  rs = np.random.RandomState(seed)
  return [rs.randint(3, vocab, size=n).tolist() for n in lengths]


def _check_greedy_steps(forward, prompts, tokens):
  """Every generated token is the argmax of a full forward over prompt + tokens so far."""
  for r, (p, toks) in enumerate(zip(prompts, tokens)):
    seq = list(p) + list(toks)
    logits = np.asarray(forward(r, np.array([seq], np.int32)))[0]
    want = logits[len(p) - 1 : len(seq) - 1].argmax(-1)
    np.testing.assert_array_equal(np.asarray(toks), want, err_msg=f"row {r}")


@pytest.fixture(scope="module")
def llm():
  return LlamaForCausalLM(kangaroo_jax.preset("tiny").llm, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def engine(llm):
  return Engine(llm, prefill_chunk=16)  # shared, so its compiled steps are reused across tests


def test_greedy_cache_equals_full_forward_text(llm, engine):
  eng = engine
  prompts = _prompts(llm.model.cfg.vocab_size)
  gen = eng.generate(prompts, max_new_tokens=10)
  assert [len(t) for t in gen.tokens] == [10, 10, 10]
  _check_greedy_steps(lambda r, ids: llm(ids), prompts, gen.tokens)
  # The cache holds exactly prompt + fed-back tokens, per row.
  assert np.asarray(gen.cache.lengths).tolist() == [len(p) + 9 for p in prompts]
  assert [len(c) for c in gen.cache_ids] == [len(p) + 9 for p in prompts]


def test_greedy_cache_equals_full_forward_video():
  model = Kangaroo(kangaroo_jax.preset("tiny"), rngs=nnx.Rngs(0))
  cfg = model.cfg
  n_vis = model.num_visual_tokens(F, H, W)
  rs = np.random.RandomState(1)
  texts = _prompts(cfg.llm.vocab_size, lengths=(3, 11, 30), seed=2)
  # Text, the visual placeholders, more text: rows differ in length by their text only.
  prompts = [t[:2] + [cfg.visual_token_id] * n_vis + t[2:] for t in texts]
  frames = rs.normal(size=(3, F, H, W, 3)).astype(np.float32)
  ts = np.sort(rs.uniform(0, 20, size=(3, F)), axis=1).astype(np.float32)
  eng = Engine(model, prefill_chunk=16)
  gen = eng.generate(prompts, frames=frames, timestamps=ts, max_new_tokens=8)
  _check_greedy_steps(lambda r, ids: model(ids, frames[r : r + 1], ts[r : r + 1]), prompts, gen.tokens)


def test_greedy_matches_transformers_generate():
  ours, hf, cfg = _pair(seed=5)
  prompts = _prompts(cfg.vocab_size, lengths=(7, 19, 33), seed=3)
  gen = Engine(ours, prefill_chunk=16).generate(prompts, max_new_tokens=12)
  for p, toks in zip(prompts, gen.tokens):
    with torch.no_grad():
      out = hf.generate(
          torch.tensor([p]),
          attention_mask=torch.ones(1, len(p), dtype=torch.long),
          max_new_tokens=12,
          min_new_tokens=12,
          do_sample=False,
          pad_token_id=0,
      )
    assert out[0, len(p) :].tolist() == toks


def test_decode_compiles_once_per_bucket(llm):
  eng = Engine(llm, prefill_chunk=16)
  vocab = llm.model.cfg.vocab_size
  eng.generate(_prompts(vocab), max_new_tokens=30)
  assert eng.trace_counts["decode"] == 1
  assert eng._decode_step._cache_size() == 1
  # Other prompt lengths and another generation length in the same cache bucket: nothing recompiles.
  eng.generate(_prompts(vocab, lengths=(9, 2, 31), seed=4), max_new_tokens=20)
  assert eng.trace_counts["decode"] == 1 and eng._decode_step._cache_size() == 1
  assert eng.trace_counts["prefill"] == 1
  # A context that needs the next bucket compiles exactly one more decode step.
  eng.generate(_prompts(vocab, lengths=(200,)), max_new_tokens=3)
  assert eng.trace_counts["decode"] == 2


def test_stop_ids_and_max_new_tokens(llm, engine):
  eng = engine
  prompts = _prompts(llm.model.cfg.vocab_size)
  free = eng.generate(prompts, max_new_tokens=10).tokens
  stop = free[1][4]
  first = free[1].index(stop)
  gen = eng.generate(prompts, max_new_tokens=10, stop_ids=[stop])
  assert gen.tokens[1] == free[1][:first] and gen.stopped[1]
  for r in (0, 2):  # rows that never meet the stop id run to max_new_tokens, unaffected by row 1
    if stop not in free[r]:
      assert gen.tokens[r] == free[r] and not gen.stopped[r]
  assert [len(t) for t in eng.generate(prompts, max_new_tokens=3).tokens] == [3, 3, 3]


def test_sampling_seeded_and_filters(llm, engine):
  eng = engine
  prompts = _prompts(llm.model.cfg.vocab_size)
  hot = SamplingConfig(do_sample=True, temperature=1.5, top_p=0.95, top_k=50)
  a = eng.generate(prompts, max_new_tokens=12, sampling=hot, seed=7).tokens
  assert a == eng.generate(prompts, max_new_tokens=12, sampling=hot, seed=7).tokens
  assert a != eng.generate(prompts, max_new_tokens=12, sampling=hot, seed=8).tokens
  greedy = eng.generate(prompts, max_new_tokens=12).tokens
  assert a != greedy
  # A tiny top_p leaves only the argmax: sampling then equals greedy.
  only_top = SamplingConfig(do_sample=True, temperature=0.7, top_p=1e-6)
  assert eng.generate(prompts, max_new_tokens=12, sampling=only_top, seed=3).tokens == greedy


def test_filter_logits_hand_values():
  probs = np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)
  logits = jax.numpy.log(probs)
  kept = lambda cfg: np.isfinite(np.asarray(filter_logits(logits, cfg)))[0].tolist()  # noqa: E731
  assert kept(SamplingConfig(do_sample=True, top_p=0.8)) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
  assert kept(SamplingConfig(do_sample=True, top_p=0.81)) == [True, True, True, False]
  assert kept(SamplingConfig(do_sample=True, top_k=3)) == [True, True, True, False]
  assert kept(SamplingConfig(do_sample=True, top_k=3, top_p=0.5)) == [True, False, False, False]
  # Empirical frequencies follow the renormalised distribution (temperature 1, top-k 2).
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = np.asarray(jax.vmap(lambda k: sample(logits, k, SamplingConfig(do_sample=True, top_k=2)))(keys))[:, 0]
  assert set(draws.tolist()) == {0, 1}
  assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)


def test_context_parallel_generation_matches_single_device():
  """Under a mesh whose `context` axis splits the cache (and prefill chunks), the tokens are unchanged."""
  cfg = kangaroo_jax.preset("tiny").llm
  ref_model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  prompts = _prompts(cfg.vocab_size, lengths=(37,))
  want = Engine(ref_model, prefill_chunk=16).generate(prompts, max_new_tokens=6).tokens
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, context=4, tensor=2))
  with jax.set_mesh(mesh):
    model = LlamaForCausalLM(cfg, RunOptions(attention_impl="ring"), rngs=nnx.Rngs(0))
    gen = Engine(model, prefill_chunk=16).generate(prompts, max_new_tokens=6)
    assert "context" in str(gen.cache.k.sharding.spec)
  assert gen.tokens == want
