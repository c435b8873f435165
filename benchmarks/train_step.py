"""Train-step benchmark: step time, tokens/s, compiled vs model FLOPs, for `tiny` and a ~100M config.

    JAX_PLATFORMS=cpu python benchmarks/train_step.py [--steps 3]

Prints one JSON line. FLOP utilisation = model FLOPs (train/metrics.py: from the shapes, causal
attention halved, padding excluded) / FLOPs of the compiled step (XLA cost analysis of the lowered
step, backend independent): what remat recomputation, padding and unused frame slots add.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402

from configs.common import base  # noqa: E402
from train.config import from_configdict  # noqa: E402

_100M = dict(llm=dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                      num_kv_heads=4, head_dim=64, max_position_embeddings=4096, bos_token_id=1, eos_token_ids=[2]),
             vision=dict(image_size=112, patch_size=14, width=256, num_layers=4, head_width=64, mlp_hidden=683,
                         pt_hw_seq_len=8),
             compute_dtype="float32")


def _config(name: str, remat: str):
  c = base(f"bench_{name}")
  c.model.preset = "tiny"
  if name == "tiny":
    c.model.overrides = dict(remat_policy=remat)
    c.data.update(source="synthetic", batch_size=8, seq_len=256, frame_size=56, max_frames=8, num_frames=8)
  else:
    c.model.overrides = dict(_100M, remat_policy=remat)
    c.data.update(source="synthetic", batch_size=4, seq_len=1024, frame_size=112, max_frames=8, num_frames=8)
  c.mesh.fsdp = -1
  return from_configdict(ml_collections.ConfigDict(c.to_dict()))


def bench(name: str, remat: str, steps: int) -> dict:
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from kangaroo_jax.data.global_batch import make_global_batch
  from kangaroo_jax.data.video import normalize_frames
  from kangaroo_jax.models import Kangaroo
  from kangaroo_jax.parallel.mesh import init_sharded, make_mesh
  from train.metrics import FlopModel, batch_stats
  from train.optim import is_trainable, make_optimizer
  from train.params import ModelDef, flatten, partition
  from train.step import init_state, make_train_step, state_shardings
  from train.synthetic import SyntheticIterator

  cfg = _config(name, remat)
  mesh = make_mesh(cfg.mesh)
  md = ModelDef(cfg.model)
  paths = list(flatten(md.shapes()))
  pred = functools.partial(is_trainable, cfg.optim)
  tx, sched = make_optimizer(cfg.optim, 100, paths)
  params = md.to_params(init_sharded(lambda: Kangaroo(cfg.model, rngs=nnx.Rngs(0)), mesh))
  rep = NamedSharding(mesh, PartitionSpec())
  tsh, fsh = partition(md.shardings(mesh), pred)
  abstract = jax.eval_shape(lambda p, f: init_state(p, f, tx), *partition(md.shapes(), pred))
  ssh = state_shardings(abstract, tsh, fsh, rep)
  it = SyntheticIterator(cfg.model, global_batch=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                         frame_size=cfg.data.frame_size, max_frames=cfg.data.max_frames)
  host = next(it)
  batch = make_global_batch(host, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda p: init_state(*partition(p, pred), tx), out_shardings=ssh)(params)
    step = jax.jit(make_train_step(md, tx, sched, normalize_frames, 1), donate_argnums=0, out_shardings=(ssh, None))
    t = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled_flops = float(lowered.cost_analysis()["flops"])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  tokens, sq, frames = batch_stats(host)
  model_flops = FlopModel.build(cfg.model, {p: s.shape for p, s in flatten(md.shapes()).items()}, set(paths),
                                cfg.data.frame_size).train_flops(tokens, sq, frames)
  step_s = sorted(times)[len(times) // 2]
  return dict(config=name, remat=remat, params_m=round(md.num_params() / 1e6, 2), batch=cfg.data.batch_size,
              seq_len=cfg.data.seq_len, frames_per_row=cfg.data.max_frames, step_s=round(step_s, 4),
              tokens_per_s=round(tokens / step_s, 1), compile_s=round(compile_s, 1),
              model_tflops=round(model_flops / 1e12, 5), compiled_tflops=round(compiled_flops / 1e12, 5),
              flop_utilisation=round(model_flops / compiled_flops, 3), achieved_tflops_per_s=round(model_flops / step_s / 1e12, 4))


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
