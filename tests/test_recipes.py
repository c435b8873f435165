"""Benchmark recipes: all five exist with even frame counts and greedy decoding, their prompts letter the
options as each benchmark's reference prompt does, and bad names / settings fail with one line."""

import json

import pytest

from kangaroo_jax.inference.mcq import MCItem, format_prompt
from kangaroo_jax.inference.recipes import RECIPES, Recipe, RecipeError, get_recipe

BENCHMARKS = ("mvbench", "videomme", "egoschema", "longvideobench", "mlvu")


def test_all_five_exist_even_frames_greedy():
  assert set(RECIPES) == set(BENCHMARKS) | {"videomme_subtitles"}  # Video-MME's two columns
  for name in RECIPES:
    r = get_recipe(name)
    assert r.name == name and r.num_frames == 64 and r.num_frames % 2 == 0
    assert r.do_sample is False and r.sampling == "uniform_segment_middle" and r.max_new_tokens >= 1
    assert r.why_frames  # each says why it keeps its frame count
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d and d["name"] == name and d["num_frames"] == 64


def test_names_are_forgiving_and_unknown_lists_valid():
  assert get_recipe("Video-MME") is RECIPES["videomme"]
  assert get_recipe("LongVideoBench") is RECIPES["longvideobench"]
  with pytest.raises(RecipeError) as e:
    get_recipe("nextqa")
  msg = str(e.value)
  assert "\n" not in msg and "nextqa" in msg and all(n in msg for n in BENCHMARKS)
  assert get_recipe("videomme-subtitles") is RECIPES["videomme_subtitles"]


def test_prompt_formats():
  q, opts = " How many cars? ", ["one", "two", "three", "four"]
  assert get_recipe("videomme").format_prompt(q, opts) == (
      "Select the best answer to the following multiple-choice question based on the video. Respond with only "
      "the letter (A, B, C, or D) of the correct option.\nHow many cars?\nA. one\nB. two\nC. three\nD. four\n"
      "The best answer is:"
  )
  assert get_recipe("mlvu").format_prompt(q, opts) == (
      "Question: How many cars?\nOptions:\n(A) one\n(B) two\n(C) three\n(D) four\nOnly give the best option.\n"
      "Best option: ("
  )
  five = ["a", "b", "c", "d", "e"]  # EgoSchema has five options
  assert get_recipe("egoschema").format_prompt("Why?", five).splitlines()[1:] == [
      "A. a",
      "B. b",
      "C. c",
      "D. d",
      "E. e",
      "Answer with the option's letter from the given choices directly.",
  ]
  # The MVBench recipe is the recipe-less default prompt of evaluate (mcq.format_prompt).
  item = MCItem("x", "t", "v.mp4", "How many cars?", tuple(opts), 1)
  assert get_recipe("mvbench").format_prompt(item.question, item.options) == format_prompt(item)


def test_subtitles_prompt():
  sub = get_recipe("videomme_subtitles")
  assert sub.subtitles and not get_recipe("videomme").subtitles
  text = sub.format_prompt("How many cars?", ["one", "two"], subtitles="hello\nworld")
  assert text == (
      "This video's subtitles are listed below:\nhello\nworld\nSelect the best answer to the following "
      "multiple-choice question based on the video and the subtitles. Respond with only the letter (A, B, "
      "C, or D) of the correct option.\nHow many cars?\nA. one\nB. two\nThe best answer is:"
  )
  assert sub.format_prompt("q?", ["a", "b"]).splitlines()[1] == "No subtitles available"  # no subtitle file
  assert sub.format_prompt("q?", ["a", "b"], subtitles="").splitlines()[1].startswith("Select")  # none at the frames
  with pytest.raises(RecipeError, match="takes no subtitles"):
    get_recipe("videomme").format_prompt("q?", ["a", "b"], subtitles="hello")


def test_bad_settings_fail_naming_the_field():
  base = RECIPES["mvbench"]
  for changes, field in (
      ({"num_frames": 63}, "num_frames"),
      ({"num_frames": 0}, "num_frames"),
      ({"max_new_tokens": 0}, "max_new_tokens"),
      ({"do_sample": True}, "do_sample"),
      ({"option_style": "roman"}, "option_style"),
      ({"sampling": "fps"}, "sampling"),
  ):
    with pytest.raises(RecipeError, match=field):
      base.replace(**changes)
  assert base.replace(num_frames=16).num_frames == 16 and base.num_frames == 64  # frozen: copies only
  with pytest.raises(Exception):
    base.num_frames = 8
  assert isinstance(base, Recipe)
