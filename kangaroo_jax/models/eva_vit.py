"""EVA02-CLIP vision tower in Flax NNX (docs/model.md section 1).

Per block (pre-norm, no layer scale):
  x = x + proj(inner_attn_ln(attn(rope(q), rope(k), v)))   q, v with bias; k without
  x = x + w3(ffn_ln(silu(w1 x) * w2 x))
2-D RoPE (interleaved pairs) rotates patch tokens only; the CLS token is left as is.
Frames are folded into the batch; the blocks run under nnx.scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kangaroo_jax.attention import get_attention
from kangaroo_jax.config import VisionConfig
from kangaroo_jax.layers.linear import dense, param
from kangaroo_jax.layers.norms import LayerNorm
from kangaroo_jax.layers.resize import resize_weights
from kangaroo_jax.layers.rope import apply_interleaved_rope, eva_rope_tables
from kangaroo_jax.layers.scan import create_stack, run_stack
from kangaroo_jax.parallel import shard
from kangaroo_jax.run_options import RunOptions

FRAMES, PATCHES = "activation_frames", "activation_patches"


class EvaAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, run: RunOptions, *, rngs: nnx.Rngs):
    w = cfg.width
    dtype, param_dtype = run.dtype, run.params_dtype
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = dense(w, w, ("embed", "heads"), **kw)
    self.k_proj = dense(w, w, ("embed", "heads"), **kw)
    self.v_proj = dense(w, w, ("embed", "heads"), **kw)
    zeros = nnx.initializers.zeros_init()
    self.q_bias = param(rngs, zeros, (w,), ("heads",), param_dtype)
    self.v_bias = param(rngs, zeros, (w,), ("heads",), param_dtype)
    self.inner_attn_ln = LayerNorm(w, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = dense(w, w, ("heads", "embed"), use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads, self.head_width = cfg.num_heads, cfg.head_width
    self.dtype = dtype
    self.attention_impl = run.vision_attention_impl

  def __call__(self, x, rope_cos, rope_sin):
    """x: [n, 1 + patches, width]; rope tables [patches, head_width] -> [n, 1 + patches, width]."""
    n, t, w = x.shape
    heads = (n, t, self.num_heads, self.head_width)
    q = (self.q_proj(x) + self.q_bias[...].astype(self.dtype)).reshape(heads)
    k = self.k_proj(x).reshape(heads)
    v = (self.v_proj(x) + self.v_bias[...].astype(self.dtype)).reshape(heads)
    q = jnp.concatenate([q[:, :1], apply_interleaved_rope(q[:, 1:], rope_cos, rope_sin)], axis=1)
    k = jnp.concatenate([k[:, :1], apply_interleaved_rope(k[:, 1:], rope_cos, rope_sin)], axis=1)
    out = get_attention(self.attention_impl)(q, k, v, causal=False)
    return self.proj(self.inner_attn_ln(out.reshape(n, t, w)))


class EvaSwiGLU(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.w1 = dense(cfg.width, cfg.mlp_hidden, ("embed", "mlp"), **kw)
    self.w2 = dense(cfg.width, cfg.mlp_hidden, ("embed", "mlp"), **kw)
    self.ffn_ln = LayerNorm(cfg.mlp_hidden, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.w3 = dense(cfg.mlp_hidden, cfg.width, ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.w3(self.ffn_ln(jax.nn.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, run: RunOptions, *, rngs: nnx.Rngs):
    norm = dict(eps=cfg.layer_norm_eps, dtype=run.dtype, param_dtype=run.params_dtype, rngs=rngs)
    self.norm1 = LayerNorm(cfg.width, **norm)
    self.attn = EvaAttention(cfg, run, rngs=rngs)
    self.norm2 = LayerNorm(cfg.width, **norm)
    self.mlp = EvaSwiGLU(cfg, dtype=run.dtype, param_dtype=run.params_dtype, rngs=rngs)

  def __call__(self, x, rope_cos, rope_sin):
    x = x + self.attn(self.norm1(x), rope_cos, rope_sin)
    x = x + self.mlp(self.norm2(x))
    return shard(x, (FRAMES, PATCHES, "activation_embed"))


class EvaVisionTransformer(nnx.Module):
  """Frames [n, height, width, channels] (normalised pixels) -> patch features [n, gh * gw, width]."""

  def __init__(self, cfg: VisionConfig, run: RunOptions = RunOptions(), *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype = run.dtype
    param_dtype = run.params_dtype
    self.remat_policy = run.remat_policy
    p, c, w = cfg.patch_size, cfg.num_channels, cfg.width
    init = nnx.initializers.normal(stddev=0.02)
    # Conv2d(k = s = patch) as a matmul over flattened patches; kernel kept in conv layout [p, p, c, w].
    self.patch_embed_kernel = param(rngs, init, (p, p, c, w), ("patch", "patch", "channels", "embed"), param_dtype)
    self.patch_embed_bias = param(rngs, nnx.initializers.zeros_init(), (w,), ("embed",), param_dtype)
    self.cls_token = param(rngs, init, (w,), ("embed",), param_dtype)
    self.pos_embed = param(rngs, init, (1 + cfg.trained_grid**2, w), ("positions", "embed"), param_dtype)
    self.blocks = create_stack(lambda r: EvaBlock(cfg, run, rngs=r), cfg.num_layers, rngs)
    self.norm = LayerNorm(w, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def _patchify(self, frames):
    n, h, w, c = frames.shape
    p = self.cfg.patch_size
    gh, gw = self.cfg.grid_for(h, w)
    patches = frames.reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, p * p * c)
    kernel = self.patch_embed_kernel[...].astype(self.dtype).reshape(p * p * c, -1)
    x = jnp.einsum(
        "npk,kd->npd",
        patches.astype(self.dtype),
        kernel,
        precision=jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None,
    )
    return x + self.patch_embed_bias[...].astype(self.dtype), (gh, gw)

  def _pos_embed(self, gh: int, gw: int) -> jax.Array:
    """[1 + gh * gw, width]: the trained table, resized (torch F.interpolate semantics) if the grid differs."""
    table = self.pos_embed[...]
    g = self.cfg.trained_grid
    if (gh, gw) == (g, g):
      return table
    kw = dict(method=self.cfg.pos_embed_interpolation, antialias=self.cfg.pos_embed_antialias)
    grid = table[1:].reshape(g, g, -1).astype(jnp.float32)
    rows = jnp.asarray(resize_weights(g, gh, **kw))
    cols = jnp.asarray(resize_weights(g, gw, **kw))
    resized = jnp.einsum("hi,wj,ijd->hwd", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([table[:1], resized.reshape(gh * gw, -1).astype(table.dtype)], axis=0)

  def __call__(self, frames: jax.Array) -> jax.Array:
    """frames: [n, height, width, channels] -> [n, gh * gw, width] at `cfg.feature_tap`."""
    frames = shard(frames, (FRAMES, None, None, None))
    x, (gh, gw) = self._patchify(frames)
    n = x.shape[0]
    cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self._pos_embed(gh, gw).astype(self.dtype)
    x = shard(x, (FRAMES, PATCHES, "activation_embed"))
    cos, sin = (
        jnp.asarray(t)
        for t in eva_rope_tables(gh, gw, self.cfg.head_width, self.cfg.pt_hw_seq_len, self.cfg.rope_theta)
    )

    def body(block, carry):
      h, _ = carry
      return block(h, cos, sin), h

    x, before_last = run_stack(self.blocks, (x, x), body, self.remat_policy)
    tap = self.cfg.feature_tap
    if tap == "penultimate":
      x = before_last
    elif tap == "last_postnorm":
      x = self.norm(x)
    return x[:, 1:]
