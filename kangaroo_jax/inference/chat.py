"""Chat: the released Kangaroo conversation API on top of the KV-cache engine.

    chat = Chat(model, tokenizer)
    answer, history = chat.chat("v.mp4", "What happens?")
    answer, history = chat.chat("v.mp4", "And then?", history)

(`from_pretrained`'s model also answers the release's `model.chat(video_path=..., query=..., history=...)`
through a Chat it holds: kangaroo_jax.pretrained.PretrainedKangaroo.)

`history` is a list of {"role", "content"} messages (as in the release) that also carries the
conversation's KV cache. A follow-up re-encodes the whole conversation with the prompt template,
keeps the cached prefix that is unchanged (video tokens included) and prefills only the rest, so
the video is neither decoded nor encoded again and the result equals a fresh call on the full
conversation. A plain list (e.g. read back from JSON) works too; it is then prefilled from scratch.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable

import numpy as np

from kangaroo_jax.data.prompt import VideoMarkers, encode_conversation
from kangaroo_jax.data.video import VideoError, frames_for_model, load_video
from kangaroo_jax.inference.cache import KVCache, with_lengths
from kangaroo_jax.inference.engine import Engine
from kangaroo_jax.inference.sampling import SamplingConfig
from kangaroo_jax.tokenizer import check_fits_vocab


class PromptTooLong(ValueError):
  """A conversation whose prompt has more tokens than the allowed positions; the message gives both counts."""


@dataclasses.dataclass
class _Session:
  video_key: tuple | None
  cache: KVCache
  cache_ids: list[int]


class ChatHistory(list):
  """The conversation's messages, plus the KV cache that holds them (used once: the next turn takes it)."""

  session: _Session | None = None

  def take_session(self) -> _Session | None:
    # The decode step donates the cache buffers, so a session may feed exactly one follow-up.
    s, self.session = self.session, None
    return s


class IncrementalDecoder:
  """Turns a growing list of token ids into text pieces (for streaming), holding back unfinished bytes."""

  def __init__(self, tokenizer, emit: Callable[[str], None]):
    self.tokenizer, self.emit = tokenizer, emit
    self.ids: list[int] = []
    self.sent = ""

  def __call__(self, row: int, token_id: int) -> None:
    self.ids.append(token_id)
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    if text.endswith("\ufffd"):
      return
    if text.startswith(self.sent):
      self.emit(text[len(self.sent) :])
      self.sent = text

  def finish(self) -> None:
    """Emits what was held back (an answer that really ends in an incomplete byte sequence)."""
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    if text.startswith(self.sent) and len(text) > len(self.sent):
      self.emit(text[len(self.sent) :])
      self.sent = text


def _common_prefix(a, b) -> int:
  n = min(len(a), len(b))
  diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
  return int(diff[0]) if diff.size else n


