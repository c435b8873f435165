"""Every parameter carries logical names the rules table knows; a sharded tiny model computes the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from kangaroo_jax.config import preset
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.parallel.rules import LOGICAL_AXIS_RULES, logical_to_spec
from kangaroo_jax.parallel.sharding import logical_names, param_shardings, shard_params
from tests.helpers import max_rel_error


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp", "context", "tensor"), axis_types=(AxisType.Auto,) * 4)


def test_every_param_is_annotated_with_known_names():
  model = nnx.eval_shape(lambda: Kangaroo(preset("kangaroo-8b"), rngs=nnx.Rngs(0)))
  known = {name for name, _ in LOGICAL_AXIS_RULES}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    for name in logical_names(var):
      assert name is None or name in known, (path, name)


def test_logical_to_spec_uses_each_mesh_axis_once_and_respects_divisibility():
  shape = {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}
  assert logical_to_spec(("embed", "mlp"), shape, (8, 8)) == PartitionSpec(("fsdp", "context"), "tensor")
  # 6 is not divisible by fsdp*context = 4: fall back to fsdp alone.
  assert logical_to_spec(("embed", "mlp"), shape, (6, 8)) == PartitionSpec("fsdp", "tensor")
  # heads and mlp both want `tensor`: only the first gets it.
  assert logical_to_spec(("heads", "mlp"), shape, (8, 8)) == PartitionSpec("tensor", None)
  # Axes of size 1 are dropped.
  assert logical_to_spec(("activation_batch",), shape, (4,)) == PartitionSpec("fsdp")


def test_8b_params_are_mostly_sharded_on_fsdp2_tensor4():
  model = nnx.eval_shape(lambda: Kangaroo(preset("kangaroo-8b"), rngs=nnx.Rngs(0)))
  shardings = param_shardings(model, _mesh((1, 2, 1, 4)))
  total = unsharded = 0
  for (_, var), (_, sh) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(shardings)):
    nbytes = int(np.prod(var.shape)) * 4
    total += nbytes
    if sh.get_value().is_fully_replicated:
      unsharded += nbytes
  assert unsharded / total < 0.02, unsharded / total


def test_sharded_tiny_model_matches_single_device():
  cfg = preset("tiny")
  model = Kangaroo(cfg, rngs=nnx.Rngs(0))
  f, size = 4, cfg.vision.image_size
  n_vis = model.num_visual_tokens(f, size, size)
  rng = np.random.default_rng(0)
  ids = np.concatenate([np.full((4, n_vis), cfg.visual_token_id), rng.integers(0, cfg.llm.vocab_size, (4, 8))], 1)
  frames = rng.normal(size=(4, f, size, size, 3)).astype(np.float32)
  ts = np.tile(np.arange(f, dtype=np.float32), (4, 1))
  expected = np.asarray(model(jnp.asarray(ids), jnp.asarray(frames), jnp.asarray(ts)))

  mesh = _mesh((2, 2, 1, 2))
  shard_params(model, mesh)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids, frames, ts):
    return nnx.merge(graphdef, state)(ids, frames, ts)

  with jax.set_mesh(mesh):
    got = forward(state, jnp.asarray(ids), jnp.asarray(frames), jnp.asarray(ts))
  kernel = model.llm.model.layers.mlp.gate_proj.kernel[...]
  assert not kernel.sharding.is_fully_replicated
  assert max_rel_error(np.asarray(got), expected) <= 1e-5


def test_frames_are_spread_over_every_device():
  shape = {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}
  assert logical_to_spec(("activation_frames", None, None, None), shape, (32, 56, 56, 3)) == \
      PartitionSpec(("fsdp", "context", "tensor"), None, None, None)
