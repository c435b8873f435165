"""A checked ChatRequest -> what the batcher runs: prompt ids (Llama-3 template with the video block), the
decoded video, the answer budget and the sampling settings. Runs in the request's thread, before queueing, so
a bad video (400) or a prompt that is too long (413) is answered at once, streaming or not."""

from __future__ import annotations

import dataclasses

import numpy as np

from kangaroo_jax.data.prompt import PromptError, encode_conversation
from kangaroo_jax.inference.chat import Chat, PromptTooLong
from kangaroo_jax.inference.sampling import SamplingConfig
from kangaroo_jax.serve.errors import bad_request, too_long
from kangaroo_jax.serve.media import Visual, VisualCache, load_visual
from kangaroo_jax.serve.protocol import ChatRequest


@dataclasses.dataclass
class Prepared:
  """ids int32 [n] (visual_token_id at the visual positions); visual: the video or None (text only);
  max_new_tokens: the request's max_tokens cut to what the positions allow; seed None: not given."""

  ids: np.ndarray
  visual: Visual | None
  max_new_tokens: int
  sampling: SamplingConfig
  seed: int | None


def prepare(
    req: ChatRequest, chat: Chat, *, num_frames: int, cache: VisualCache, tmp_root: str | None = None
) -> Prepared:
  model = chat.model
  visual = None
  num_groups, tokens_per_group = 0, 1
  messages = [dict(m) for m in req.messages]
  if req.media is not None:
    visual = load_visual(req.media, num_frames=num_frames, vision=model.cfg.vision, cache=cache, tmp_root=tmp_root)
    f, h, w = visual.grid
    num_groups = f // model.cfg.projector.frames_per_group
    tokens_per_group = model.visual_tokens_per_frame_group(h, w)
    m = messages[req.media_message]
    m["content"] = chat.markers.video + m["content"]
  try:
    ids = encode_conversation(
        chat.tokenizer,
        messages,
        num_groups=num_groups,
        tokens_per_group=tokens_per_group,
        visual_token_id=model.cfg.visual_token_id,
        markers=chat.markers,
        system=chat.system,
        add_generation_prompt=True,
    ).input_ids
  except PromptError as e:
    raise bad_request(f"messages: {e}", "messages") from None
  try:
    max_new = chat.check_length(ids, req.max_tokens)
  except PromptTooLong as e:
    raise too_long(str(e)) from None
  greedy = req.temperature == 0.0
  sampling = (
      SamplingConfig()
      if greedy
      else SamplingConfig(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
  )
  return Prepared(ids, visual, max_new, sampling, None if greedy else req.seed)
