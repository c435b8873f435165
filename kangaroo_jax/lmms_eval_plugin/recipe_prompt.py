"""Re-renders a harness's multiple-choice prompt with a benchmark recipe's template.

An lmms-eval task hands the model one finished text: its own pre-prompt, the question, lettered option lines
("A. text" or "(A) text") and its answer instruction. With `recipe=NAME` the plugin keeps the question and
the options and lays them out as `Recipe.format_prompt` does, so the lmms-eval plugin and
`python -m kangaroo_jax.evaluate --recipe NAME` send the model the same text for the same item:
  * the lines before the option block are the question (a leading copy of the recipe's pre_prompt, a
    "Question:" prefix and an "Options:" header line are dropped, since the recipe adds its own);
  * the lines after the option block (the task's answer instruction) give way to the recipe's post_prompt.
A text without at least two consecutive option lines lettered from A is passed through unchanged (and
counted by the caller), because there is nothing to re-letter.
"""

from __future__ import annotations

import re

_OPTION = re.compile(r"^\s*\(?([A-Z])\s*[\.\):]\s*(.*\S)\s*$")
_HEADER = re.compile(r"^\s*(options|choices)\s*:?\s*$", re.IGNORECASE)
_QUESTION_PREFIX = re.compile(r"^\s*question\s*:\s*", re.IGNORECASE)


def split_options(text: str) -> tuple[str, list[str]] | None:
  """(question text, option texts without letters) of a lettered multiple-choice prompt, or None."""
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
    before = [ln for ln in lines[:start] if ln.strip()]
    if before and _HEADER.match(before[-1]):
      before = before[:-1]
    return "\n".join(before).strip(), options
  return None


def render(recipe, text: str) -> tuple[str, bool]:
  """(the prompt in the recipe's template, True), or (text unchanged, False) when it lists no options."""
  parsed = split_options(text)
  if parsed is None:
    return text, False
  question, options = parsed
  if recipe.pre_prompt and question.startswith(recipe.pre_prompt):
    question = question[len(recipe.pre_prompt):].strip()
  question = _QUESTION_PREFIX.sub("", question, count=1)
  return recipe.format_prompt(question, options), True
