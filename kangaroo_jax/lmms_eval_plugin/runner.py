"""The harness-independent half of the lmms-eval plugin: one checkpoint, batched generation and log-likelihoods.

Nothing here imports lmms-eval, so it runs (and is tested) in the project's own environment. A request is
a list of chat messages whose content is text, plus at most one visual (a video / image path, a PIL image,
or {"path", "video_start", "video_end"}):

    runner = Runner("ckpt/", num_frames=64)
    runner.generate([GenerationRequest(messages=[{"role": "user", "content": "What happens?"}],
                                       visual="clip.mp4", max_new_tokens=16)])
    runner.loglikelihood([ScoreRequest(context="Question ...", continuation=" B", visual="clip.mp4")])

Frames follow the release's rule (the middle frame of each of `num_frames` equal segments, an even count);
the prompt is the Llama-3 template with Kangaroo's video markers (kangaroo_jax.data.prompt).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kangaroo_jax.data.prompt import encode_conversation
from kangaroo_jax.data.video import frames_for_model
from kangaroo_jax.evaluate import distinct_frames
from kangaroo_jax.inference.cache import KVCache
from kangaroo_jax.inference.chat import Chat
from kangaroo_jax.inference.engine import MIN_CHUNK
from kangaroo_jax.inference.loading import load_for_inference
from kangaroo_jax.inference.sampling import SamplingConfig


class RequestError(ValueError):
  """A request the plugin cannot answer (its visual, its prompt); the harness scores it as an empty answer."""


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
  """messages: [{"role", "content": str}], the visual (if any) belongs to the first user message."""

  messages: Sequence[dict]
  visual: object = None
  max_new_tokens: int = 16
  until: tuple[str, ...] = ()
  sampling: SamplingConfig = SamplingConfig()


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
  """log P(continuation | user turn `context` + visual), the continuation as the assistant's first tokens."""

  context: str
  continuation: str
  visual: object = None


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
  """The text before the first occurrence of any stop string (the harness's `until`)."""
  cut = len(text)
  for stop in until:
    if stop:
      at = text.find(stop)
      if at != -1:
        cut = min(cut, at)
  return text[:cut]


def _image_frames(image) -> tuple[np.ndarray, np.ndarray]:
  # A still image is a two-frame clip of itself: frames are encoded in pairs.
  pixels = np.asarray(image.convert("RGB"), np.uint8)
  return np.stack([pixels, pixels]), np.zeros(2, np.float32)


