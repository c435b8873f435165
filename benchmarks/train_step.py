"""Train-step benchmark: step time, tokens/s, compiled vs model FLOPs, for `tiny` and a ~100M config.

    JAX_PLATFORMS=cpu python benchmarks/train_step.py [--steps 3]

Prints one JSON line. FLOP utilisation = model FLOPs (train/metrics.py: from the shapes, causal
attention halved, padding excluded) / executed matmul FLOPs of the step: what remat recomputation,
padding, unused frame slots and the full (unmasked) attention matrices add.

Executed matmul FLOPs are counted on the step's jaxpr (2 x M x N x K per dot_general / convolution),
with every scan body multiplied by its trip count. XLA's cost analysis is also reported
(`xla_tflops_loop_body_once`) but not used: it counts a while-loop body once, and the layers run
under `nnx.scan` (kangaroo_jax/layers/scan.py, no unrolled variant), so it misses all but one layer
of each stack (the reason an earlier version reported a utilisation above 1). It also counts
elementwise ops, which the model FLOPs leave out. `check_one_layer` (tiny only) compiles the same
step with one layer per stack, where the loop count does not matter, to show how the two counters
compare when XLA sees everything.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.extend.core as jax_core  # noqa: E402
import ml_collections  # noqa: E402

from configs.common import base  # noqa: E402
from train.config import from_configdict  # noqa: E402

_100M = dict(
    llm=dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_ids=[2],
    ),
    vision=dict(image_size=112, patch_size=14, width=256, num_layers=4, head_width=64, mlp_hidden=683, pt_hw_seq_len=8),
)


class UnknownTripCount(ValueError):
  """A while loop (not a scan) holds matmuls: how often it runs is not in the program."""


def _sub_jaxprs(value):
  if isinstance(value, jax_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def matmul_flops(jaxpr) -> float:
  """2 x M x N x K summed over the dot_generals and convolutions of a jaxpr, recursing into nested
  jaxprs (jit, remat, custom_vjp, shard_map); a scan body counts `length` times, a cond its costliest
  branch."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features per group, *spatial)
      window = math.prod(rhs[d] for d in spec[1:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * window
    elif name == "cond":
      total += max(matmul_flops(b) for b in eqn.params["branches"])
    elif name == "while":
      if matmul_flops(eqn.params["body_jaxpr"]) + matmul_flops(eqn.params["cond_jaxpr"]):
        raise UnknownTripCount(f"matmuls inside a while loop at {eqn.source_info.traceback}")
    else:
      inner = sum(matmul_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def _config(name: str, remat: str, one_layer: bool = False):
  c = base(f"bench_{name}")
  c.model.preset = "tiny"
  if name == "tiny":
    c.run.remat_policy = remat
    if one_layer:
      c.model.overrides = dict(llm=dict(num_layers=1), vision=dict(num_layers=1))
    c.data.update(source="synthetic", batch_size=8, seq_len=256, frame_size=56, max_frames=8, num_frames=8)
  else:
    c.model.overrides = dict(_100M)
    c.run.update(remat_policy=remat, compute_dtype="float32")
    c.data.update(source="synthetic", batch_size=4, seq_len=1024, frame_size=112, max_frames=8, num_frames=8)
  c.mesh.fsdp = -1
  return from_configdict(ml_collections.ConfigDict(c.to_dict()))


def _step_and_inputs(cfg):
  """The jitted train step of `cfg`, a fresh state and one batch (host and global)."""
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from kangaroo_jax.data.global_batch import make_global_batch
  from kangaroo_jax.data.video import normalize_frames
  from kangaroo_jax.models import Kangaroo
  from kangaroo_jax.model_tree import init_sharded
  from kangaroo_jax.parallel.mesh import make_mesh
  from train.metrics import FlopModel, batch_stats
  from train.optim import is_trainable, make_optimizer
  from train.params import ModelDef, flatten, partition
  from train.step import init_state, make_train_step, state_shardings
  from train.synthetic import SyntheticIterator

  mesh = make_mesh(cfg.mesh)
  md = ModelDef(cfg.model, cfg.run)
  paths = list(flatten(md.shapes()))
  pred = functools.partial(is_trainable, cfg.optim)
  tx, sched = make_optimizer(cfg.optim, 100, paths)
  params = md.to_params(init_sharded(lambda: Kangaroo(cfg.model, cfg.run, rngs=nnx.Rngs(0)), mesh))
  rep = NamedSharding(mesh, PartitionSpec())
  tsh, fsh = partition(md.shardings(mesh), pred)
  abstract = jax.eval_shape(lambda p, f: init_state(p, f, tx), *partition(md.shapes(), pred))
  ssh = state_shardings(abstract, tsh, fsh, rep)
  it = SyntheticIterator(
      cfg.model,
      global_batch=cfg.data.batch_size,
      seq_len=cfg.data.seq_len,
      frame_size=cfg.data.frame_size,
      max_frames=cfg.data.max_frames,
  )
  host = next(it)
  batch = make_global_batch(host, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda p: init_state(*partition(p, pred), tx), out_shardings=ssh)(params)
    step = jax.jit(make_train_step(md, tx, sched, normalize_frames, 1), donate_argnums=0, out_shardings=(ssh, None))
  model_flops = FlopModel.build(
      cfg.model, {p: s.shape for p, s in flatten(md.shapes()).items()}, set(paths), cfg.data.frame_size
  ).train_flops(*batch_stats(host))
  return mesh, md, step, state, host, batch, model_flops


def _counts(mesh, step, state, batch):
  """(lowered step, executed matmul FLOPs from the jaxpr, XLA's cost-analysis FLOPs)."""
  with jax.set_mesh(mesh):
    executed = matmul_flops(jax.make_jaxpr(step)(state, batch))
    lowered = step.lower(state, batch)
  return lowered, executed, float(lowered.cost_analysis()["flops"])


def bench(name: str, remat: str, steps: int) -> dict:
  cfg = _config(name, remat)
  mesh, md, step, state, host, batch, model_flops = _step_and_inputs(cfg)
  t = time.perf_counter()
  lowered, executed, xla_flops = _counts(mesh, step, state, batch)
  with jax.set_mesh(mesh):
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    times = []
    # The first call is timed too when it is the only one (the ~100M run on a CPU: a step is minutes).
    for _ in range(steps if steps == 1 else steps + 1):
      t = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  times = times if steps == 1 else times[1:]
  tokens = float((host["segment_ids"] > 0).sum())
  step_s = sorted(times)[len(times) // 2]
  out = dict(
      config=name,
      remat=remat,
      params_m=round(md.num_params() / 1e6, 2),
      batch=cfg.data.batch_size,
      seq_len=cfg.data.seq_len,
      frames_per_row=cfg.data.max_frames,
      timed_steps=len(times),
      step_s=round(step_s, 4),
      tokens_per_s=round(tokens / step_s, 1),
      compile_s=round(compile_s, 1),
      model_tflops=round(model_flops / 1e12, 5),
      executed_matmul_tflops=round(executed / 1e12, 5),
      flop_utilisation=round(model_flops / executed, 3),
      xla_tflops_loop_body_once=round(xla_flops / 1e12, 5),
      achieved_model_tflops_per_s=round(model_flops / step_s / 1e12, 4),
  )
  if name == "tiny":
    mesh1, _, step1, state1, _, batch1, model1 = _step_and_inputs(_config(name, remat, one_layer=True))
    _, executed1, xla1 = _counts(mesh1, step1, state1, batch1)
    out["check_one_layer"] = dict(
        model_tflops=round(model1 / 1e12, 6),
        executed_matmul_tflops=round(executed1 / 1e12, 6),
        xla_tflops=round(xla1 / 1e12, 6),
    )
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--configs", default="tiny,100m")
  p.add_argument("--remat", default="none,full")
  a = p.parse_args()
  runs = [bench(c, r, a.steps) for c in a.configs.split(",") for r in a.remat.split(",")]
  print(json.dumps(dict(device=jax.devices()[0].device_kind, num_devices=jax.device_count(), runs=runs)))


if __name__ == "__main__":
  main()
