"""Re-renders a harness's multiple-choice prompt with a benchmark recipe's template.

An lmms-eval task hands the model one finished text: its own pre-prompt, the question, lettered option lines
("A. text" or "(A) text") and its answer instruction. With `recipe=NAME` the plugin keeps the question and
the options and lays them out as `Recipe.format_prompt` does, so the lmms-eval plugin and
`python -m kangaroo_jax.evaluate --recipe NAME` send the model the same text for the same item:
  * the last line before the option block (an "Options:" / "Option:" header skipped) is the question, a
    "Question:" prefix removed; lmms-eval's video tasks put their own instruction (pre-prompt) on the lines
    above it, and those give way to the recipe's pre_prompt. `render` says how many lines it dropped, so the
    caller can count items whose task text held more than an instruction there (e.g. subtitles);
  * the lines after the option block (the task's answer instruction) give way to the recipe's post_prompt.
A text without at least two consecutive option lines lettered from A is passed through unchanged (and
counted by the caller), because there is nothing to re-letter.
"""

from __future__ import annotations

import re

_OPTION = re.compile(r"^\s*\(?([A-Z])\s*[\.\):]\s*(.*\S)\s*$")
_HEADER = re.compile(r"^\s*(options?|choices)\s*:?\s*$", re.IGNORECASE)
_QUESTION_PREFIX = re.compile(r"^\s*question\s*:\s*", re.IGNORECASE)


def split_options(text: str) -> tuple[list[str], list[str]] | None:
  """(the non-empty lines before the options, option texts without letters) of a lettered prompt, or None."""
  lines = text.split("\n")
  for start, line in enumerate(lines):
    m = _OPTION.match(line)
    if not (m and m.group(1) == "A"):
      continue
    options = []
    for follow in lines[start:]:
      m = _OPTION.match(follow)
      if not (m and m.group(1) == chr(ord("A") + len(options))):
        break
      options.append(m.group(2))
    if len(options) < 2:
      continue
    before = [ln.strip() for ln in lines[:start] if ln.strip()]
    if before and _HEADER.match(before[-1]):
      before = before[:-1]
    if not before:
      continue
    return before, options
  return None


def render(recipe, text: str) -> tuple[str, bool, int]:
  """(the prompt in the recipe's template, True, lines of task text dropped before the question), or
  (text unchanged, False, 0) when it lists no lettered options after a question."""
  parsed = split_options(text)
  if parsed is None:
    return text, False, 0
  before, options = parsed
  question = _QUESTION_PREFIX.sub("", before[-1], count=1)
  return recipe.format_prompt(question, options), True, len(before) - 1
