"""Llama-3 decoder in Flax NNX: GQA, RMSNorm, SwiGLU, half-split RoPE, untied lm_head, scanned layers.

Parameter names follow transformers' `LlamaForCausalLM` (`model.layers.*.self_attn.q_proj`, ...)
with kernels stored [in, out] and the layers stacked along a leading `layers` axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kangaroo_jax.attention import get_attention
from kangaroo_jax.attention.context_parallel import context_size, decode_attention
from kangaroo_jax.attention.layout import inverse_order, zigzag_order
from kangaroo_jax.config import LlamaConfig
from kangaroo_jax.layers.linear import dense
from kangaroo_jax.layers.norms import RMSNorm
from kangaroo_jax.layers.rope import apply_llama_rope, llama_inv_freq
from kangaroo_jax.layers.scan import create_stack, run_stack
from kangaroo_jax.parallel import shard
from kangaroo_jax.run_options import RunOptions

BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"


class LlamaAttention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, run: RunOptions, *, rngs: nnx.Rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    kw = dict(use_bias=False, dtype=run.dtype, param_dtype=run.params_dtype, rngs=rngs)
    self.q_proj = dense(d, cfg.num_heads * hd, ("embed", "heads"), **kw)
    self.k_proj = dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
    self.v_proj = dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
    self.o_proj = dense(cfg.num_heads * hd, d, ("heads", "embed"), **kw)
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
    self.run = run

  def _attention(self):
    r = self.run
    return get_attention(r.attention_impl, r.attention_block, r.attention_kernel, r.ulysses_degree)

  def __call__(self, x, positions, segment_ids, inv_freq, layout: str = "natural"):
    """x: [batch, seq, embed]; positions, segment_ids: [batch, seq] -> [batch, seq, embed].

    layout: "natural" (positions increase with the index in each segment) or "zigzag" (the
    model's load-balanced order); fused TPU kernels mask by index and need to know which.
    """
    b, s, _ = x.shape
    q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    q = shard(apply_llama_rope(q, positions, inv_freq), (BATCH, LENGTH, "activation_heads", None))
    k = shard(apply_llama_rope(k, positions, inv_freq), (BATCH, LENGTH, "activation_kv_heads", None))
    v = shard(v, (BATCH, LENGTH, "activation_kv_heads", None))
    out = self._attention()(
        q,
        k,
        v,
        causal=True,
        q_positions=positions,
        kv_positions=positions,
        q_segment_ids=segment_ids,
        kv_segment_ids=segment_ids,
        layout=layout,
    )
    return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))

  def cached(self, x, positions, inv_freq, k_all, v_all, layer, start, cache_valid):
    """Attention of new tokens over the KV cache, after writing their K/V into it.

    Args:
      x: [batch, chunk, embed] new tokens; positions: [batch, chunk] (= their cache slots).
      k_all, v_all: [layers, batch, max_len, kv_heads, head_dim], the whole stack's cache; only
        layer `layer` (a traced index) is written and read, so the scan can update it in place.
      start: [batch] slot of each row's first new token.
      cache_valid: [batch, max_len] bool, slots holding real tokens once this chunk is written.
    Returns: ([batch, chunk, embed], k_all, v_all)
    """
    b, c, _ = x.shape
    q = self.q_proj(x).reshape(b, c, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, c, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, c, self.num_kv_heads, self.head_dim)
    q = apply_llama_rope(q, positions, inv_freq)
    k = apply_llama_rope(k, positions, inv_freq).astype(k_all.dtype)
    v = v.astype(v_all.dtype)
    k_all = shard(write_cache(k_all, k, layer, positions), CACHE_AXES)
    v_all = shard(write_cache(v_all, v, layer, positions), CACHE_AXES)
    k_cache, v_cache = k_all[layer], v_all[layer]
    cache_positions = jnp.broadcast_to(jnp.arange(k_cache.shape[1], dtype=jnp.int32), cache_valid.shape)
    if c == 1:
      # The cache length is sharded over `context`; decode_attention merges the shards' partial softmax.
      out = decode_attention(
          q, k_cache, v_cache, q_positions=positions, cache_positions=cache_positions, cache_valid=cache_valid
      )
    else:
      # Invalid slots (padding, stale tokens of a shorter row) get segment 0 and are never attended.
      # Cache slots are not in the layout of the new tokens: layout=None keeps this on the
      # position-masked (XLA / cuDNN) paths.
      out = self._attention()(
          q,
          k_cache,
          v_cache,
          causal=True,
          q_positions=positions,
          kv_positions=cache_positions,
          q_segment_ids=jnp.ones((b, c), jnp.int32),
          kv_segment_ids=cache_valid.astype(jnp.int32),
          layout=None,
      )
    return self.o_proj(out.reshape(b, c, self.num_heads * self.head_dim)), k_all, v_all


# The KV cache [layers, batch, cache_len, kv_heads, head_dim] (inference/cache.py places it with these too).
CACHE_AXES = ("layers", BATCH, LENGTH, "activation_kv_heads", None)


def write_cache(cache: jax.Array, new: jax.Array, layer, slots: jax.Array) -> jax.Array:
  """cache [layers, batch, max_len, ...] with new [batch, chunk, ...] written at [layer, b, slots[b, t]].

  A scatter of just the new entries: inside the layer scan (cache in the carry) and with the cache
  donated to the jitted step, XLA updates the buffer in place, so a decode step moves O(1) cache
  bytes for the write instead of copying the cache. Slots past max_len are dropped (callers size
  the cache so this never happens to a valid token).
  """
  rows = jnp.arange(new.shape[0])[:, None]
  return cache.at[layer, rows, slots].set(new, mode="drop")


class LlamaMLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.up_proj = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.down_proj = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

  def __call__(self, x):
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(shard(h, (BATCH, LENGTH, "activation_mlp")))


class LlamaDecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, run: RunOptions, *, rngs: nnx.Rngs):
    norm = dict(eps=cfg.rms_norm_eps, dtype=run.dtype, param_dtype=run.params_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
    self.self_attn = LlamaAttention(cfg, run, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
    self.mlp = LlamaMLP(cfg, dtype=run.dtype, param_dtype=run.params_dtype, rngs=rngs)

  def __call__(self, x, positions, segment_ids, inv_freq, layout: str = "natural"):
    x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids, inv_freq, layout)
    x = x + self.mlp(self.post_attention_layernorm(x))
    return shard(x, (BATCH, LENGTH, EMBED))

  def cached(self, x, positions, inv_freq, k_all, v_all, layer, start, cache_valid):
    """Same as __call__ for new tokens attending over the KV cache (see LlamaAttention.cached)."""
    h, k_all, v_all = self.self_attn.cached(
        self.input_layernorm(x), positions, inv_freq, k_all, v_all, layer, start, cache_valid
    )
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return shard(x, (BATCH, LENGTH, EMBED)), k_all, v_all


class LlamaModel(nnx.Module):
  """Embeddings, decoder stack and final norm (transformers' `LlamaModel`)."""

  def __init__(self, cfg: LlamaConfig, run: RunOptions, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = run.dtype
    self.remat_policy = run.remat_policy
    self.zigzag = run.load_balance and run.attention_impl in ("ring", "usp")
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=run.dtype,
        param_dtype=run.params_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(stddev=0.02), ("vocab", "embed")),
        rngs=rngs,
    )
    self.layers = create_stack(lambda r: LlamaDecoderLayer(cfg, run, rngs=r), cfg.num_layers, rngs)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=run.dtype, param_dtype=run.params_dtype, rngs=rngs)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[batch, seq] int -> [batch, seq, embed]."""
    return shard(self.embed_tokens(input_ids), (BATCH, LENGTH, EMBED))

  def __call__(
      self, inputs_embeds: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """inputs_embeds [batch, seq, embed] -> final hidden states [batch, seq, embed].

    positions default to 0..seq-1; segment_ids (packed samples) default to one segment.
    """
    b, s, _ = inputs_embeds.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = inputs_embeds.astype(self.dtype)
    n = context_size()
    zigzag = self.zigzag and n > 1
    if zigzag:
      # Causal ring attention does equal work per device only in the zigzag order; positions and
      # segment ids move with their tokens, so RoPE and masks are unchanged.
      order = zigzag_order(s, n)
      x, positions = x[:, order], positions[:, order]
      segment_ids = None if segment_ids is None else segment_ids[:, order]
    x = shard(x, (BATCH, LENGTH, EMBED))
    inv_freq = llama_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
    layout = "zigzag" if zigzag else "natural"
    x = run_stack(
        self.layers, x, lambda layer, h: layer(h, positions, segment_ids, inv_freq, layout), self.remat_policy
    )
    x = self.norm(x)
    if zigzag:
      x = shard(x[:, inverse_order(order)], (BATCH, LENGTH, EMBED))
    return x

  def forward_cached(
      self, inputs_embeds: jax.Array, k_cache: jax.Array, v_cache: jax.Array, start: jax.Array, new_lengths: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs new tokens through the stack against a KV cache (prefill chunk or one decode step).

    Slot t of a row's cache holds the token at position t, so positions are start[b] + 0..chunk-1.
    Args:
      inputs_embeds: [batch, chunk, embed]
      k_cache, v_cache: [layers, batch, max_len, kv_heads, head_dim]
      start: [batch] int32, slot of each row's first new token (its current cache length).
      new_lengths: [batch] int32, valid cache length after this chunk (<= start + chunk; rows with
        fewer new tokens than `chunk` are padded, and their padding is written but never valid).
    Returns: (final hidden states [batch, chunk, embed], k_cache, v_cache)
    """
    b, c, _ = inputs_embeds.shape
    positions = start[:, None].astype(jnp.int32) + jnp.arange(c, dtype=jnp.int32)[None, :]
    cache_valid = jnp.arange(k_cache.shape[2], dtype=jnp.int32)[None, :] < new_lengths[:, None]
    inv_freq = llama_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
    x = shard(inputs_embeds.astype(self.dtype), (BATCH, LENGTH, EMBED))

    def step(carry, layer):
      h, k_all, v_all, i = carry
      h, k_all, v_all = layer.cached(h, positions, inv_freq, k_all, v_all, i, start, cache_valid)
      return h, k_all, v_all, i + 1

    # The whole cache rides in the carry (not as scanned input/output), so each layer's write is an
    # in-place update instead of a copy of that layer's cache.
    scanned = nnx.scan(
        step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"}
    )
    x, k_cache, v_cache, _ = scanned((x, k_cache, v_cache, jnp.int32(0)), self.layers)
    return self.norm(x), k_cache, v_cache


