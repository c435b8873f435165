"""Fused-kernel hooks: the Pallas attention tile (interpret mode on CPU) and the dense-kernel path.

The Pallas tile is the kernel TPU runs inside the ring's block step; here it is checked against the
jnp tile it replaces, alone and inside the full ring (forward and gradients), on a CPU mesh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kangaroo_jax.attention import reference_attention, ring_attention
from kangaroo_jax.attention.context_parallel import dense_local_attention, local_attention_kernel
from kangaroo_jax.attention.pallas_tiles import tile_backward_pallas, tile_forward_pallas
from kangaroo_jax.attention.ring import resolve_tile_impl
from kangaroo_jax.attention.tiles import tile_backward_jnp, tile_forward_jnp
from kangaroo_jax.parallel.mesh import MeshConfig, make_mesh
from tests.helpers import max_rel_error


def _tile_inputs(b=2, kvh=2, g=2, tq=8, tk=6, d=16, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  q, k, v, do = f(b, kvh, g, tq, d), f(b, tk, kvh, d), f(b, tk, kvh, d), f(b, kvh, g, tq, d)
  q_pos = jnp.asarray(np.tile(np.arange(10, 10 + tq), (b, 1)))
  kv_pos = jnp.asarray(np.tile(np.arange(7, 7 + tk), (b, 1)))
  q_seg = jnp.asarray(np.tile([1] * 5 + [2] * (tq - 5), (b, 1)))
  kv_seg = jnp.asarray(np.tile([1] * 3 + [2] * (tk - 3), (b, 1)))
  acc = (f(b, kvh, g, tq, d), jnp.abs(f(b, kvh, g, tq)) + 1, f(b, kvh, g, tq))
  return q, k, v, do, q_pos, kv_pos, q_seg, kv_seg, acc


@pytest.mark.parametrize("causal", [True, False])
def test_pallas_tile_forward_matches_jnp(causal):
  q, k, v, _, qp, kp, qs, ks, acc = _tile_inputs()
  want = tile_forward_jnp(q, k, v, qp, kp, qs, ks, *acc, causal=causal, scale=0.25)
  got = tile_forward_pallas(q, k, v, qp, kp, qs, ks, *acc, causal=causal, scale=0.25)
  for g, w in zip(got, want):
    assert max_rel_error(g, w) <= 1e-6


@pytest.mark.parametrize("causal", [True, False])
def test_pallas_tile_backward_matches_jnp(causal):
  q, k, v, do, qp, kp, qs, ks, _ = _tile_inputs(seed=1)
  rng = np.random.default_rng(2)
  lse = jnp.asarray(rng.normal(size=q.shape[:-1]).astype(np.float32)) + 3.0
  delta = jnp.asarray(rng.normal(size=q.shape[:-1]).astype(np.float32))
  want = tile_backward_jnp(q, k, v, do, lse, delta, qp, kp, qs, ks, causal=causal, scale=0.25)
  got = tile_backward_pallas(q, k, v, do, lse, delta, qp, kp, qs, ks, causal=causal, scale=0.25)
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert max_rel_error(g, w) <= 1e-6, name


def test_ring_with_pallas_tiles_matches_reference():
  mesh = make_mesh(MeshConfig(fsdp=2, context=4))
  rng = np.random.default_rng(0)
  b, s, h, kvh, d = 2, 32, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(b, s, h, d)).astype(np.float32))
  k, v = (jnp.asarray(rng.normal(size=(b, s, kvh, d)).astype(np.float32)) for _ in range(2))
  w = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
  loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v) * w))
  ref_fn = lambda q, k, v: reference_attention(q, k, v, causal=True)
  ring_fn = lambda q, k, v: ring_attention(q, k, v, causal=True, block_q=4, block_kv=4, tile_impl="pallas")
  want = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
  with jax.set_mesh(mesh):
    out = jax.jit(ring_fn)(q, k, v)
    got = jax.jit(jax.grad(loss(ring_fn), argnums=(0, 1, 2)))(q, k, v)
  assert max_rel_error(out, ref_fn(q, k, v)) <= 1e-5
  for name, g, r in zip("qkv", got, want):
    assert max_rel_error(g, r) <= 1e-5, name


def test_kernel_selection_by_backend():
  assert jax.default_backend() == "cpu"
  assert resolve_tile_impl("auto") == "jnp"  # Pallas tiles are chosen automatically on TPU only
  assert resolve_tile_impl("pallas") == "pallas"
  assert local_attention_kernel("auto", jnp.bfloat16) == "xla"  # cuDNN only on GPU
  with pytest.raises(ValueError, match="unknown attention tile implementation"):
    resolve_tile_impl("triton")
  with pytest.raises(ValueError, match="unknown dense attention kernel"):
    local_attention_kernel("flash", jnp.float32)


def test_dense_local_attention_plumbing_matches_reference():
  """The jax.nn.dot_product_attention call used for cuDNN on GPU, run with XLA: same mask and GQA handling."""
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(2, 12, 4, 8)).astype(np.float32))
  k, v = (jnp.asarray(rng.normal(size=(2, 12, 2, 8)).astype(np.float32)) for _ in range(2))
  pos = jnp.asarray(np.tile(np.concatenate([np.arange(5), np.arange(7)]), (2, 1)))
  seg = jnp.asarray(np.tile([1] * 5 + [2] * 7, (2, 1)))
  kw = dict(causal=True, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg, scale=None)
  got = dense_local_attention(q, k, v, kernel="xla", **kw)
  assert max_rel_error(got, reference_attention(q, k, v, **kw)) <= 1e-5
