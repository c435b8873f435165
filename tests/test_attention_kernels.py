"""Fused per-device kernels: splash (Pallas TPU, interpret mode here) and the cuDNN call, against the dense
reference (forward and gradients), and the kernel choice made from the mesh's platform, not the host's.

The splash numerics run in Pallas interpret mode on CPU; that they also lower for a real TPU is checked
by ahead-of-time compilation in tests/test_tpu_aot.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kangaroo_jax.attention import all_gather_attention, dense_attention, reference_attention, ring_attention
from kangaroo_jax.attention.context_parallel import ContextParallelError, cudnn_attention, resolve_kernel
from kangaroo_jax.attention.splash import splash_block
from kangaroo_jax.parallel.mesh import MeshConfig, make_mesh
from tests.helpers import max_rel_error
from tests.test_context_parallel import _check

pytestmark = pytest.mark.xdist_group("splash_interpret")


@pytest.mark.parametrize(
    "mesh_cfg,zigzag", [(MeshConfig(fsdp=2, context=4), True), (MeshConfig(data=2, context=2, tensor=2), False)]
)
def test_splash_ring_matches_reference(mesh_cfg, zigzag):
  """Per-step splash kernels merged by log-sum-exp; zigzag (step cases j<i / j>i) and contiguous layouts,
  packed segments, GQA, heads split over `tensor`."""
  n = mesh_cfg.context
  _check(
      ring_attention,
      mesh_cfg,
      causal=True,
      packed=True,
      zigzag=zigzag,
      s=256 * n,
      h=4,
      kvh=2,
      d=32,
      kernel="splash",
      layout="zigzag" if zigzag else "natural",
  )


def test_splash_all_gather_matches_reference():
  """Kernel built for the global mask with q_seq_shards = context, its mask tables sharded like the queries."""
  _check(
      all_gather_attention,
      MeshConfig(fsdp=2, context=4),
      causal=True,
      packed=True,
      zigzag=False,
      s=512,
      h=4,
      kvh=1,
      d=32,
      kernel="splash",
      layout="natural",
  )


def test_splash_dense_without_mesh_matches_reference():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(2, 256, 4, 32)).astype(np.float32))
  k, v = (jnp.asarray(rng.normal(size=(2, 256, 2, 32)).astype(np.float32)) for _ in range(2))
  seg = jnp.asarray(np.tile([1] * 100 + [2] * 156, (2, 1)))
  pos = jnp.asarray(np.tile(np.concatenate([np.arange(100), np.arange(156)]), (2, 1)))
  kw = dict(causal=True, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
  got = jax.jit(lambda q, k, v: dense_attention(q, k, v, kernel="splash", layout="natural", **kw))(q, k, v)
  assert max_rel_error(got, reference_attention(q, k, v, **kw)) <= 1e-5


def test_kernel_choice_follows_the_mesh_platform():
  assert jax.default_backend() == "cpu"
  lengths = dict(q_len=1024, kv_len=1024)
  with jax.set_mesh(make_mesh(MeshConfig(fsdp=-1))):
    assert resolve_kernel("auto", dtype=jnp.bfloat16, layout="natural", **lengths) == "xla"
  tpu = pytest.importorskip("jax.experimental.topologies").get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  with jax.set_mesh(make_mesh(MeshConfig(fsdp=-1), devices=tpu.devices)):
    assert resolve_kernel("auto", dtype=jnp.bfloat16, layout="natural", **lengths) == "splash"
    assert resolve_kernel("auto", dtype=jnp.bfloat16, layout="zigzag", ring=True, **lengths) == "splash"
    # Positions in no known order (KV-cache prefill) or lengths Mosaic cannot tile: XLA.
    assert resolve_kernel("auto", dtype=jnp.bfloat16, layout=None, **lengths) == "xla"
    assert resolve_kernel("auto", dtype=jnp.bfloat16, layout="natural", q_len=1000, kv_len=1000) == "xla"
  with pytest.raises(ContextParallelError, match="multiples of 128"):
    resolve_kernel("splash", dtype=jnp.float32, layout="natural", q_len=100, kv_len=100)
  with pytest.raises(ValueError, match="unknown attention kernel"):
    resolve_kernel("flash", dtype=jnp.float32, layout=None, q_len=8, kv_len=8)


def test_splash_block_obeys_mosaic_rules():
  assert (
      splash_block(8448) == 384 and splash_block(4224) == 384 and splash_block(1024) == 512 and splash_block(640) == 128
  )
  assert splash_block(1000) is None and splash_block(64) is None


def test_reference_in_query_chunks_matches_unchunked():
  """Chunked queries (rematerialised per chunk) give the same values and gradients as one dense block."""
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(1, 96, 4, 8)).astype(np.float32))
  k, v = (jnp.asarray(rng.normal(size=(1, 96, 2, 8)).astype(np.float32)) for _ in range(2))
  loss = lambda block: (lambda q, k, v: jnp.sum(jnp.sin(reference_attention(q, k, v, causal=True, block_q=block))))
  for a, b in zip(jax.grad(loss(32), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(96), argnums=(0, 1, 2))(q, k, v)):
    assert max_rel_error(a, b) <= 1e-6
  hlo = jax.jit(jax.grad(loss(32))).lower(q, k, v).compile().as_text()
  assert "f32[1,2,2,96,96]" not in hlo  # no full [q, kv] score matrix


def test_bf16_attention_multiplies_in_bf16_with_f32_accumulation():
  q = jnp.zeros((1, 64, 4, 16), jnp.bfloat16)
  k = v = jnp.zeros((1, 64, 2, 16), jnp.bfloat16)
  hlo = jax.jit(lambda q, k, v: reference_attention(q, k, v, causal=True)).lower(q, k, v).as_text()
  assert "HIGHEST" not in hlo
  dots = [l for l in hlo.splitlines() if "dot_general" in l]
  assert dots and all("bf16" in l.split("dot_general")[1].split(")")[0] for l in dots), dots


def test_cudnn_call_plumbing_matches_reference():
  """The jax.nn.dot_product_attention call used for cuDNN on GPU, run with XLA: same mask and GQA handling."""
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(2, 12, 4, 8)).astype(np.float32))
  k, v = (jnp.asarray(rng.normal(size=(2, 12, 2, 8)).astype(np.float32)) for _ in range(2))
  pos = jnp.asarray(np.tile(np.concatenate([np.arange(5), np.arange(7)]), (2, 1)))
  seg = jnp.asarray(np.tile([1] * 5 + [2] * 7, (2, 1)))
  kw = dict(causal=True, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg, scale=None)
  got = cudnn_attention(q, k, v, implementation="xla", **kw)
  assert max_rel_error(got, reference_attention(q, k, v, **kw)) <= 1e-5
