"""Prompt layout (contract section 1): exact token layout, placeholder counts, assistant-only loss mask."""

import numpy as np
import pytest

from data_helpers import tiny_tokenizer
from kangaroo_jax.config import tiny
from kangaroo_jax.data.prompt import PromptError, VideoMarkers, encode_conversation

V = -200


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _expect(tok, parts):
  """parts: list of (str | int count of placeholders, masked) -> (ids, mask)."""
  ids, mask = [tok.bos_id], [False]
  for p, m in parts:
    new = [V] * p if isinstance(p, int) else tok.encode(p)
    ids += new
    mask += [m] * len(new)
  return np.asarray(ids, np.int32), np.asarray(mask)


def test_tiny_tokenizer_specials_are_single_ids(tok):
  for s, want in (("<|begin_of_text|>", 1), ("<|end_of_text|>", 2), ("<|eot_id|>", 3)):
    assert tok.encode(s) == [want]
  assert tok.bos_id == 1 and tok.eos_id == 2 and tok.stop_ids == (2, 3)
  cfg = tiny()
  assert cfg.llm.bos_token_id == tok.bos_id and tok.vocab_size <= cfg.llm.vocab_size


def test_single_turn_exact_layout(tok):
  msgs = [{"role": "user", "content": "<video>What is it?"}, {"role": "assistant", "content": "A cat."}]
  enc = encode_conversation(tok, msgs, num_groups=2, tokens_per_group=3, visual_token_id=V)
  ids, mask = _expect(
      tok,
      [
          ("<|start_header_id|>user<|end_header_id|>\n\n<vi_start>", False),
          (3, False),
          ("<eof>", False),
          (3, False),
          ("<eov><vi_end>\nWhat is it?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
          ("A cat.<|eot_id|>", True),
      ],
  )
  np.testing.assert_array_equal(enc.input_ids, ids)
  np.testing.assert_array_equal(enc.loss_mask, mask)
  assert enc.input_ids.dtype == np.int32 and enc.loss_mask.dtype == np.bool_
  assert enc.num_placeholders == 6
  text = tok.decode([i for i in enc.input_ids if i >= 0])
  assert text == (
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<vi_start><eof><eov><vi_end>\n"
      "What is it?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
  )
  assert tok.decode(enc.input_ids[enc.loss_mask]) == "A cat.<|eot_id|>"


def test_multi_turn_with_system_and_generation_prompt(tok):
  msgs = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Look: <video>Why?"},
      {"role": "assistant", "content": "Because."},
      {"role": "user", "content": "How many?"},
      {"role": "assistant", "content": "Two."},
      {"role": "user", "content": "And now?"},
  ]
  enc = encode_conversation(tok, msgs, num_groups=3, tokens_per_group=4, visual_token_id=V, add_generation_prompt=True)
  ids, mask = _expect(
      tok,
      [
          (
              "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nLook: <vi_start>",
              False,
          ),
          (4, False),
          ("<eof>", False),
          (4, False),
          ("<eof>", False),
          (4, False),
          ("<eov><vi_end>\nWhy?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
          ("Because.<|eot_id|>", True),
          (
              "<|start_header_id|>user<|end_header_id|>\n\nHow many?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
              False,
          ),
          ("Two.<|eot_id|>", True),
          (
              "<|start_header_id|>user<|end_header_id|>\n\nAnd now?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
              False,
          ),
      ],
  )
  np.testing.assert_array_equal(enc.input_ids, ids)
  np.testing.assert_array_equal(enc.loss_mask, mask)
  assert tok.decode(enc.input_ids[enc.loss_mask]) == "Because.<|eot_id|>Two.<|eot_id|>"
  assert enc.num_placeholders == 12 == 3 * 4
  # The system keyword gives the same ids as a leading system message.
  enc2 = encode_conversation(
      tok, msgs[1:], num_groups=3, tokens_per_group=4, visual_token_id=V, system="Be brief.", add_generation_prompt=True
  )
  np.testing.assert_array_equal(enc2.input_ids, enc.input_ids)


@pytest.mark.parametrize("frames,h,w", [(2, 56, 56), (6, 56, 56), (4, 56, 112)])
def test_placeholders_match_model_visual_tokens(tok, frames, h, w):
  cfg = tiny()
  gh, gw = cfg.vision.grid_for(h, w)
  tpg = cfg.projector.tokens_per_group(gh, gw)
  groups = frames // cfg.projector.frames_per_group
  enc = encode_conversation(
      tok,
      [{"role": "user", "content": "<video>Hi"}],
      num_groups=groups,
      tokens_per_group=tpg,
      visual_token_id=cfg.visual_token_id,
  )
  from kangaroo_jax.models.kangaroo import check_visual_placeholders

  want = groups * tpg
  assert enc.num_placeholders == want
  check_visual_placeholders(enc.input_ids[None], want, cfg.visual_token_id)


def test_custom_markers_and_text_only(tok):
  m = VideoMarkers(video="[VID]", start="S", end="E", frame_group_end="F", video_end="G")
  enc = encode_conversation(
      tok, [{"role": "user", "content": "[VID]x"}], num_groups=2, tokens_per_group=1, visual_token_id=V, markers=m
  )
  ids, _ = _expect(
      tok,
      [
          ("<|start_header_id|>user<|end_header_id|>\n\nS", False),
          (1, False),
          ("F", False),
          (1, False),
          ("GE\nx<|eot_id|>", False),
      ],
  )
  np.testing.assert_array_equal(enc.input_ids, ids)
  text = encode_conversation(
      tok, [{"role": "user", "content": "hi"}], num_groups=0, tokens_per_group=1, visual_token_id=V
  )
  assert text.num_placeholders == 0 and not text.loss_mask.any()


@pytest.mark.parametrize(
    "msgs,groups,match",
    [
        ([{"role": "user", "content": "no marker"}], 2, "expected exactly one"),
        ([{"role": "user", "content": "<video><video>"}], 2, "found 2"),
        ([{"role": "user", "content": "<video>"}], 0, "expected none"),
        ([{"role": "bot", "content": "x"}], 0, "role 'bot'"),
        ([{"role": "user"}], 0, "message 0 must be a dict"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<video>"}], 1, "only appear in a user"),
        ([], 0, "non-empty"),
    ],
)
def test_bad_conversations_are_named(tok, msgs, groups, match):
  with pytest.raises(PromptError, match=match):
    encode_conversation(tok, msgs, num_groups=groups, tokens_per_group=2, visual_token_id=V)