class Runner:
  """A loaded checkpoint with its Chat (engine, tokenizer, last decoded video) and per-run counters.

  num_frames: an even number of frames per video. batch_size: prompts per engine call.
  stats: "answered", "failed" (requests that raised RequestError or a video error), "short_videos"
    (fewer distinct frames than requested: uniform sampling repeated some), "recipe_rendered" / "recipe_passthrough"
    / "recipe_dropped_text" (kept for the lmms-eval model's recipe prompts, see recipe_prompt).
  """

  def __init__(
      self,
      ckpt_dir: str,
      *,
      num_frames: int = 64,
      batch_size: int = 1,
      param_dtype: str | None = None,
      prefill_chunk: int = 512,
      max_positions: int | None = None,
      model_and_tokenizer=None,
      warn: Callable[[str], None] | None = None,
  ):
    if not isinstance(num_frames, int) or num_frames < 2 or num_frames % 2:
      raise ValueError(f"num_frames must be an even integer >= 2 (frames are encoded in pairs), got {num_frames!r}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if model_and_tokenizer is None:
      model, tokenizer, _ = load_for_inference(ckpt_dir, param_dtype=param_dtype)
    else:
      model, tokenizer = model_and_tokenizer
    if tokenizer is None:
      raise ValueError(f"{ckpt_dir} holds no tokenizer.json or tokenizer.model")
    self.chat = Chat(model, tokenizer, prefill_chunk=prefill_chunk, max_positions=max_positions, warn=warn)
    self.model, self.tokenizer, self.engine = model, tokenizer, self.chat.engine
    self.num_frames, self.batch_size = num_frames, batch_size
    self.stats = {
        "answered": 0,
        "failed": 0,
        "short_videos": 0,
        "recipe_rendered": 0,
        "recipe_passthrough": 0,
        "recipe_dropped_text": 0,
    }

  # --- inputs ------------------------------------------------------------------------------------

  def frames_of(self, visual) -> tuple[np.ndarray, np.ndarray] | None:
    """visual -> (normalised frames [f, S, S, 3] float32, timestamps [f]) or None for a text-only request."""
    if visual is None:
      return None
    if hasattr(visual, "convert"):  # a PIL image
      raw, timestamps = _image_frames(visual)
      return frames_for_model(raw, self.model.cfg.vision), timestamps
    start = end = None
    if isinstance(visual, dict):
      start, end = visual.get("video_start"), visual.get("video_end")
      visual = visual.get("path") or visual.get("url") or visual.get("video_path")
    if not isinstance(visual, (str, os.PathLike)):
      raise RequestError(
          f"a visual must be a file path, a PIL image or a dict with 'path'; " f"got {type(visual).__name__}"
      )
    if str(visual).startswith(("http://", "https://")):
      raise RequestError(f"{visual}: remote videos are not fetched; give a local path")
    _, frames, timestamps = self.chat.load_visual(visual, self.num_frames, start, end)
    if distinct_frames(timestamps) < frames.shape[1] and frames.shape[1] > 2:
      self.stats["short_videos"] += 1
    return frames[0], timestamps[0]

  def prompt_ids(self, messages: Sequence[dict], frames: np.ndarray | None) -> np.ndarray:
    """Token ids int32 [n] of the conversation (the video block in the first user turn), ending in the
    assistant header."""
    messages = [dict(m) for m in messages]
    num_groups, tokens_per_group = 0, 1
    if frames is not None:
      f, h, w = frames.shape[:3]
      num_groups = f // self.model.cfg.projector.frames_per_group
      tokens_per_group = self.model.visual_tokens_per_frame_group(h, w)
      first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
      messages[first_user]["content"] = self.chat.markers.video + messages[first_user]["content"]
    return encode_conversation(
        self.tokenizer,
        messages,
        num_groups=num_groups,
        tokens_per_group=tokens_per_group,
        visual_token_id=self.model.cfg.visual_token_id,
        markers=self.chat.markers,
        add_generation_prompt=True,
    ).input_ids

  # --- generation ---------------------------------------------------------------------------------

  def generate(self, requests: Sequence[GenerationRequest], errors: tuple = ()) -> list[str | None]:
    """Answers in request order; None for a request that failed with RequestError or one of `errors`.

    Requests with the same frame grid and decoding settings are batched (up to batch_size) into one
    Engine.generate call; rows of different prompt lengths are right-padded inside the engine.
    """
    prepared, answers = [], [None] * len(requests)
    for i, req in enumerate(requests):
      try:
        video = self.frames_of(req.visual)
        ids = self.prompt_ids(req.messages, None if video is None else video[0])
        max_new = self.chat.check_length(ids, req.max_new_tokens)
      except (RequestError,) + tuple(errors) as e:
        self.stats["failed"] += 1
        self._warn_failed(e)
        continue
      grid = None if video is None else video[0].shape
      prepared.append(((grid, max_new, req.sampling), i, ids, video))
    prepared.sort(key=lambda p: (repr(p[0]), p[1]))
    for key, group in itertools.groupby(prepared, key=lambda p: p[0]):
      group = list(group)
      for lo in range(0, len(group), self.batch_size):
        self._generate_batch(key, group[lo : lo + self.batch_size], requests, answers)
    return answers

  def _generate_batch(self, key, rows, requests, answers) -> None:
    grid, max_new, sampling = key
    frames = timestamps = None
    if grid is not None:
      frames = jnp.asarray(np.stack([video[0] for _, _, _, video in rows]))
      timestamps = jnp.asarray(np.stack([video[1] for _, _, _, video in rows]))
    gen = self.engine.generate(
        [ids.tolist() for _, _, ids, _ in rows],
        frames=frames,
        timestamps=timestamps,
        max_new_tokens=max_new,
        sampling=sampling,
        stop_ids=self.tokenizer.stop_ids,
    )
    for (_, i, _, _), tokens in zip(rows, gen.tokens):
      text = self.tokenizer.decode(tokens, skip_special_tokens=True)
      answers[i] = cut_at_stop_strings(text, requests[i].until)
      self.stats["answered"] += 1

  def _warn_failed(self, e: BaseException) -> None:
    self.chat._warn(f"request skipped (scored as an empty answer): {' '.join(str(e).split())}")

  # --- log-likelihood ----------------------------------------------------------------------------

  def loglikelihood(self, requests: Sequence[ScoreRequest], errors: tuple = ()) -> list[tuple[float, bool] | None]:
    """(sum of log P(continuation tokens), whether greedy decoding would produce them), per request.

    Consecutive requests with the same context and visual (a multiple-choice item's options) share one
    prefill: the prompt's KV cache is copied to one row per continuation and the continuations are fed a
    token at a time, so every token's distribution comes from the KV-cache engine.
    """
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    keyed = [
        (r.context, id(r.visual) if r.visual is not None and not isinstance(r.visual, str) else r.visual)
        for r in requests
    ]
    i = 0
    while i < len(requests):
      j = i + 1
      while j < len(requests) and keyed[j] == keyed[i]:
        j += 1
      try:
        video = self.frames_of(requests[i].visual)
        ids = self.prompt_ids([{"role": "user", "content": requests[i].context}], None if video is None else video[0])
        conts = [self.tokenizer.encode(r.continuation) for r in requests[i:j]]
        if any(not c for c in conts):
          raise RequestError("an empty continuation has no log-likelihood")
        self.chat.check_length(ids, max(len(c) for c in conts))
        out[i:j] = self._score(ids, video, conts)
        self.stats["answered"] += j - i
      except (RequestError,) + tuple(errors) as e:
        self.stats["failed"] += j - i
        self._warn_failed(e)
      i = j
    return out

  def _score(self, ids: np.ndarray, video, conts: list[list[int]]) -> list[tuple[float, bool]]:
    visual = None
    if video is not None:
      visual = self.engine.encode_frames(jnp.asarray(video[0][None]), jnp.asarray(video[1][None]))
    rows = len(conts)
    longest = max(len(c) for c in conts)
    # Room for the prompt padded to its prefill chunks, then one padded chunk per fed continuation token.
    cache = self.engine.ensure_capacity(None, 1, len(ids) + self.engine.prefill_chunk + longest + MIN_CHUNK)
    cache, logits = self.engine.prefill(cache, self.engine.embed(ids[None], visual), [len(ids)])
    cache = KVCache(
        jnp.repeat(cache.k, rows, axis=1), jnp.repeat(cache.v, rows, axis=1), jnp.repeat(cache.lengths, rows)
    )
    logits = jnp.repeat(logits, rows, axis=0)
    total, greedy = np.zeros(rows), np.ones(rows, bool)
    for step in range(longest):
      logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
      for r, cont in enumerate(conts):
        if step < len(cont):
          total[r] += float(logp[r, cont[step]])
          greedy[r] &= int(np.argmax(logp[r])) == cont[step]
      if step + 1 == longest:
        break
      # Rows whose continuation ended feed a padding token; their later logits are never read.
      feed = np.array([[cont[step] if step < len(cont) else 0] for cont in conts], np.int32)
      cache, logits = self.engine.prefill(cache, self.engine.embed(feed), [1] * rows)
    return [(float(t), bool(g)) for t, g in zip(total, greedy)]
