"""Why executed long-context runs on fake CPU devices use more memory than XLA's analysis predicts.

Runs the same shard_map'd loop (a 512x512 attention-like tile per iteration, the ring's unit of
work) with a short and a long trip count, in fresh processes, on 1 and on 8 fake CPU devices, and
prints the peak RSS of each. Buffer assignment is identical for both trip counts, so any growth
with the trip count is memory the XLA:CPU runtime holds per executed iteration until the
execution ends. The ring attention at S tokens on n devices executes ~(S/n/block)^2 * n tiles per
pass, so such per-iteration memory grows quadratically with S: this is what makes the executed
`benchmarks/long_context.py --run` peak grow ~4x per doubling while its compiled temp grows ~2x.

Measured here (2 cores): with the ring's nested loops (8 outer steps x N inner tiles), 8 fake
devices retain ~23 KB per inner iteration per device (400 vs 25 iterations: +637 MB vs +83 MB of
peak RSS), 1 device retains nothing. Real accelerators run each device's loops on its own stream
and do not show this; on CPU, larger ring blocks (fewer tiles) trade it for bigger tile buffers.

  python benchmarks/cpu_loop_memory.py        -> one JSON line
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = r"""
import resource, sys
import jax, jax.numpy as jnp
from jax.sharding import PartitionSpec as P
iterations, devices = int(sys.argv[1]), int(sys.argv[2])
mesh = jax.make_mesh((devices,), ("c",), axis_types=(jax.sharding.AxisType.Auto,))

def per_device(q, k):
  q, k = q[0], k[0]
  def tile(acc, _):
    scores = jnp.einsum("hqd,hkd->hqk", q + acc[0, 0, 0], k)
    return acc + jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(scores), k), None
  def ring_step(acc, _):  # the ring's outer loop: one pass over the local tiles per ring step
    return jax.lax.scan(tile, acc, None, length=iterations)[0], None
  return jax.lax.scan(ring_step, q, None, length=8)[0][None]

x = jnp.ones((devices, 2, 512, 64))
step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("c"), P("c")), out_specs=P("c")))
compiled = step.lower(x, x).compile()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
jax.block_until_ready(compiled(x, x))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before * 1024, after * 1024, compiled.memory_analysis().temp_size_in_bytes)
"""


def measure(iterations: int, devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  out = subprocess.run(
      [sys.executable, "-c", _CHILD, str(iterations), str(devices)], env=env, check=True, capture_output=True, text=True
  ).stdout.split()
  before, after, temp = (int(v) for v in out[-3:])
  return dict(
      iterations=iterations,
      devices=devices,
      peak_rss_after_compile=before,
      peak_rss_after_run=after,
      run_growth_bytes=after - before,
      compiled_temp_bytes_per_device=temp,
  )


def main() -> None:
  short, long = 25, 400
  rows = [measure(n, d) for d in (1, 8) for n in (short, long)]
  per_iteration = {}
  for d in (1, 8):
    a, b = (r for r in rows if r["devices"] == d)
    per_iteration[d] = round((b["run_growth_bytes"] - a["run_growth_bytes"]) / ((long - short) * 8 * d))
  print(
      json.dumps(
          dict(
              benchmark="cpu_loop_memory",
              runs=rows,
              retained_bytes_per_iteration_per_device={str(k): v for k, v in per_iteration.items()},
          )
      )
  )


if __name__ == "__main__":
  main()
