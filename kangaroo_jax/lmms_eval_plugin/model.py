"""The lmms-eval model classes (this module imports lmms-eval; `import kangaroo_jax` never loads it).

    lmms-eval --model kangaroo_jax --model_args pretrained=CKPT,num_frames=64[,recipe=videomme] --tasks videomme

model_args:
  pretrained      a from_pretrained folder (kangaroo_config.json, state/, tokenizer files); required
  num_frames      an even number of frames per video (default 64, or the recipe's)
  recipe          a kangaroo_jax.inference.recipes name: its frames, answer length, greedy decoding and prompt
                  template (multiple-choice prompts are re-laid out, see recipe_prompt); explicit num_frames /
                  max_new_tokens still override it and the override is recorded
  max_new_tokens  answer length; without a recipe the task's generation_kwargs decide (default 128)
  param_dtype, prefill_chunk, max_positions   as in `python -m kangaroo_jax.evaluate`
--batch_size N batches up to N prompts (same frame grid and decoding settings) into one engine call.

`KangarooJax` is the chat model (lmms-eval builds the messages, `doc_to_messages`); generation tasks use it.
Log-likelihood tasks (output_type multiple_choice / loglikelihood) are only built for simple models, so
the same manifest also registers `KangarooJaxSimple`: run those tasks with `--force_simple`. As lmms-eval's
own models do (its multiple_choice scoring takes the argmin), `loglikelihood` hands the harness the
continuation's loss, -log P summed over its tokens; `Runner.loglikelihood` returns log P itself.
Every instance keeps `provenance` (harness version, recipe, settings, git commit, checkpoint hash, counters),
prints it as one line and `python -m kangaroo_jax.lmms_eval_plugin` writes it into lmms-eval's results JSON.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from kangaroo_jax import compile_cache
from kangaroo_jax.data.prompt import PromptError
from kangaroo_jax.data.video import VideoError
from kangaroo_jax.inference.chat import PromptTooLong
from kangaroo_jax.inference.recipes import get_recipe
from kangaroo_jax.inference.sampling import SamplingConfig
from kangaroo_jax.lmms_eval_plugin import recipe_prompt
from kangaroo_jax.lmms_eval_plugin.runner import GenerationRequest, RequestError, Runner, ScoreRequest

DEFAULT_FRAMES = 64
DEFAULT_MAX_NEW_TOKENS = 128
# The instances this process built, newest last (python -m kangaroo_jax.lmms_eval_plugin reads their provenance).
INSTANCES: list = []


def harness_version() -> str:
  return importlib.metadata.version("lmms-eval")


def _item_errors() -> tuple[type[BaseException], ...]:
  """What fails one request without ending the run: its video, its prompt, its length."""
  errors: tuple[type[BaseException], ...] = (VideoError, OSError, PromptTooLong, PromptError)
  try:
    import av

    errors += (av.error.FFmpegError,)
  except ImportError:
    pass
  return errors


def _int_arg(name: str, value, *, minimum: int) -> int | None:
  if value is None or value == "":
    return None
  try:
    number = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"model_args {name}={value!r}: expected an integer") from None
  if number < minimum or str(number) != str(value).strip():
    raise ValueError(f"model_args {name}={value!r}: expected an integer >= {minimum}")
  return number


def _pairs_survive_the_evaluator() -> bool:
  from lmms_eval.api.instance import unwrap_generation_output

  return unwrap_generation_output((0.0, True))[0] == (0.0, True)


def _harness_pair(pair: tuple[float, bool]):
  """(loss, is_greedy) in a form lmms-eval's evaluator hands to the task unchanged.

  lmms-eval 0.7.3's evaluator passes every model output through unwrap_generation_output, which turns a
  (float, bool) tuple into its string, and the multiple_choice task then fails to unpack it. Its typed wrapper
  GenerationResult is returned as `.text` untouched, so the pair goes in there while the harness does that.
  """
  if _PAIRS_SURVIVE:
    return pair
  from lmms_eval.api.instance import GenerationResult

  return GenerationResult(text=pair)


_PAIRS_SURVIVE = _pairs_survive_the_evaluator()


def _sampling(gen_kwargs: dict, greedy: bool) -> SamplingConfig:
  temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
  do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0 and not greedy
  if not do_sample:
    return SamplingConfig()
  return SamplingConfig(
      do_sample=True,
      temperature=temperature,
      top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0),
      top_k=int(gen_kwargs.get("top_k", 0) or 0),
  )


class KangarooJaxSimple(lmms):
  """lmms-eval "simple" model: a text context plus `doc_to_visual` visuals per request."""

  is_simple = True

  def __init__(
      self,
      pretrained: str | None = None,
      num_frames=None,
      recipe: str | None = None,
      max_new_tokens=None,
      batch_size=1,
      param_dtype: str | None = None,
      prefill_chunk=512,
      max_positions=None,
      device=None,
      max_batch_size=None,
      **unknown,
  ):
    super().__init__()
    if unknown:
      raise ValueError(
          f"unknown model_args for kangaroo_jax: {', '.join(sorted(unknown))} (known: pretrained, "
          "num_frames, recipe, max_new_tokens, param_dtype, prefill_chunk, max_positions)"
      )
    if not pretrained:
      raise ValueError("model_args pretrained=CKPT is required (a from_pretrained folder)")
    self.recipe = get_recipe(recipe) if recipe else None
    if self.recipe is not None and getattr(self.recipe, "subtitles", False):
      raise ValueError(
          f"model_args recipe={recipe}: this recipe reads subtitle files, which lmms-eval does not "
          "give a model; use its subtitle task (the subtitles stay in the task's text) with a recipe "
          "without subtitles, e.g. recipe=videomme"
      )
    frames = _int_arg("num_frames", num_frames, minimum=2)
    if frames is not None and frames % 2:
      raise ValueError(f"model_args num_frames={frames}: expected an even number (frames are encoded in pairs)")
    self.max_new_tokens = _int_arg("max_new_tokens", max_new_tokens, minimum=1)
    overrides = {k: v for k, v in (("num_frames", frames), ("max_new_tokens", self.max_new_tokens)) if v is not None}
    if self.recipe is not None:
      self.recipe = self.recipe.replace(**overrides)
      frames, self.max_new_tokens = self.recipe.num_frames, self.recipe.max_new_tokens
    frames = frames or DEFAULT_FRAMES
    batch = _int_arg("batch_size", 1 if batch_size in (None, "auto") else batch_size, minimum=1)
    # The persistent compilation cache of the project's CLIs, before the first compile (it opens then).
    compile_cache.enable(warn=lambda s: print(f"kangaroo_jax warning: {s}", file=sys.stderr, flush=True))
    self.runner = Runner(
        pretrained,
        num_frames=frames,
        batch_size=batch,
        param_dtype=param_dtype,
        prefill_chunk=_int_arg("prefill_chunk", prefill_chunk, minimum=16),
        max_positions=_int_arg("max_positions", max_positions, minimum=2),
        warn=lambda s: print(f"kangaroo_jax warning: {s}", file=sys.stderr, flush=True),
    )
    self.batch_size = batch
    self.provenance = self._provenance(pretrained, frames, overrides, batch)
    INSTANCES.append(self)
    print("kangaroo_jax provenance: " + json.dumps(self.provenance), file=sys.stderr, flush=True)

  def _provenance(self, pretrained: str, frames: int, overrides: dict, batch: int) -> dict:
    from kangaroo_jax.evaluate import checkpoint_hash, code_version

    return {
        "harness": {"name": "lmms-eval", "version": harness_version()},
        "model_class": f"{type(self).__module__}.{type(self).__name__}",
        "recipe": None if self.recipe is None else self.recipe.to_dict(),
        "recipe_overrides": overrides if self.recipe is not None else {},
        "settings": {
            "num_frames": frames,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": batch,
            "prompt": "recipe template" if self.recipe is not None else "task text",
            "decoding": "greedy" if self.recipe is not None else "task generation_kwargs",
        },
        "code": code_version(),
        "checkpoint": checkpoint_hash(pretrained),
        "counts": self.runner.stats,
    }

  # --- request building ----------------------------------------------------------------------------

  def _user_text(self, text: str) -> str:
    if self.recipe is None:
      return text
    rendered, changed, dropped = recipe_prompt.render(self.recipe, text)
    self.runner.stats["recipe_rendered" if changed else "recipe_passthrough"] += 1
    # Items whose task text held more above the question than one instruction line (e.g. subtitles).
    self.runner.stats["recipe_dropped_text"] += int(dropped > 1)
    return rendered

  def _generation(self, messages, visual, gen_kwargs: dict) -> GenerationRequest:
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    max_new = self.max_new_tokens or int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    return GenerationRequest(
        messages=messages,
        visual=visual,
        max_new_tokens=max_new,
        until=until,
        sampling=_sampling(gen_kwargs, greedy=self.recipe is not None),
    )

  def _doc(self, task: str, split: str, doc_id):
    return self.task_dict[task][split][doc_id]

  @staticmethod
  def _one_visual(visuals):
    visuals = [v for v in (visuals or []) if v is not None]
    if len(visuals) > 1:
      raise RequestError(f"{len(visuals)} visuals in one request; Kangaroo's prompt takes one video or image")
    return visuals[0] if visuals else None

  def _build_generation(self, args) -> GenerationRequest:
    ctx, gen_kwargs, doc_to_visual, doc_id, task, split = args
    visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
    return self._generation(
        [{"role": "user", "content": self._user_text(ctx)}], self._one_visual(visuals), dict(gen_kwargs or {})
    )

  # --- lmms-eval API ---------------------------------------------------------------------------------

  def _run_generation(self, requests: list[Instance], build) -> list[str]:
    built, answers = [], [""] * len(requests)
    for i, req in enumerate(requests):
      try:
        built.append((i, build(req.args)))
      except (RequestError, PromptError) as e:
        self.runner.stats["failed"] += 1
        self.runner._warn_failed(e)
    outputs = self.runner.generate([b for _, b in built], errors=_item_errors())
    for (i, _), text in zip(built, outputs):
      answers[i] = "" if text is None else text
    return answers

  def generate_until(self, requests: list[Instance]) -> list[str]:
    return self._run_generation(requests, self._build_generation)

  def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
    scored, where = [], []
    for i, req in enumerate(requests):
      args = req.args
      context, continuation = args[0], args[1]
      try:
        visual = None
        if len(args) >= 6 and args[2] is not None:
          visual = self._one_visual(args[2](self._doc(args[4], args[5], args[3])))
      except RequestError as e:
        self.runner.stats["failed"] += 1
        self.runner._warn_failed(e)
        continue
      scored.append(
          ScoreRequest(
              context=self._user_text(context) if context else context, continuation=continuation, visual=visual
          )
      )
      where.append(i)
    # lmms-eval's own models return the continuation's loss and its multiple_choice scoring takes the argmin,
    # so the harness gets -log P (summed over the continuation's tokens). A request that could not be scored
    # gets +inf: it never wins that comparison.
    out = [(float("inf"), False)] * len(requests)
    for i, result in zip(where, self.runner.loglikelihood(scored, errors=_item_errors())):
      if result is not None:
        out[i] = (-result[0], result[1])
    return [_harness_pair(pair) for pair in out]

  def generate_until_multi_round(self, requests) -> list[str]:
    raise NotImplementedError(
        "kangaroo_jax answers single-round generation and log-likelihood requests; "
        "multi-round tasks are not supported"
    )


def _messages_from_chat(raw_messages) -> tuple[list[dict], object]:
  """lmms-eval chat messages (content parts text / image / video) -> ([{"role", "content": str}], visual)."""
  messages, visuals = [], []
  for m in raw_messages:
    content = m.get("content")
    if isinstance(content, str):
      messages.append({"role": m["role"], "content": content})
      continue
    texts = []
    for part in content or []:
      kind = part.get("type")
      if kind == "text":
        texts.append(part.get("text", ""))
      elif kind in ("image", "video"):
        visuals.append(part.get("url"))
      else:
        raise RequestError(f"message content of type {kind!r} is not supported (text, image, video)")
    messages.append({"role": m["role"], "content": "\n".join(t for t in texts if t)})
  return messages, KangarooJaxSimple._one_visual(visuals)


class KangarooJax(KangarooJaxSimple):
  """lmms-eval chat model: requests carry `doc_to_messages`; the conversation goes through the Llama-3 template."""

  is_simple = False

  def _build_chat_generation(self, args) -> GenerationRequest:
    ctx, doc_to_messages, gen_kwargs, doc_id, task, split = args
    messages, visual = _messages_from_chat(doc_to_messages(self._doc(task, split, doc_id)))
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
      raise RequestError("the task's messages hold no user turn")
    messages[last_user]["content"] = self._user_text(messages[last_user]["content"])
    return self._generation(messages, visual, dict(gen_kwargs or {}))

  def generate_until(self, requests: list[Instance]) -> list[str]:
    return self._run_generation(requests, self._build_chat_generation)