class Chat:
  """One model + tokenizer with its compiled engine and the last decoded video.

  max_positions: a hard limit on positions; a longer prompt raises PromptTooLong and answers stop where
    they would pass it. None: the released Kangaroo runs past its `llm.max_position_embeddings` (8192,
    trained on ~22k-token sequences), so crossing that field only warns, once per Chat, through `warn`.
  """

  def __init__(
      self,
      model,
      tokenizer,
      *,
      prefill_chunk: int = 512,
      system: str | None = None,
      markers: VideoMarkers = VideoMarkers(),
      max_positions: int | None = None,
      warn: Callable[[str], None] | None = None,
  ):
    if tokenizer is None:
      raise ValueError(
          "chat needs a tokenizer: pass tokenizer=, or load the model with from_pretrained from a "
          "folder that holds tokenizer files"
      )
    if max_positions is not None and max_positions < 2:
      raise ValueError(f"max_positions must be >= 2, got {max_positions}")
    check_fits_vocab(tokenizer, model.cfg.llm.vocab_size, "llm.vocab_size of the model")
    self.model, self.tokenizer = model, tokenizer
    self.engine = Engine(model, prefill_chunk=prefill_chunk)
    self.system, self.markers = system, markers
    self.max_positions = max_positions
    self._warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    self._warned_positions = False
    # The last video: (key, frames [1, f, S, S, 3] float32, timestamps [1, f], visual tokens or None).
    self._video: list | None = None
    self.video_loads = 0  # decoded videos (tests check that follow-ups decode nothing)

  def load_visual(self, path: str, num_frames: int, start: float | None = None, end: float | None = None):
    """Video or image file -> (key, normalised frames [1, f, S, S, 3], timestamps [1, f]); cached for the last one.

    start / end (seconds) restrict sampling to that clip of the video.
    """
    if not isinstance(path, (str, os.PathLike)):
      raise VideoError(f"video_path must be a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if num_frames < 1:
      raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    stat = os.stat(path) if os.path.exists(path) else None
    key = (os.path.abspath(path), num_frames, start, end, stat and stat.st_mtime_ns, stat and stat.st_size)
    if self._video is None or self._video[0] != key:
      decoded = load_video(path, num_frames=num_frames, start=start, end=end)
      frames = frames_for_model(decoded.frames, self.model.cfg.vision)
      self._video = [key, frames[None], np.asarray(decoded.timestamps, np.float32)[None], None]
      self.video_loads += 1
    return tuple(self._video[:3])

  def visual_tokens(self, path: str, num_frames: int, start: float | None = None, end: float | None = None):
    """(key, visual tokens [1, n_vis, embed], frame grid (f, h, w)) of a video, encoded once and cached."""
    key, frames, timestamps = self.load_visual(path, num_frames, start, end)
    if self._video[3] is None:
      self._video[3] = self.engine.encode_frames(frames, timestamps)
    return key, self._video[3], frames.shape[1:4]

  def check_length(self, ids: np.ndarray, max_new_tokens: int) -> int:
    """The number of new tokens the positions allow for prompt `ids` [n]; PromptTooLong when none do."""
    n = len(ids)
    n_visual = int((ids == self.model.cfg.visual_token_id).sum())
    parts = f"{n} tokens ({n_visual} visual)"
    if self.max_positions is not None:
      if n > self.max_positions:
        raise PromptTooLong(
            f"the prompt is {parts}, more than the {self.max_positions} positions allowed "
            "(max_positions, --max-positions); use fewer frames (--num-frames) or a shorter "
            "conversation"
        )
      # The answer's i-th token (from 1) is fed back at position n + i - 1; the last one is never fed back.
      return min(max_new_tokens, self.max_positions - n + 1)
    field = self.model.cfg.llm.max_position_embeddings
    if n + max_new_tokens - 1 > field and not self._warned_positions:
      self._warned_positions = True
      self._warn(
          f"the prompt is {parts}; with up to {max_new_tokens} new tokens it passes "
          f"llm.max_position_embeddings = {field} of the model (set a hard limit with --max-positions)"
      )
    return max_new_tokens

  def chat(
      self,
      video_path: str | None = None,
      query: str | None = None,
      history=None,
      *,
      num_frames: int = 64,
      max_new_tokens: int = 512,
      do_sample: bool = True,
      temperature: float = 0.6,
      top_p: float = 0.9,
      top_k: int = 0,
      seed: int = 0,
      stream: Callable[[str], None] | None = None,
      start: float | None = None,
      end: float | None = None,
  ):
    """Answers `query` about the video / image at `video_path` (or text only without one).

    Returns (answer text, ChatHistory). Sampling defaults are the released README's. Raises VideoError
    for a video that cannot be read and PromptTooLong past `max_positions` (see the class doc).
    """
    if not isinstance(query, str) or not query.strip():
      raise ValueError("query must be a non-empty string")
    messages = [dict(m) for m in (history or [])]
    has_video = any(self.markers.video in m.get("content", "") for m in messages)
    if has_video and video_path is None:
      raise ValueError("the history is about a video: pass the same video_path again")
    key = visual = None
    num_groups = 0
    tokens_per_group = 1
    if video_path is not None:
      key, visual, (f, h, w) = self.visual_tokens(video_path, num_frames, start, end)
      num_groups = f // self.model.cfg.projector.frames_per_group
      tokens_per_group = self.model.visual_tokens_per_frame_group(h, w)
    content = query if has_video or video_path is None else self.markers.video + query
    messages.append({"role": "user", "content": content})
    ids = encode_conversation(
        self.tokenizer,
        messages,
        num_groups=num_groups,
        tokens_per_group=tokens_per_group,
        visual_token_id=self.model.cfg.visual_token_id,
        markers=self.markers,
        system=self.system,
        add_generation_prompt=True,
    ).input_ids
    max_new_tokens = self.check_length(ids, max_new_tokens)  # before the history gives up its cache

    session = history.take_session() if isinstance(history, ChatHistory) else None
    cache, keep = None, 0
    if session is not None and session.video_key == key:
      keep = min(_common_prefix(session.cache_ids, ids), len(ids) - 1)
      if (ids[keep:] == self.model.cfg.visual_token_id).any():
        keep = 0  # the visual block changed: start over rather than merge half of it
      if keep:
        cache = with_lengths(session.cache, [keep])
    new_ids = ids[keep:]
    needs_visual = bool((new_ids == self.model.cfg.visual_token_id).any())
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k)
    on_token = IncrementalDecoder(self.tokenizer, stream) if stream is not None else None
    gen = self.engine.generate(
        [new_ids.tolist()],
        visual=visual if needs_visual else None,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_ids=self.tokenizer.stop_ids,
        seed=seed,
        cache=cache,
        cache_ids=[ids[:keep].tolist()] if cache is not None else None,
        on_token=on_token,
    )
    if on_token is not None:
      on_token.finish()
    answer = self.tokenizer.decode(gen.tokens[0], skip_special_tokens=True)
    out = ChatHistory(messages + [{"role": "assistant", "content": answer}])
    out.session = _Session(key, gen.cache, gen.cache_ids[0])
    self.last_prefill_tokens = len(new_ids)  # how much of the prompt this turn actually ran
    return answer, out


def released_num_frames(num_frames: int | None, num_segments: int | None) -> int:
  """The frame count of the release's `chat(num_segments=...)` or ours (`num_frames`); 64 when neither is given."""
  if num_frames is not None and num_segments is not None and num_frames != num_segments:
    raise ValueError(f"num_frames={num_frames} and num_segments={num_segments} disagree; pass one")
  return num_frames if num_frames is not None else num_segments if num_segments is not None else 64
