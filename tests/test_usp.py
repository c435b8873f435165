"""USP (Ulysses all-to-all x ring) == dense reference, forward and gradients, on 8 fake devices.

Splits of the context axis: 2x4 and 4x2 (Ulysses x ring) over context 8, 2x2 next to fsdp, pure
Ulysses (ring of 1) next to tensor parallelism; packed segments, GQA, zigzag and natural layouts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kangaroo_jax.attention import get_attention, usp_attention
from kangaroo_jax.attention.context_parallel import ContextParallelError, ulysses_degree
from kangaroo_jax.attention.layout import zigzag_order
from kangaroo_jax.attention.ring import ring_permutation
from kangaroo_jax.attention.usp import from_ring_layout, groups, to_ring_layout
from kangaroo_jax.parallel.mesh import MeshConfig, make_mesh
from tests.test_context_parallel import _check, _qkv


@pytest.mark.parametrize(
    "mesh_cfg,ulysses,packed,layout",
    [
        (MeshConfig(fsdp=1, context=8), 2, True, "zigzag"),  # 2 x 4
        (MeshConfig(fsdp=1, context=8), 4, True, "zigzag"),  # 4 x 2
        (MeshConfig(fsdp=1, context=8), 4, False, None),  # positions only: XLA masks by position
        (MeshConfig(fsdp=2, context=4), 2, False, "natural"),  # 2 x 2, contiguous ring
        (MeshConfig(fsdp=2, context=2, tensor=2), 2, True, "zigzag"),  # pure Ulysses, heads also over tensor
    ],
)
def test_usp_matches_reference(mesh_cfg, ulysses, packed, layout):
  n = mesh_cfg.context
  _check(
      usp_attention,
      mesh_cfg,
      causal=True,
      packed=packed,
      zigzag=layout == "zigzag",
      s=16 * n,
      h=8,
      kvh=4,
      block_q=4,
      block_kv=3,
      ulysses=ulysses,
      layout=layout,
  )


def test_usp_non_causal_and_automatic_degree():
  # kvh=2 over context 8: the automatic degree is 2 (the largest that divides both), a 2 x 4 split.
  assert ulysses_degree(0, 8, 2) == 2 and ulysses_degree(0, 8, 8) == 8 and ulysses_degree(0, 6, 4) == 2
  _check(usp_attention, MeshConfig(fsdp=1, context=8), causal=False, packed=True, zigzag=False, s=64, h=4, kvh=2)


@pytest.mark.xdist_group("splash_interpret")
def test_usp_with_splash_kernels_matches_reference():
  """Splash (interpret mode) per ring step after the all-to-all: the gathered zigzag pieces must be reordered
  into the ring's zigzag layout, or splash's index-based causal mask would be wrong."""
  _check(
      usp_attention,
      MeshConfig(fsdp=2, context=4),
      causal=True,
      packed=True,
      zigzag=True,
      s=1024,
      h=4,
      kvh=2,
      d=32,
      ulysses=2,
      kernel="splash",
      layout="zigzag",
  )


def _group_order(ulysses: int, shard: int) -> np.ndarray:
  """The zigzag reorder as an index permutation (an independent statement of `to_ring_layout`): the early halves
  of members 0..u-1, then the late halves of members u-1..0."""
  pieces = np.arange(ulysses * shard).reshape(ulysses, 2, shard // 2)
  return np.concatenate([pieces[:, 0].reshape(-1), pieces[::-1, 1].reshape(-1)])


def test_ring_layout_turns_global_zigzag_into_ring_zigzag():
  """Token indices held by each group after the all-to-all, reordered, are the zigzag layout over the rings."""
  seq, n, u = 96, 8, 2
  r = n // u
  per_device = zigzag_order(seq, n).reshape(n, -1)
  ring_layout = zigzag_order(seq, r).reshape(r, -1)
  for j, members in enumerate(groups(n, u)):
    gathered = np.concatenate([per_device[c] for c in members])
    np.testing.assert_array_equal(np.asarray(to_ring_layout(gathered[None], u, "zigzag"))[0], ring_layout[j])
  # One ring: the group holds the whole sequence, in natural order.
  gathered = np.concatenate([zigzag_order(seq, 4).reshape(4, -1)[c] for c in range(4)])
  np.testing.assert_array_equal(np.asarray(to_ring_layout(gathered[None], 4, "zigzag"))[0], np.arange(seq))


def test_ring_layout_slices_equal_the_permutation_and_invert():
  u, shard = 4, 6
  x = jnp.arange(2 * u * shard * 3).reshape(2, u * shard, 3)
  y = to_ring_layout(x, u, "zigzag")
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x)[:, _group_order(u, shard)])
  np.testing.assert_array_equal(np.asarray(from_ring_layout(y, u, "zigzag")), np.asarray(x))
  assert to_ring_layout(x, u, "contiguous") is x


def test_rings_run_side_by_side_over_the_context_axis():
  # context 8 as 2 rings... of 4 members with stride 2: member j of a ring is device j * 2 + (ring id).
  assert ring_permutation(4, 2) == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 0), (7, 1)]
  assert ring_permutation(3) == [(0, 1), (1, 2), (2, 0)]


def test_usp_bad_splits_give_clear_errors():
  mesh = make_mesh(MeshConfig(fsdp=1, context=8))
  q, k, v = _qkv(2, 64, 4, 2, 8)
  with jax.set_mesh(mesh):
    with pytest.raises(ContextParallelError, match="must divide the context axis"):
      jax.jit(lambda q, k, v: usp_attention(q, k, v, causal=True, ulysses=3))(q, k, v)
    with pytest.raises(ContextParallelError, match="kv heads per device"):
      jax.jit(lambda q, k, v: usp_attention(q, k, v, causal=True, ulysses=4))(q, k, v)


def test_usp_is_selectable_like_the_other_impls():
  fn = get_attention("usp", block_size=8, ulysses=2)
  assert fn.keywords["ulysses"] == 2 and fn.keywords["block_q"] == 8
  q, k, v = _qkv(1, 32, 4, 2, 8)
  # Without a mesh it is dense attention.
  out = fn(q, k, v, causal=True)
  ref = get_attention("reference")(q, k, v, causal=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
  assert out.dtype == jnp.float32


def test_config_checks_usp_splits_before_tracing():
  from kangaroo_jax.config import preset
  from kangaroo_jax.parallel.mesh import MeshError
  from kangaroo_jax.parallel.validate import validate_mesh_for_model

  from kangaroo_jax.run_options import RunOptions

  cfg, run = preset("tiny"), RunOptions(attention_impl="usp", ulysses_degree=4)  # 2 kv heads: at most 2-way
  with pytest.raises(MeshError) as e:
    validate_mesh_for_model(cfg, run, {"context": 8}, batch=2, seq_len=40)
  msg = str(e.value)
  assert "ulysses_degree 4" in msg and "num_kv_heads 2" in msg and "2*context for zigzag" in msg
  validate_mesh_for_model(cfg, run.replace(ulysses_degree=2), {"context": 8}, batch=2, seq_len=48)
  with pytest.raises(ValueError, match="ulysses_degree"):
    RunOptions(ulysses_degree=-1)
