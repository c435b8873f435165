"""Meshes and the logical-axis sharding rules."""

from kangaroo_jax.parallel.rules import LOGICAL_AXIS_RULES, MESH_AXES, logical_to_spec, shard

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "logical_to_spec", "shard"]
