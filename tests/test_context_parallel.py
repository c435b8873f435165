"""Ring and all-gather attention == dense reference, forward and gradients, on asymmetric meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kangaroo_jax.attention import all_gather_attention, decode_attention, reference_attention, ring_attention
from kangaroo_jax.attention.context_parallel import ContextParallelError
from kangaroo_jax.attention.layout import inverse_order, zigzag_order
from kangaroo_jax.attention.ring import tile_is_masked
from kangaroo_jax.parallel.mesh import MeshConfig, make_mesh
from tests.helpers import max_rel_error

TOL = 1e-5


def _qkv(b, s, h, kvh, d, seed=0):
  rng = np.random.default_rng(seed)
  mk = lambda n: jnp.asarray(rng.normal(size=(b, s, n, d)).astype(np.float32))
  return mk(h), mk(kvh), mk(kvh)


def _packed(b, lengths):
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
  pos = np.concatenate([np.arange(n) for n in lengths])
  return jnp.asarray(np.tile(pos, (b, 1))), jnp.asarray(np.tile(seg, (b, 1)))


def _check(impl, mesh_cfg, *, causal, packed, zigzag, b=2, s=48, h=4, kvh=2, d=8, **impl_kw):
  mesh = make_mesh(mesh_cfg)
  q, k, v = _qkv(b, s, h, kvh, d)
  if packed:
    pos, seg = _packed(b, [s // 3 + 1, s - s // 3 - 1])
  else:
    pos, seg = jnp.tile(jnp.arange(s), (b, 1)), None
  order = zigzag_order(s, mesh.shape["context"]) if zigzag else np.arange(s)
  q, k, v, pos = q[:, order], k[:, order], v[:, order], pos[:, order]
  seg = None if seg is None else seg[:, order]
  kw = dict(causal=causal, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape).astype(np.float32))

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, **kw) * weights)

  ref, ref_grads = jax.value_and_grad(lambda *a: loss(reference_attention, *a), argnums=(0, 1, 2))(q, k, v)
  ref_out = reference_attention(q, k, v, **kw)
  fn = lambda q, k, v, **a: impl(q, k, v, **a, **impl_kw)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda q, k, v: fn(q, k, v, **kw))(q, k, v)
    val, grads = jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(q, k, v)
  assert max_rel_error(out, ref_out) <= TOL
  # The loss is a sum with cancellation: compare against the sum of magnitudes.
  assert abs(float(val) - float(ref)) <= TOL * float(jnp.sum(jnp.abs(ref_out * weights)))
  for name, g, rg in zip("qkv", grads, ref_grads):
    assert max_rel_error(g, rg) <= TOL, name


MESHES = {
    "ctx8": MeshConfig(fsdp=1, context=8),
    "fsdp2_ctx4": MeshConfig(fsdp=2, context=4),
    "fsdp4_ctx2": MeshConfig(fsdp=4, context=2),
    "fsdp2_ctx2_tp2": MeshConfig(fsdp=2, context=2, tensor=2),
}


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize(
    "causal,packed,zigzag", [(True, False, False), (True, True, True), (False, True, False), (True, False, True)]
)
def test_ring_matches_reference(mesh, causal, packed, zigzag):
  # s=48 (not a power of two) and block sizes that force several tiles per shard.
  s = 48 if mesh != "ctx8" else 80
  b = 4 if mesh == "fsdp4_ctx2" else 2
  _check(ring_attention, MESHES[mesh], causal=causal, packed=packed, zigzag=zigzag, s=s, b=b, block_q=4, block_kv=3)


@pytest.mark.parametrize("mesh", ["ctx8", "fsdp2_ctx2_tp2"])
@pytest.mark.parametrize("causal,packed,zigzag", [(True, True, True), (False, False, False)])
def test_all_gather_matches_reference(mesh, causal, packed, zigzag):
  _check(
      all_gather_attention, MESHES[mesh], causal=causal, packed=packed, zigzag=zigzag, s=80 if mesh == "ctx8" else 48
  )


def test_ring_gqa_single_kv_head():
  _check(ring_attention, MeshConfig(fsdp=2, context=4), causal=True, packed=False, zigzag=True, h=6, kvh=1, s=40)


def test_zigzag_order_gives_each_device_an_early_and_a_late_chunk():
  order = zigzag_order(16, 4)
  assert order.reshape(4, 4).tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
  assert (order[inverse_order(order)] == np.arange(16)).all()
  with pytest.raises(ValueError, match="divisible by 2 \\* context"):
    zigzag_order(12, 4)


def test_tile_skipping_predicate_is_conservative():
  """A tile reported masked really has no live pair (checked exhaustively against the dense mask)."""
  rng = np.random.default_rng(0)
  for _ in range(200):
    qp, kp = rng.integers(0, 20, (1, 4)), rng.integers(0, 20, (1, 3))
    qs, ks = rng.integers(1, 4, (1, 4)), rng.integers(1, 4, (1, 3))
    live = (qs[0][:, None] == ks[0][None]) & (qp[0][:, None] >= kp[0][None])
    if tile_is_masked(True, qp, kp, qs, ks):
      assert not live.any()


def test_invalid_shapes_give_clear_errors():
  mesh = make_mesh(MeshConfig(fsdp=2, context=2, tensor=2))
  with jax.set_mesh(mesh):
    q, k, v = _qkv(2, 18, 4, 2, 8)  # 18 % 2 == 0 but heads fine; use 17 for the length error
    q17, k17, v17 = _qkv(2, 17, 4, 2, 8)
    with pytest.raises(ContextParallelError, match="length 17 is not divisible by the context axis"):
      ring_attention(q17, k17, v17, causal=True)
    q3, k3, v3 = _qkv(2, 18, 3, 3, 8)
    with pytest.raises(ContextParallelError, match="divisible by tensor=2"):
      ring_attention(q3, k3, v3, causal=True)
    qb, kb, vb = _qkv(3, 18, 4, 2, 8)
    with pytest.raises(ContextParallelError, match="batch 3 is not divisible by data\\*fsdp = 2"):
      all_gather_attention(qb, kb, vb, causal=True)


@pytest.mark.parametrize("mesh", ["ctx8", "fsdp2_ctx2_tp2"])
def test_decode_against_context_sharded_cache(mesh):
  b, t, h, kvh, d = 2, 32, 4, 2, 8
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(b, 1, h, d)).astype(np.float32))
  _, k, v = _qkv(b, t, h, kvh, d, seed=4)
  filled = np.array([20, 27])
  cache_pos = jnp.tile(jnp.arange(t), (b, 1))
  valid = jnp.asarray(np.arange(t)[None] < filled[:, None])
  q_pos = jnp.asarray(filled - 1)[:, None]
  # Reference: causal attention of the last filled token over the filled prefix.
  ref = np.stack(
      [
          np.asarray(
              reference_attention(q[i : i + 1], k[i : i + 1, : filled[i]], v[i : i + 1, : filled[i]], causal=False)
          )[0]
          for i in range(b)
      ]
  )
  with jax.set_mesh(make_mesh(MESHES[mesh])):
    got = jax.jit(lambda *a: decode_attention(*a[:3], q_positions=a[3], cache_positions=a[4], cache_valid=a[5]))(
        q, k, v, q_pos, cache_pos, valid
    )
  assert max_rel_error(got, ref) <= TOL
