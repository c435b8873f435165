"""The assembled video-language model.

frames [b, f, h, w, c] --EVA02 (frames folded into batch)--> [b, f, gh, gw, dv]
  --TPE + patchify--> [b, groups, tokens, dv] --projector--> visual tokens [b, n_vis, d]
input_ids [b, l] with `visual_token_id` at every visual position
  --embed, then visual tokens written over the placeholders in order--> Llama-3 -> logits [b, l, vocab]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kangaroo_jax.config import KangarooConfig
from kangaroo_jax.models.eva_vit import EvaVisionTransformer
from kangaroo_jax.models.llama import LlamaForCausalLM
from kangaroo_jax.models.projector import MultimodalProjector, TemporalPatchify
from kangaroo_jax.parallel import shard
from kangaroo_jax.run_options import RunOptions


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_visual_placeholders(input_ids, visual_tokens_per_row, visual_token_id: int) -> None:
  """Host-side check that every row has exactly as many placeholders as visual tokens.

  Args:
    input_ids: [batch, seq] ints (numpy or concrete jax array).
    visual_tokens_per_row: int or [batch] ints.
  Raises: ValueError naming the rows and both counts.
  """
  ids = np.asarray(input_ids)
  have = (ids == visual_token_id).sum(axis=1)
  want = np.broadcast_to(np.asarray(visual_tokens_per_row), have.shape)
  bad = np.nonzero(have != want)[0]
  if bad.size:
    rows = ", ".join(f"row {r}: {have[r]} placeholders vs {want[r]} visual tokens" for r in bad[:8])
    raise ValueError(
        f"visual placeholder count mismatch (placeholder id {visual_token_id}): {rows}. "
        "Each frame group contributes tokens_per_group placeholders; rebuild the prompt for "
        "the number of frames actually passed."
    )


def merge_visual_tokens(token_embeds: jax.Array, visual: jax.Array, is_visual: jax.Array) -> jax.Array:
  """Writes visual tokens over the placeholder positions, in order.

  Args:
    token_embeds: [batch, seq, d]
    visual: [batch, n_vis, d]; row b's k-th placeholder receives visual[b, k].
    is_visual: [batch, seq] bool.
  Returns: [batch, seq, d]
  """
  index = jnp.clip(jnp.cumsum(is_visual, axis=1) - 1, 0, visual.shape[1] - 1)
  gathered = jnp.take_along_axis(visual, index[..., None], axis=1)
  return jnp.where(is_visual[..., None], gathered.astype(token_embeds.dtype), token_embeds)


class Kangaroo(nnx.Module):
  """`cfg`: what the model is (shapes; what a checkpoint stores). `run`: how it runs (dtypes, attention, remat)."""

  def __init__(self, cfg: KangarooConfig, run: RunOptions = RunOptions(), *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.run = run
    opts = dict(dtype=run.dtype, param_dtype=run.params_dtype)
    self.vision_tower = EvaVisionTransformer(cfg.vision, run, rngs=rngs)
    self.patchify = TemporalPatchify(cfg.projector, cfg.vision.width, rngs=rngs, **opts)
    self.mm_projector = MultimodalProjector(cfg.vision.width, cfg.llm.hidden_size, rngs=rngs, **opts)
    self.llm = LlamaForCausalLM(cfg.llm, run, rngs=rngs)

  def visual_tokens_per_frame_group(self, height: int, width: int) -> int:
    gh, gw = self.cfg.vision.grid_for(height, width)
    return self.cfg.projector.tokens_per_group(gh, gw)

  def num_visual_tokens(self, num_frames: int, height: int, width: int) -> int:
    return num_frames // self.cfg.projector.frames_per_group * self.visual_tokens_per_frame_group(height, width)

  def encode_frames(self, frames: jax.Array, timestamps: jax.Array | None = None) -> jax.Array:
    """frames [b, f, h, w, c] (normalised), timestamps [b, f] seconds -> visual tokens [b, n_vis, d]."""
    b, f, h, w, c = frames.shape
    gh, gw = self.cfg.vision.grid_for(h, w)
    feats = self._vision_features(frames.reshape(b * f, h, w, c))  # [b*f, gh*gw, dv]
    groups = self.patchify(feats.reshape(b, f, gh, gw, -1), timestamps)  # [b, g, t, dv]
    tokens = self.mm_projector(groups.reshape(b, -1, groups.shape[-1]))
    return shard(tokens, ("activation_batch", "activation_length", "activation_embed"))

  def _vision_features(self, frames: jax.Array) -> jax.Array:
    """frames [n, h, w, c] -> features [n, patches, dv], `vision_chunk_frames` frames at a time.

    Each chunk takes every (n / chunk)-th frame, so with frames sharded in contiguous blocks over all
    devices every device encodes its share of every chunk (no data moves). A rematerialised scan over
    the chunks keeps one chunk's activations alive, so the tower's memory is bounded by the chunk,
    not by thousands of frames x patches.
    """
    n = frames.shape[0]
    chunk = self.run.vision_chunk_frames
    if not chunk or chunk >= n:
      return self.vision_tower(frames)
    if n % chunk:
      raise ValueError(f"vision_chunk_frames={chunk} must divide the frames per batch ({n})")
    steps = n // chunk
    graphdef, state = nnx.split(self.vision_tower)
    by_step = frames.reshape(chunk, steps, *frames.shape[1:]).swapaxes(0, 1)  # [steps, chunk, h, w, c]
    by_step = shard(by_step, (None, "activation_frames", None, None, None))

    # The tower's weights ride in the carry (unchanged): merged inside the body they belong to the
    # scan's trace, which the tower's own layer scan needs; their gradient accumulates there too.
    @jax.checkpoint
    def encode(weights, x):
      return weights, nnx.merge(graphdef, weights)(x)

    _, feats = jax.lax.scan(encode, state, by_step)  # [steps, chunk, patches, dv]
    return feats.swapaxes(0, 1).reshape(n, *feats.shape[2:])

  # --- the inference interface (kangaroo_jax.inference.engine calls these; LlamaForCausalLM has the same) ---

  @property
  def llm_config(self):
    """The decoder's LlamaConfig (KV cache shape, vocabulary)."""
    return self.cfg.llm

  @property
  def compute_dtype(self):
    return self.run.dtype

  @property
  def visual_token_id(self) -> int:
    return self.cfg.visual_token_id

  def embed(self, input_ids: jax.Array, visual: jax.Array | None = None) -> jax.Array:
    """input_ids [b, l] -> token embeddings [b, l, d]; with visual tokens [b, n_vis, d], row b's k-th placeholder
    gets visual[b, k] (the one place visual tokens are merged into the prompt)."""
    is_visual = input_ids == self.cfg.visual_token_id
    embeds = self.llm.model.embed(jnp.where(is_visual, 0, input_ids))
    return embeds if visual is None else merge_visual_tokens(embeds, visual, is_visual)

  def forward_cached(
      self,
      inputs_embeds: jax.Array,
      k_cache: jax.Array,
      v_cache: jax.Array,
      start: jax.Array,
      new_lengths: jax.Array,
      logit_index: jax.Array | None = None,
  ):
    """The decoder against a KV cache (LlamaForCausalLM.forward_cached): (logits, k_cache, v_cache)."""
    return self.llm.forward_cached(inputs_embeds, k_cache, v_cache, start, new_lengths, logit_index=logit_index)

  # --- training and full-sequence forward ---

  def embed_inputs(
      self, input_ids: jax.Array, frames: jax.Array | None = None, timestamps: jax.Array | None = None
  ) -> jax.Array:
    """input_ids [b, l] (+ frames) -> LLM input embeddings [b, l, d] with visual tokens in place."""
    if frames is None:
      if _is_concrete(input_ids) and bool(jnp.any(input_ids == self.cfg.visual_token_id)):
        raise ValueError(f"input_ids contain visual placeholders ({self.cfg.visual_token_id}) but no frames were given")
      return self.embed(input_ids)
    if frames.ndim != 5 or frames.shape[0] != input_ids.shape[0]:
      raise ValueError(
          f"frames must be [batch={input_ids.shape[0]}, frames, height, width, channels], " f"got shape {frames.shape}"
      )
    b, f, h, w, _ = frames.shape
    if _is_concrete(input_ids):
      check_visual_placeholders(input_ids, self.num_visual_tokens(f, h, w), self.cfg.visual_token_id)
    return self.embed(input_ids, self.encode_frames(frames, timestamps))

  def hidden_states(
      self,
      input_ids: jax.Array,
      frames: jax.Array | None = None,
      timestamps: jax.Array | None = None,
      *,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Like __call__ but stops before the LM head: final (normed) hidden states [b, l, embed]."""
    embeds = self.embed_inputs(input_ids, frames, timestamps)
    return self.llm.model(embeds, positions, segment_ids)

  def __call__(
      self,
      input_ids: jax.Array,
      frames: jax.Array | None = None,
      timestamps: jax.Array | None = None,
      *,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """input_ids [b, l], frames [b, f, h, w, c], timestamps [b, f] -> logits [b, l, vocab]."""
    embeds = self.embed_inputs(input_ids, frames, timestamps)
    return self.llm(inputs_embeds=embeds, positions=positions, segment_ids=segment_ids)
