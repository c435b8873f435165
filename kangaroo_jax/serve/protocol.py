"""The chat-completions request body -> a checked `ChatRequest` (or an ApiError naming the field).

Accepted (OpenAI's shape, plus vLLM's `video_url` part and `top_k`):
  messages: [{"role": "system" | "user" | "assistant", "content": str | [part, ...]}], parts being
    {"type": "text", "text"}, {"type": "image_url", "image_url": {"url"}} and
    {"type": "video_url", "video_url": {"url"}} (a bare string for the inner object works too). The media go in
    the FIRST user message: one video_url, or one image_url (a still image), or several image_url parts = the
    frames of one video, in order (what lmms-eval's openai_compatible model sends). Later turns carry text only;
    assistant turns are earlier answers.
  temperature (0 = greedy), top_p, top_k, seed, max_tokens (or max_completion_tokens), stream,
  stream_options.include_usage, n (only 1). `model` is echoed back; any name is accepted.
Fields OpenAI defines that this server cannot honour (logprobs, tools, stop strings, n > 1) are refused, not ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from kangaroo_jax.serve.errors import bad_request

ROLES = ("system", "user", "assistant")
MEDIA_TYPES = ("image_url", "video_url")


@dataclasses.dataclass(frozen=True)
class MediaRef:
  """What the first user message shows: kind "video", "image" or "frames" (several images), their URLs, and
  `param`, the request field of the first URL (for error messages)."""

  kind: str
  urls: tuple[str, ...]
  param: str


@dataclasses.dataclass(frozen=True)
class Defaults:
  """The server's settings for fields a request leaves out, and its limits."""

  temperature: float = 0.6
  top_p: float = 0.9
  top_k: int = 0
  max_tokens: int = 512
  max_tokens_limit: int = 4096


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """messages: [{"role", "content": str}] with the media removed (media_message says where they were)."""

  messages: tuple[dict, ...]
  media: MediaRef | None
  media_message: int | None
  temperature: float
  top_p: float
  top_k: int
  seed: int | None
  max_tokens: int
  stream: bool
  include_usage: bool
  model: str | None


def _number(body: dict, name: str, default, lo: float, hi: float, *, lo_open: bool = False):
  value = body.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise bad_request(f"{name} must be a number, got {value!r:.80}", name)
  if value < lo or (lo_open and value == lo) or value > hi:
    raise bad_request(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}", name)
  return value


def _integer(body: dict, name: str, default, lo: int, hi: int | None = None):
  value = body.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int):
    raise bad_request(f"{name} must be an integer, got {value!r:.80}", name)
  if value < lo or (hi is not None and value > hi):
    raise bad_request(f"{name} must be {f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'}, got {value}", name)
  return value


def _media_url(part: dict, kind: str, param: str) -> str:
  inner = part.get(kind)
  url = inner.get("url") if isinstance(inner, dict) else inner
  if not isinstance(url, str) or not url:
    raise bad_request(f"{param}.{kind}.url must be a non-empty string", f"{param}.{kind}.url")
  return url


def _content(message: dict, i: int) -> tuple[str, list[tuple[str, str, str]]]:
  """(text of the message, [(part type, url, param)] of its media parts)."""
  content = message.get("content")
  param = f"messages[{i}].content"
  if isinstance(content, str):
    return content, []
  if content is None and message.get("role") == "assistant":
    return "", []
  if not isinstance(content, list) or not content:
    raise bad_request(f"{param} must be a string or a non-empty list of content parts", param)
  texts, media = [], []
  for j, part in enumerate(content):
    where = f"{param}[{j}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
      if not isinstance(part.get("text"), str):
        raise bad_request(f"{where}.text must be a string", f"{where}.text")
      texts.append(part["text"])
    elif kind in MEDIA_TYPES:
      media.append((kind, _media_url(part, kind, where), f"{where}.{kind}.url"))
    else:
      raise bad_request(f"{where}: content part type {kind!r} is not one of 'text', 'image_url', 'video_url'", where)
  return "\n".join(t for t in texts if t), media


def _media_ref(media: list[tuple[str, str, str]], i: int) -> MediaRef:
  kinds = {k for k, _, _ in media}
  if "video_url" in kinds:
    if len(media) > 1:
      raise bad_request(
          f"messages[{i}]: a video_url must be the only video or image of the conversation "
          f"(got {len(media)} media parts)",
          f"messages[{i}].content",
      )
    return MediaRef("video", (media[0][1],), media[0][2])
  return MediaRef("image" if len(media) == 1 else "frames", tuple(u for _, u, _ in media), media[0][2])


def _check_unsupported(body: dict) -> None:
  if body.get("n") not in (None, 1):
    raise bad_request(f"n must be 1 (one answer per request), got {body['n']!r:.40}", "n")
  if body.get("logprobs") or body.get("top_logprobs"):
    raise bad_request("logprobs are not supported by this server", "logprobs")
  if body.get("tools") or body.get("functions"):
    raise bad_request("tools / function calling are not supported by this server", "tools")
  if body.get("stop"):
    raise bad_request(
        "stop strings are not supported; answers end at the model's end-of-turn token or max_tokens", "stop"
    )
  fmt = body.get("response_format")
  if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
    raise bad_request("only response_format {'type': 'text'} is supported", "response_format")


def parse_chat_request(body: Any, defaults: Defaults = Defaults()) -> ChatRequest:
  """Checks a decoded JSON body; raises ApiError (400) naming the first bad field."""
  if not isinstance(body, dict):
    raise bad_request("the request body must be a JSON object")
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise bad_request("messages must be a non-empty list", "messages")
  _check_unsupported(body)
  out, media, media_message = [], None, None
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      raise bad_request(f"messages[{i}] must be an object with role one of {ROLES}", f"messages[{i}].role")
    text, parts = _content(m, i)
    if parts:
      if m["role"] != "user":
        raise bad_request(f"messages[{i}]: only user messages may hold images or videos", f"messages[{i}].content")
      if any(x["role"] == "user" for x in out):
        raise bad_request(
            f"messages[{i}]: the video or image must be in the first user message", f"messages[{i}].content"
        )
      media, media_message = _media_ref(parts, i), len(out)
    out.append({"role": m["role"], "content": text})
  if out[-1]["role"] != "user":
    raise bad_request("the last message must be from the user", f"messages[{len(out) - 1}].role")
  temperature = _number(body, "temperature", defaults.temperature, 0.0, 2.0)
  top_p = _number(body, "top_p", defaults.top_p, 0.0, 1.0, lo_open=True)
  top_k = _integer(body, "top_k", defaults.top_k, 0)
  seed = _integer(body, "seed", None, -(2**63))
  name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
  max_tokens = _integer(body, name, defaults.max_tokens, 1, defaults.max_tokens_limit)
  stream = body.get("stream", False)
  if not isinstance(stream, bool) and stream is not None:
    raise bad_request(f"stream must be true or false, got {stream!r:.40}", "stream")
  options = body.get("stream_options") or {}
  if not isinstance(options, dict):
    raise bad_request("stream_options must be an object", "stream_options")
  model = body.get("model")
  if model is not None and not isinstance(model, str):
    raise bad_request("model must be a string", "model")
  return ChatRequest(
      tuple(out),
      media,
      media_message,
      float(temperature),
      float(top_p),
      int(top_k),
      seed,
      int(max_tokens),
      bool(stream),
      bool(options.get("include_usage")),
      model,
  )
