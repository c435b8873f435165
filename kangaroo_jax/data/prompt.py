"""Llama-3 Instruct prompt layout with Kangaroo's video markers.

Design: docs/model.md sections 1 and 3; the contract with the data pipeline: docs/pipeline_contracts.md section 1.

    <|begin_of_text|>[<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>]
    <|start_header_id|>user<|end_header_id|>\n\n{user content, <video> expanded}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n{assistant content}<|eot_id|> ...

`<video>` expands to `<vi_start>` + per frame group (`tokens_per_group` x visual_token_id, then `<eof>`,
or `<eov>` after the last group) + `<vi_end>` + `\n`. The marker strings are tokenized as ordinary
text. Text between two visual runs is tokenized as one string, so BPE merges across e.g.
`<vi_end>\n{query}` are the same as tokenizing the expanded prompt in one go.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
  """A conversation that cannot be encoded (unknown role, misplaced `<video>`, ...)."""


@dataclasses.dataclass(frozen=True)
class VideoMarkers:
  """Marker strings around the visual tokens; all tokenized as plain text."""

  video: str = "<video>"  # placeholder in the user's text that is replaced by the video block
  start: str = "<vi_start>"
  end: str = "<vi_end>"
  frame_group_end: str = "<eof>"
  video_end: str = "<eov>"


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
  """input_ids int32 [L] (visual_token_id at visual positions); loss_mask bool [L], true on assistant tokens."""

  input_ids: np.ndarray
  loss_mask: np.ndarray

  @property
  def num_placeholders(self) -> int:
    return int((self.input_ids < 0).sum())

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])


def _header(role: str) -> str:
  return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


class _Builder:
  """Collects text (tokenized lazily, merged while the mask flag is unchanged) and visual runs."""

  def __init__(self, tokenizer):
    self.tok = tokenizer
    self.ids: list[int] = []
    self.mask: list[bool] = []
    self._text: list[str] = []
    self._text_mask = False

  def text(self, s: str, masked: bool) -> None:
    if self._text and masked != self._text_mask:
      self.flush()
    self._text.append(s)
    self._text_mask = masked

  def raw(self, ids: Sequence[int], masked: bool) -> None:
    self.flush()
    self.ids.extend(int(i) for i in ids)
    self.mask.extend([masked] * len(ids))

  def flush(self) -> None:
    if self._text:
      ids = self.tok.encode("".join(self._text))
      self.ids.extend(ids)
      self.mask.extend([self._text_mask] * len(ids))
      self._text = []


def _check_messages(messages) -> list[Mapping[str, str]]:
  if not isinstance(messages, (list, tuple)) or not messages:
    raise PromptError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.200}")
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise PromptError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.200}")
    if m["role"] not in ROLES:
      raise PromptError(f"message {i}: role {m['role']!r} is not one of {ROLES}")
    if not isinstance(m["content"], str):
      raise PromptError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
    if m["role"] == "system" and i != 0:
      raise PromptError(f"message {i}: a system message is only allowed first")
  return list(messages)


def encode_conversation(
    tokenizer,
    messages,
    *,
    num_groups: int,
    tokens_per_group: int,
    visual_token_id: int,
    markers: VideoMarkers = VideoMarkers(),
    system: str | None = None,
    add_generation_prompt: bool = False,
) -> EncodedConversation:
  """Tokenizes a chat with one video (or none) into ids and an assistant-only loss mask.

  Args:
    tokenizer: a `kangaroo_jax.tokenizer.Tokenizer` (special-token strings map to single ids).
    messages: list of {"role": "system"|"user"|"assistant", "content": str}. When `num_groups > 0`
      exactly one user message must contain `markers.video` once; with `num_groups == 0` none may.
    num_groups: frame groups of the video (frames // frames_per_group).
    tokens_per_group: visual tokens per group (`ProjectorConfig.tokens_per_group(gh, gw)`).
    visual_token_id: placeholder id (negative).
    system: system prompt; a leading system message overrides it.
    add_generation_prompt: end with the assistant header (inference).
  Returns: EncodedConversation with `num_groups * tokens_per_group` placeholders.
  """
  messages = _check_messages(messages)
  if num_groups < 0 or tokens_per_group <= 0:
    raise PromptError(f"num_groups must be >= 0 and tokens_per_group > 0, got {num_groups}, {tokens_per_group}")
  if visual_token_id >= 0:
    raise PromptError(f"visual_token_id must be negative, got {visual_token_id}")
  n_video = sum(m["content"].count(markers.video) for m in messages)
  if n_video != (1 if num_groups > 0 else 0):
    raise PromptError(
        f"found {n_video} {markers.video!r} marker(s) in the messages; expected "
        f"{'exactly one (the sample has a video)' if num_groups > 0 else 'none (no video given)'}"
    )
  if any(markers.video in m["content"] for m in messages if m["role"] != "user"):
    raise PromptError(f"{markers.video!r} may only appear in a user message")
  if messages[0]["role"] == "system":
    system, messages = messages[0]["content"], messages[1:]

  if tokenizer.bos_id is None:
    raise PromptError("the tokenizer has no <|begin_of_text|> / bos token")
  b = _Builder(tokenizer)
  b.raw([tokenizer.bos_id], False)
  if system is not None:
    b.text(_header("system") + system + "<|eot_id|>", False)
  for m in messages:
    role, content = m["role"], m["content"]
    if role == "assistant":
      b.text(_header(role), False)
      b.text(content + "<|eot_id|>", True)
      continue
    b.text(_header(role), False)
    before, sep, after = content.partition(markers.video)
    b.text(before, False)
    if sep:
      b.text(markers.start, False)
      for g in range(num_groups):
        b.raw([visual_token_id] * tokens_per_group, False)
        b.text(markers.video_end if g == num_groups - 1 else markers.frame_group_end, False)
      b.text(markers.end + "\n", False)
    b.text(after + "<|eot_id|>", False)
  if add_generation_prompt:
    b.text(_header("assistant"), False)
  b.flush()
  return EncodedConversation(np.asarray(b.ids, np.int32), np.asarray(b.mask, np.bool_))
