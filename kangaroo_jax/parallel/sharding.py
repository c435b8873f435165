"""Parameter shardings from the logical names each nnx.Param carries, via the one rules table."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from kangaroo_jax.parallel.rules import logical_to_spec


def logical_names(variable) -> tuple:
  """The logical axis names a parameter was annotated with (`out_sharding` metadata)."""
  names = variable.get_metadata().get("out_sharding")
  if names is None:
    raise ValueError(f"parameter of shape {variable.shape} has no logical axis names (out_sharding metadata)")
  if len(names) != len(variable.shape):
    raise ValueError(f"parameter of shape {variable.shape} has {len(names)} logical names {names}")
  return tuple(names)


def param_shardings(model: nnx.Module, mesh: Mesh) -> nnx.State:
  """State of NamedShardings, one per parameter of `model` (concrete or abstract)."""
  mesh_shape = dict(mesh.shape)
  state = nnx.state(model, nnx.Param)
  return jax.tree.map(
      lambda v: v.replace(NamedSharding(mesh, logical_to_spec(logical_names(v), mesh_shape, v.shape))),
      state,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def shard_params(model: nnx.Module, mesh: Mesh) -> None:
  """Moves `model`'s parameters onto `mesh` by the rules table, in place."""
  state = nnx.state(model, nnx.Param)
  shardings = param_shardings(model, mesh)
  nnx.update(model, jax.device_put(state, shardings))
