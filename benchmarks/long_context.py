"""Long-context attention figures on 8 fake CPU devices (deterministic: compile-time analyses only).

Prints one JSON line with:
  memory:  per-device compiled bytes (temp + arguments) of one attention layer fwd+bwd, ring vs the
           dense reference (GSPMD-sharded over `context`), at 8k / 32k / 128k tokens;
  balance: live (query x key) tiles of causal ring attention on the most loaded device, zigzag vs
           contiguous layout, times the lowered cost_analysis FLOPs of one tile;
  max_seq: the longest sequence whose fwd+bwd of a tiny-width 2-layer Llama compiles to <= 16 GB
           summed over the 8 devices. CAUTION: this is XLA:CPU's compile-time estimate, which misses
           buffers inside CPU fusions; measured peak RSS is 3-5x higher (use --run to measure).
Run: XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/long_context.py
     ... benchmarks/long_context.py --run 262144 full 2048   executes fwd+bwd at that length, prints time and peak RSS
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from kangaroo_jax.attention import reference_attention, ring_attention  # noqa: E402
from kangaroo_jax.attention.layout import zigzag_order  # noqa: E402
from kangaroo_jax.attention.ring import pick_block, tile_is_masked  # noqa: E402
from kangaroo_jax.config import LlamaConfig  # noqa: E402
from kangaroo_jax.models import LlamaForCausalLM  # noqa: E402
from kangaroo_jax.parallel import shard  # noqa: E402
from kangaroo_jax.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from kangaroo_jax.run_options import RunOptions  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 512
GB = 1 << 30


def _attention_bytes(impl, seq: int, mesh) -> int:
  spec = lambda n: jax.ShapeDtypeStruct((1, seq, n, HEAD_DIM), jnp.bfloat16)

  def loss(q, k, v):
    names = ("activation_batch", "activation_length", "activation_heads", None)
    q, k, v = (shard(x, names) for x in (q, k, v))
    return jnp.sum(impl(q, k, v, causal=True).astype(jnp.float32))

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec(HEADS), spec(KV_HEADS), spec(KV_HEADS)).compile()
  mem = compiled.memory_analysis()
  return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes)


def memory_table(mesh) -> list[dict]:
  rows = []
  for seq in (8192, 32768, 131072):
    ring = _attention_bytes(lambda *a, **k: ring_attention(*a, **k, block_q=BLOCK, block_kv=BLOCK), seq, mesh)
    dense = _attention_bytes(reference_attention, seq, mesh)
    rows.append(dict(seq=seq, ring_bytes=ring, dense_bytes=dense, ring_over_dense=round(ring / dense, 4)))
  return rows


def _live_tiles(order: np.ndarray, n: int, block: int) -> list[int]:
  """Live tiles per device over the whole ring, with the exact predicate the kernel uses."""
  pos = order.reshape(n, -1)
  seg = np.zeros_like(pos[0])[None]
  counts = []
  for dev in range(n):
    q_chunks = pos[dev].reshape(-1, block)
    live = 0
    for src in range(n):
      for qc in q_chunks:
        for kc in pos[src].reshape(-1, block):
          live += not tile_is_masked(True, qc[None], kc[None], seg[:, :block], seg[:, :block])
    counts.append(live)
  return counts


def balance(seq: int = 16384, n: int = 8) -> dict:
  block = pick_block(seq // n, BLOCK)
  tile = jax.ShapeDtypeStruct((1, block, HEADS, HEAD_DIM), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, block, KV_HEADS, HEAD_DIM), jnp.float32)
  flops_per_tile = (
      jax.jit(lambda q, k, v: reference_attention(q, k, v, causal=False)).lower(tile, kv, kv).cost_analysis()["flops"]
  )
  contiguous = _live_tiles(np.arange(seq), n, block)
  zigzag = _live_tiles(zigzag_order(seq, n), n, block)
  return dict(
      seq=seq,
      devices=n,
      block=block,
      flops_per_tile=flops_per_tile,
      contiguous_max_flops=max(contiguous) * flops_per_tile,
      zigzag_max_flops=max(zigzag) * flops_per_tile,
      contiguous_tiles_per_device=contiguous,
      zigzag_tiles_per_device=zigzag,
      zigzag_over_contiguous=round(max(zigzag) / max(contiguous), 4),
  )


def _model_bytes(seq: int, mesh) -> int:
  cfg = LlamaConfig(
      vocab_size=256,
      hidden_size=64,
      intermediate_size=128,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      max_position_embeddings=seq,
  )
  run = RunOptions(attention_impl="ring", remat_policy="full")
  model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, run, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params, ids):
    logits = nnx.merge(graphdef, params)(ids)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
  mem = compiled.memory_analysis()
  return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)


def max_sequence(mesh, budget: int = 16 * GB) -> dict:
  seq, best, tried = 32768, None, []
  while seq <= 1 << 21:
    total = _model_bytes(seq, mesh) * len(jax.devices())
    tried.append(dict(seq=seq, total_bytes=total))
    if total > budget:
      break
    best = seq
    seq *= 2
  return dict(budget_bytes=budget, max_seq=best, tried=tried)


def execute(seq: int, mesh, remat: str = "full", block: int = 512) -> dict:
  """Actually runs fwd+bwd of the tiny-width 2-layer model at `seq` tokens; peak RSS of this process.

  `block` is the ring tile length. On fake CPU devices the runtime holds memory per executed loop
  iteration until the run ends (benchmarks/cpu_loop_memory.py), so long runs want fewer, larger tiles.
  """
  import resource
  import time

  cfg = LlamaConfig(
      vocab_size=256,
      hidden_size=64,
      intermediate_size=128,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      max_position_embeddings=seq,
  )
  with jax.set_mesh(mesh):
    from kangaroo_jax.model_tree import init_sharded

    run = RunOptions(attention_impl="ring", remat_policy=remat, attention_block=block)
    model = init_sharded(lambda: LlamaForCausalLM(cfg, run, rngs=nnx.Rngs(0)), mesh)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, ids):
      logits = nnx.merge(graphdef, params)(ids)
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, seq)), jnp.int32)
    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    value, grads = step(params, ids)
    jax.block_until_ready(grads)
  return dict(
      seq=seq,
      block=block,
      seconds=round(time.perf_counter() - start, 1),
      loss=float(value),
      peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  )


def main():
  mesh = make_mesh(MeshConfig(fsdp=1, context=8))
  if len(sys.argv) > 2 and sys.argv[1] == "--run":
    remat = sys.argv[3] if len(sys.argv) > 3 else "full"
    block = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    print(json.dumps(dict(benchmark="long_context_run", remat=remat, **execute(int(sys.argv[2]), mesh, remat, block))))
    return
  result = dict(
      benchmark="long_context",
      backend=jax.default_backend(),
      devices=len(jax.devices()),
      mesh=dict(mesh.shape),
      memory=memory_table(mesh),
      balance=balance(),
      max_sequence=max_sequence(mesh),
  )
  print(json.dumps(result))


if __name__ == "__main__":
  main()
