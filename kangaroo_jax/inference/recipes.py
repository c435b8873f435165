"""Benchmark recipes: the frame count, sampling rule, prompt and decoding settings of one benchmark, fixed.

    from kangaroo_jax.inference.recipes import get_recipe
    recipe = get_recipe("videomme")
    prompt = recipe.format_prompt("How many cars?", ["one", "two", "three", "four"])

`python -m kangaroo_jax.evaluate --recipe NAME` and the lmms-eval plugin read the same objects, so a score
comes with the exact settings that produced it (results files store `Recipe.to_dict()`).

The Kangaroo release never published its evaluation prompts. Each template here follows the benchmark's
own reference prompt where it has one (Video-MME's README), else the prompt lmms-eval uses for it, so
that scores are comparable with numbers produced by that harness. Options are given as plain texts (any
"A. " / "(A) " prefix already stripped, as kangaroo_jax.inference.mcq does) and lettered here. Video-MME
has two recipes, one per leaderboard column: videomme (frames only) and videomme_subtitles (the subtitle
lines shown at the sampled frames go before the question; format_prompt's `subtitles`).

Frame counts: 64 frames is the release's evaluation setting. None of these benchmarks' protocols fixes a
frame count for the model under test (each leaderboard lists models at their own count), so every recipe
keeps 64; the comment on each says what its videos are like. Sampling is always the release's uniform
rule (kangaroo_jax.data.video.sample_indices with num_frames: the middle frame of each of n equal
segments). A video with fewer frames than requested repeats frames under that rule; evaluate records
and counts such items rather than hiding it.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Sequence

LETTERS = string.ascii_uppercase
UNIFORM_SEGMENT_MIDDLE = "uniform_segment_middle"  # kangaroo_jax.data.video.sample_indices(num_frames=n)
SAMPLING_RULES = (UNIFORM_SEGMENT_MIDDLE,)
OPTION_STYLES = {"paren": "({letter}) {option}", "dot": "{letter}. {option}"}
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
NO_SUBTITLES = "No subtitles available"  # Video-MME's text for a video without a subtitle file


class RecipeError(ValueError):
  """An unknown recipe name or an invalid recipe setting (one line naming the field)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One benchmark's evaluation settings.

  The prompt is these lines, joined by newlines, empty ones left out:
    subtitles_intro, then the subtitle text (only for a recipe with subtitles_intro, e.g. Video-MME w/ subs)
    pre_prompt
    question_prefix + question
    options_header
    one line per option, in option_style ("paren": "(A) text", "dot": "A. text")
    post_prompt (the answer instruction)
  Decoding is greedy (do_sample False); max_new_tokens bounds the answer.
  """

  name: str
  benchmark: str
  num_frames: int
  max_new_tokens: int
  post_prompt: str
  pre_prompt: str = ""
  question_prefix: str = ""
  options_header: str = ""
  option_style: str = "dot"
  sampling: str = UNIFORM_SEGMENT_MIDDLE
  do_sample: bool = False
  subtitles_intro: str = ""
  why_frames: str = ""

  @property
  def subtitles(self) -> bool:
    """Whether the prompt carries the video's subtitle lines (at the sampled frames' times)."""
    return bool(self.subtitles_intro)

  def __post_init__(self):
    if not isinstance(self.num_frames, int) or self.num_frames < 2 or self.num_frames % 2:
      # Kangaroo's patchify groups frames in pairs, so an odd count would repeat the last frame silently.
      raise RecipeError(f"recipe {self.name!r}: num_frames must be an even integer >= 2, got {self.num_frames!r}")
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise RecipeError(f"recipe {self.name!r}: max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
    if self.option_style not in OPTION_STYLES:
      raise RecipeError(
          f"recipe {self.name!r}: option_style must be one of {sorted(OPTION_STYLES)}, " f"got {self.option_style!r}"
      )
    if self.sampling not in SAMPLING_RULES:
      raise RecipeError(f"recipe {self.name!r}: sampling must be one of {SAMPLING_RULES}, got {self.sampling!r}")
    if self.do_sample:
      raise RecipeError(f"recipe {self.name!r}: benchmark recipes decode greedily (do_sample=False)")

  def format_prompt(self, question: str, options: Sequence[str], subtitles: str | None = None) -> str:
    """The user turn for one item: question, lettered options (texts without letter prefixes), instruction.

    subtitles: the subtitle text for a recipe with `subtitles`: None when the video has no subtitle file
    (NO_SUBTITLES is said instead), "" when no line falls on the sampled frames. A recipe without subtitles
    refuses text rather than drop it.
    """
    if len(options) > len(LETTERS):
      raise RecipeError(f"recipe {self.name!r}: {len(options)} options; at most {len(LETTERS)} can be lettered")
    if subtitles and not self.subtitles:
      raise RecipeError(
          f"recipe {self.name!r} takes no subtitles; use a recipe with subtitles (e.g. " "videomme_subtitles)"
      )
    style = OPTION_STYLES[self.option_style]
    lines = [self.subtitles_intro, (NO_SUBTITLES if subtitles is None else subtitles) if self.subtitles else ""]
    lines += [self.pre_prompt, self.question_prefix + question.strip(), self.options_header]
    lines += [style.format(letter=LETTERS[i], option=o) for i, o in enumerate(options)]
    lines.append(self.post_prompt)
    return "\n".join(line for line in lines if line)

  def replace(self, **changes) -> "Recipe":
    """A copy with some settings changed (validated again), e.g. an explicit --num-frames."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    """Every setting, JSON-ready, as results files record it."""
    return dataclasses.asdict(self)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="mvbench",
            benchmark="MVBench",
            num_frames=64,
            max_new_tokens=16,
            question_prefix="Question: ",
            options_header="Options:",
            option_style="paren",
            post_prompt=LETTER_INSTRUCTION,
            # The 20 MVBench tasks are short clips (a few seconds to ~40 s; some are frame folders). VideoChat2's
            # 16 frames is that model's own setting, not a benchmark rule; clips shorter than 64 frames repeat
            # frames and are counted by evaluate.
            why_frames="release setting; MVBench fixes no frame count (VideoChat2's 16 is its own choice); "
            "clips under 64 frames are counted as short",
        ),
        Recipe(
            name="videomme",
            benchmark="Video-MME (w/o subtitles)",
            num_frames=64,
            max_new_tokens=16,
            # Video-MME's README gives this prompt for frames-only evaluation (its 'w/o subs' column).
            pre_prompt="Select the best answer to the following multiple-choice question based on the video. "
            "Respond with only the letter (A, B, C, or D) of the correct option.",
            option_style="dot",
            post_prompt="The best answer is:",
            why_frames="release setting; Video-MME lets each model choose (videos 11 s to 1 h)",
        ),
        Recipe(
            name="videomme_subtitles",
            benchmark="Video-MME (w/ subtitles)",
            num_frames=64,
            max_new_tokens=16,
            # The README's 'w/ subs' prompt. Its reference code keeps the subtitle lines shown at the sampled
            # frames; evaluate does the same with this recipe's own frames (--subtitle-root: <videoID>.srt files).
            subtitles_intro="This video's subtitles are listed below:",
            pre_prompt="Select the best answer to the following multiple-choice question based on the video and the "
            "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.",
            option_style="dot",
            post_prompt="The best answer is:",
            why_frames="release setting, as videomme; the subtitle lines follow the sampled frames",
        ),
        Recipe(
            name="egoschema",
            benchmark="EgoSchema (500-question subset with public answers)",
            num_frames=64,
            max_new_tokens=16,
            option_style="dot",
            post_prompt=LETTER_INSTRUCTION,
            # Five options per question; lmms-eval's egoschema_subset prompt (question, "A. ..." lines,
            # the letter instruction).
            why_frames="release setting; EgoSchema fixes no frame count (every clip is 3 min at 30 fps)",
        ),
        Recipe(
            name="longvideobench",
            benchmark="LongVideoBench (validation, frames only)",
            num_frames=64,
            max_new_tokens=32,
            option_style="dot",
            post_prompt=LETTER_INSTRUCTION,
            # lmms-eval's longvideobench_val_v prompt and its 32-token budget. The benchmark's interleaved
            # subtitles are not given (frames only).
            why_frames="release setting; LongVideoBench evaluates each model at its own maximum (videos up to 1 h)",
        ),
        Recipe(
            name="mlvu",
            benchmark="MLVU (dev, multiple-choice tasks)",
            num_frames=64,
            max_new_tokens=16,
            question_prefix="Question: ",
            options_header="Options:",
            option_style="paren",
            # MLVU's own evaluation ends the prompt with "Best option: (" so the answer starts with the letter;
            # lmms-eval's mlvu_dev keeps that ending.
            post_prompt="Only give the best option.\nBest option: (",
            why_frames="release setting; MLVU fixes no frame count (videos 3 min to 2 h)",
        ),
    )
}


# What evaluate uses without --recipe: the MVBench-style template of kangaroo_jax.inference.mcq.format_prompt
# (the same text) with evaluate's historical defaults. Not a benchmark recipe, so not in RECIPES.
DEFAULT = Recipe(
    name="default",
    benchmark="any (no --recipe)",
    num_frames=64,
    max_new_tokens=16,
    question_prefix="Question: ",
    options_header="Options:",
    option_style="paren",
    post_prompt=LETTER_INSTRUCTION,
    why_frames="release setting",
)


def get_recipe(name: str) -> Recipe:
  """The recipe called `name` (case-insensitive, '-' and '_' ignored); RecipeError listing the valid names."""
  key = name.strip().lower().replace("-", "").replace("_", "") if isinstance(name, str) else name
  for recipe_name, recipe in RECIPES.items():
    if recipe_name.replace("_", "") == key:
      return recipe
  raise RecipeError(f"unknown recipe {name!r}; valid names: {', '.join(RECIPES)}")
