"""Every parameter carries logical names the rules table knows; a sharded tiny model computes the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
  assert logical_to_spec(("activation_frames", None, None, None), shape, (32, 56, 56, 3)) == PartitionSpec(
      ("fsdp", "context", "tensor"), None, None, None
  )


def test_rules_override_changes_a_params_sharding_and_only_inside_use_rules():
  from kangaroo_jax.parallel.rules import active_rules, merge_rules, use_rules

  mesh = _mesh((1, 4, 1, 2))
  model = nnx.eval_shape(lambda: Kangaroo(preset("tiny"), rngs=nnx.Rngs(0)))
  path = ("llm", "model", "layers", "mlp", "up_proj", "kernel")  # [layers, embed, mlp]

  def spec():
    return dict(nnx.to_flat_state(param_shardings(model, mesh)))[path].get_value().spec

  assert spec() == PartitionSpec(None, "fsdp", "tensor")
  rules = merge_rules((("embed", None), ("mlp", ("fsdp", "tensor"))))
  assert dict(rules)["embed"] == () and dict(rules)["heads"] == ("tensor",)  # the rest stays the default
  with use_rules(rules):
    assert spec() == PartitionSpec(None, None, ("fsdp", "tensor"))
  assert spec() == PartitionSpec(None, "fsdp", "tensor") and active_rules() == LOGICAL_AXIS_RULES


def test_rules_override_errors_are_one_line_and_name_the_entry():
  from kangaroo_jax.parallel.rules import RulesError, merge_rules

  cases = {
      (("activation_embd", None),): "sharding_rules[0]: unknown logical axis 'activation_embd'",
      (("embed", None), ("mlp", "model")): "sharding_rules[1] (mlp): mesh axes 'model' are not a subset",
      (("embed", ("fsdp", "fsdp")),): "sharding_rules[0] (embed): mesh axis repeated",
      (("embed",),): "sharding_rules[0]: expected a (logical axis, mesh axes) pair",
      "embed": "sharding_rules: expected ((logical axis, mesh axes), ...)",
  }
  for override, message in cases.items():
    with pytest.raises(RulesError) as e:
      merge_rules(override)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_mesh_validation_follows_the_rules_in_force():
  from kangaroo_jax.parallel.mesh import MeshError
  from kangaroo_jax.parallel.rules import merge_rules, use_rules
  from kangaroo_jax.parallel.validate import validate_mesh_for_model
  from kangaroo_jax.run_options import RunOptions

  mesh = {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
  with pytest.raises(MeshError, match=r"global batch 4 must be divisible by data\*fsdp = 8"):
    validate_mesh_for_model(preset("tiny"), RunOptions(), mesh, batch=4, seq_len=32)
  with use_rules(merge_rules((("activation_batch", ("data",)),))):  # rows over `data` only
    validate_mesh_for_model(preset("tiny"), RunOptions(), mesh, batch=4, seq_len=32)
    with pytest.raises(MeshError, match=r"global batch 3 must be divisible by data = 2"):
      validate_mesh_for_model(preset("tiny"), RunOptions(), mesh, batch=3, seq_len=32)