class LlamaForCausalLM(nnx.Module):
  """LlamaModel + untied lm_head -> logits."""

  def __init__(self, cfg: LlamaConfig, run: RunOptions = RunOptions(), *, rngs: nnx.Rngs):
    self.model = LlamaModel(cfg, run, rngs=rngs)
    self.lm_head = dense(
        cfg.hidden_size,
        cfg.vocab_size,
        ("embed", "vocab"),
        use_bias=False,
        dtype=run.dtype,
        param_dtype=run.params_dtype,
        rngs=rngs,
    )
    self.logits_fp32 = run.logits_fp32

  # The inference interface (kangaroo_jax.inference.engine), as Kangaroo's: a text-only model has no placeholder id.
  visual_token_id = None

  @property
  def llm_config(self) -> LlamaConfig:
    return self.model.cfg

  @property
  def compute_dtype(self):
    return self.model.dtype

  def embed(self, input_ids: jax.Array, visual: jax.Array | None = None) -> jax.Array:
    """input_ids [batch, seq] -> [batch, seq, embed]."""
    if visual is not None:
      raise ValueError("a text-only model cannot take frames")
    return self.model.embed(input_ids)

  def encode_frames(self, frames: jax.Array, timestamps: jax.Array | None = None) -> jax.Array:
    raise ValueError("a text-only model cannot take frames")

  def __call__(
      self,
      input_ids: jax.Array | None = None,
      *,
      inputs_embeds: jax.Array | None = None,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Token ids [batch, seq] or embeddings [batch, seq, embed] -> logits [batch, seq, vocab]."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
      inputs_embeds = self.model.embed(input_ids)
    hidden = self.model(inputs_embeds, positions, segment_ids)
    logits = self.lm_head(hidden)
    if self.logits_fp32:
      logits = logits.astype(jnp.float32)
    return shard(logits, (BATCH, LENGTH, "activation_vocab"))

  def forward_cached(
      self,
      inputs_embeds: jax.Array,
      k_cache: jax.Array,
      v_cache: jax.Array,
      start: jax.Array,
      new_lengths: jax.Array,
      logit_index: jax.Array | None = None,
  ):
    """LlamaModel.forward_cached + lm_head.

    logit_index: [batch] chunk offsets; when given only those rows' logits are computed ([batch, vocab])
    instead of [batch, chunk, vocab], which is what prefill needs (the last prompt token of each row).
    Returns: (logits, k_cache, v_cache)
    """
    hidden, k_cache, v_cache = self.model.forward_cached(inputs_embeds, k_cache, v_cache, start, new_lengths)
    if logit_index is not None:
      hidden = jnp.take_along_axis(hidden, logit_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    logits = self.lm_head(hidden)
    if self.logits_fp32:
      logits = logits.astype(jnp.float32)
    return logits, k_cache, v_cache
