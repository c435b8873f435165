"""Prefill + decode with a preallocated KV cache, for `Kangaroo` or a bare `LlamaForCausalLM`.

The engine sees one model interface, defined on both models: `llm_config` (the decoder's LlamaConfig),
`compute_dtype`, `visual_token_id` (None: text only), `encode_frames(frames, timestamps)`,
`embed(ids, visual)` (visual tokens merged at the placeholders) and `forward_cached(...)`.

  prefill: the new tokens' embeddings (visual tokens already merged) go through the decoder in
    chunks of at most `prefill_chunk` tokens; each chunk attends to the cache plus itself. Under a
    mesh with a `context` axis the chunk's queries and the cache length are split over it (ring or
    all-gather attention, per `attention_impl`), so long prompts are context-parallel.
  decode: one jitted step per token (embed, decoder over the cache, sample); shapes depend only on
    (batch, cache bucket), so it compiles once per bucket and sampling settings.

The engine splits the model once (`nnx.split`); call `refresh()` after changing its weights.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kangaroo_jax.attention.context_parallel import context_size
from kangaroo_jax.inference.cache import KVCache, bucket_length, grow_cache, init_cache
from kangaroo_jax.inference.sampling import SamplingConfig, sample
from kangaroo_jax.models.kangaroo import check_visual_placeholders

MIN_CHUNK = 16


def prefill_chunk_length(n: int, limit: int, multiple: int) -> int:
  """Tokens per prefill chunk for a longest prompt of `n` new tokens: a power of two from MIN_CHUNK up to `limit`,
  rounded up to a multiple of the context axis. Prompts with the same chunk length share compiled programs."""
  c = MIN_CHUNK
  while c < n and c < limit:
    c *= 2
  c = min(c, max(limit, MIN_CHUNK))
  return -(-c // multiple) * multiple


@dataclasses.dataclass
class Generation:
  """What `generate` returns.

  tokens: per row, the generated ids without the stop token.
  stopped: per row, whether a stop id ended it (else max_new_tokens did).
  cache: the KV cache after generation; cache_ids: per row, the ids whose K/V it holds (prompt, including
    earlier turns, then every generated token that was fed back), i.e. `cache.lengths[b] == len(cache_ids[b])`.
  """

  tokens: list[list[int]]
  stopped: list[bool]
  cache: KVCache
  cache_ids: list[list[int]]


class Engine:

  def __init__(self, model, *, prefill_chunk: int = 512):
    if prefill_chunk < MIN_CHUNK:
      raise ValueError(f"prefill_chunk must be >= {MIN_CHUNK}, got {prefill_chunk}")
    self.model = model
    self.llm_cfg = model.llm_config
    self.dtype = model.compute_dtype
    self.visual_token_id = model.visual_token_id
    self.prefill_chunk = prefill_chunk
    # How often each jitted function was traced (== compiled); tests use it to check the buckets.
    self.trace_counts: collections.Counter = collections.Counter()
    self.refresh()
    self._build()

  def refresh(self) -> None:
    """Re-reads the model's weights (after training or loading into the same module)."""
    self.graphdef, state = nnx.split(self.model)
    # Host (numpy) leaves, e.g. weights loaded in place from a torch state dict, would be copied to the
    # device on every jitted call; place them once. Abstract leaves (ShapeDtypeStruct, for ahead-of-time
    # compilation with `kangaroo_jax.aot`) stay abstract.
    keep = (jax.Array, jax.ShapeDtypeStruct)
    self.state = jax.tree.map(lambda x: x if isinstance(x, keep) else jnp.asarray(x), state)

  def _model(self, state):
    return nnx.merge(self.graphdef, state)

  def _build(self) -> None:
    def encode_frames(state, frames, timestamps):
      self.trace_counts["vision"] += 1
      return self._model(state).encode_frames(frames, timestamps)

    def embed(state, ids, visual):
      self.trace_counts["embed"] += 1
      return self._model(state).embed(ids, visual)

    def prefill_chunk(state, cache, embeds, start, n_new, logit_index, has_last, prev_logits):
      self.trace_counts["prefill"] += 1
      logits, k, v = self._model(state).forward_cached(
          embeds, cache.k, cache.v, start, start + n_new, logit_index=logit_index
      )
      logits = jnp.where(has_last[:, None], logits, prev_logits)
      return KVCache(k, v, start + n_new), logits

    def decode_step(state, cache, tokens, key, step, sampling):
      self.trace_counts["decode"] += 1
      model = self._model(state)
      start = cache.lengths
      logits, k, v = model.forward_cached(
          model.embed(tokens[:, None]), cache.k, cache.v, start, start + 1, logit_index=jnp.zeros_like(start)
      )
      nxt = sample(logits, jax.random.fold_in(key, step), sampling)
      return KVCache(k, v, start + 1), nxt

    def first_token(logits, key, sampling):
      self.trace_counts["sample"] += 1
      return sample(logits, jax.random.fold_in(key, 0), sampling)

    self._encode_frames = jax.jit(encode_frames)
    self._embed = jax.jit(embed)
    self._prefill_chunk = jax.jit(prefill_chunk, donate_argnums=(1,))
    self._decode_step = jax.jit(decode_step, static_argnames=("sampling",), donate_argnums=(1,))
    self._first_token = jax.jit(first_token, static_argnames=("sampling",))

  # --- building blocks -------------------------------------------------------------------------

  def new_cache(self, batch: int, max_len: int) -> KVCache:
    return init_cache(self.llm_cfg, batch, bucket_length(max_len, 2 * context_size()), self.dtype)

  def encode_frames(self, frames, timestamps=None) -> jax.Array:
    """Normalised frames [batch, f, h, w, 3] (+ timestamps [batch, f]) -> visual tokens [batch, n_vis, embed]."""
    if self.visual_token_id is None:
      raise ValueError("a text-only model cannot take frames")
    frames = jnp.asarray(frames)
    if frames.ndim != 5:
      raise ValueError(f"frames must be [batch, frames, height, width, 3], got shape {frames.shape}")
    return self._encode_frames(self.state, frames, timestamps)

  def embed(self, ids: np.ndarray, visual: jax.Array | None = None, length: int | None = None) -> jax.Array:
    """ids int [batch, n] (visual_token_id at visual positions) -> embeddings [batch, length or n, embed].

    visual: [batch, n_vis, embed] from `encode_frames`; row b's k-th placeholder gets visual[b, k].
    length: pad the ids to this many (a bucket), so embedding compiles per bucket, not per prompt length.
    """
    ids = np.asarray(ids, np.int32)
    if self.visual_token_id is not None:
      if visual is None and (ids == self.visual_token_id).any():
        raise ValueError(f"the prompt holds visual placeholders ({self.visual_token_id}) but no frames were given")
      if visual is not None:
        if visual.ndim != 3 or visual.shape[0] != ids.shape[0]:
          raise ValueError(f"visual tokens must be [batch={ids.shape[0]}, n, embed], got {visual.shape}")
        check_visual_placeholders(ids, visual.shape[1], self.visual_token_id)
    elif (ids < 0).any():
      raise ValueError("a text-only model got negative (visual placeholder) ids")
    if length is not None and length > ids.shape[1]:
      ids = np.pad(ids, ((0, 0), (0, length - ids.shape[1])))
    return self._embed(self.state, ids, visual)

  def prefill(self, cache: KVCache, embeds: jax.Array, num_new: Sequence[int]) -> tuple[KVCache, jax.Array]:
    """Appends each row's new tokens to the cache, in chunks.

    Args:
      cache: with room for max(lengths) + embeds.shape[1] slots (see `ensure_capacity`).
      embeds: [batch, n, embed], row b's new tokens at 0 .. num_new[b]-1 (right-padded).
      num_new: [batch] >= 1.
    Returns: (cache with lengths += num_new, logits [batch, vocab] float32 after each row's last new token)
    """
    num_new = np.asarray(num_new, np.int64)
    b, n, _ = embeds.shape
    if num_new.shape != (b,) or (num_new < 1).any() or (num_new > n).any():
      raise ValueError(f"num_new must be [{b}] values in 1..{n}, got {num_new.tolist()}")
    c = prefill_chunk_length(int(num_new.max()), self.prefill_chunk, context_size())
    padded = -(-n // c) * c
    lengths = np.asarray(cache.lengths, np.int64)
    if lengths.max() + padded > cache.max_len:
      raise ValueError(
          f"KV cache of {cache.max_len} slots cannot take {padded} more tokens after " f"{lengths.max()}; grow it first"
      )
    if padded > n:
      embeds = jnp.pad(embeds, ((0, 0), (0, padded - n), (0, 0)))
    logits = jnp.zeros((b, self.llm_cfg.vocab_size), jnp.float32)
    for j in range(padded // c):
      lo = j * c
      if lo >= num_new.max():
        break
      n_chunk = np.clip(num_new - lo, 0, c)
      last = num_new - 1 - lo
      has_last = (last >= 0) & (last < c)
      start = lengths + np.minimum(lo, num_new)
      # Finished rows keep their length: their (padding) chunk is written past it and never becomes valid.
      cache = KVCache(cache.k, cache.v, jnp.asarray(start, jnp.int32))
      logit_index = jnp.asarray(np.clip(last, 0, c - 1), jnp.int32)
      cache, logits = self._prefill_chunk(
          self.state,
          cache,
          embeds[:, lo : lo + c],
          jnp.asarray(start, jnp.int32),
          jnp.asarray(n_chunk, jnp.int32),
          logit_index,
          jnp.asarray(has_last),
          logits,
      )
    return cache, logits

  def ensure_capacity(self, cache: KVCache | None, batch: int, needed: int) -> KVCache:
    """A cache (new, or `cache` grown to the next bucket) with at least `needed` slots."""
    if cache is None:
      return self.new_cache(batch, needed)
    if cache.batch != batch:
      raise ValueError(f"the KV cache holds {cache.batch} rows but {batch} prompts were given")
    if needed <= cache.max_len:
      return cache
    return grow_cache(cache, bucket_length(needed, 2 * context_size()))

  # --- generation ------------------------------------------------------------------------------

  def generate(
      self,
      prompts: Sequence[Sequence[int]],
      *,
      frames=None,
      timestamps=None,
      visual=None,
      max_new_tokens: int = 512,
      sampling: SamplingConfig = SamplingConfig(),
      stop_ids: Sequence[int] = (),
      seed: int = 0,
      cache: KVCache | None = None,
      cache_ids: Sequence[Sequence[int]] | None = None,
      on_token: Callable[[int, int], None] | None = None,
  ) -> Generation:
    """Generates for a batch of prompts of different lengths.

    Args:
      prompts: per row, the token ids to append (visual_token_id where visual tokens go); with `cache`,
        they continue that row's cached tokens (`cache_ids`).
      frames: [batch, frames, h, w, 3] normalised, timestamps [batch, frames]; needed when prompts hold placeholders.
      visual: instead of frames, their visual tokens from `encode_frames` (e.g. cached for a follow-up).
      max_new_tokens: per row, at most this many tokens (the stop token counts).
      stop_ids: a row ends at the first of these (it is not returned in `tokens`).
      on_token: called as on_token(row, token_id) for every returned token as soon as it is known (streaming).
    """
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b = len(prompts)
    if b == 0 or any(len(p) == 0 for p in prompts):
      raise ValueError("generate needs at least one prompt and no empty prompt")
    num_new = np.array([len(p) for p in prompts])
    n = int(num_new.max())
    ids = np.zeros((b, n), np.int32)
    for r, p in enumerate(prompts):
      ids[r, : len(p)] = p
    base = [list(x) for x in cache_ids] if cache_ids is not None else [[] for _ in range(b)]
    if cache is not None and [len(x) for x in base] != np.asarray(cache.lengths).tolist():
      raise ValueError("cache_ids must list exactly the ids held by the cache (one list per row)")
    chunk = prefill_chunk_length(n, self.prefill_chunk, context_size())
    padded = -(-n // chunk) * chunk
    longest = max(len(x) for x in base)
    needed = max(longest + padded, max(len(x) for x in base) + n + max_new_tokens)
    cache = self.ensure_capacity(cache, b, needed)
    if frames is not None:
      if visual is not None:
        raise ValueError("pass frames or their visual tokens, not both")
      visual = self.encode_frames(frames, timestamps)
    cache, logits = self.prefill(cache, self.embed(ids, visual, length=padded), num_new)

    key = jax.random.key(seed)
    stops = set(int(s) for s in stop_ids)
    fed = [base[r] + list(map(int, prompts[r])) for r in range(b)]
    out: list[list[int]] = [[] for _ in range(b)]
    stopped = [False] * b
    done = [False] * b
    cur = self._first_token(logits, key, sampling=sampling)
    for step in range(1, max_new_tokens + 1):
      # Dispatch the next step before reading this one's tokens so host work overlaps the device.
      nxt = None
      if step < max_new_tokens:
        cache, nxt = self._decode_step(self.state, cache, cur, key, jnp.int32(step), sampling=sampling)
      toks = np.asarray(cur)
      for r in range(b):
        if nxt is not None:
          fed[r].append(int(toks[r]))
        if done[r]:
          continue
        t = int(toks[r])
        if t in stops:
          done[r] = stopped[r] = True
          continue
        out[r].append(t)
        if on_token is not None:
          on_token(r, t)
        if len(out[r]) >= max_new_tokens:
          done[r] = True
      if all(done) or nxt is None:
        break
      cur = nxt
    return Generation(out, stopped, cache, fed)
