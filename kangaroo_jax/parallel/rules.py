"""The one table that maps logical axis names to mesh axes, for parameters and activations alike.

Mesh axes are `data, fsdp, context, tensor`. Modules only ever name logical axes; this file is the
single place where those names meet the mesh, so changing a sharding strategy is a one-line edit.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")

# (logical name, mesh axes). A mesh axis is used at most once per array: when two logical dims of one
# array map to the same mesh axis, the later dim stays unsharded (see `logical_to_spec`).
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # --- activations ---
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", ("context",)),
    ("activation_embed", ()),
    ("activation_heads", ("tensor",)),
    ("activation_kv_heads", ("tensor",)),
    ("activation_mlp", ("tensor",)),
    ("activation_vocab", ("tensor",)),
    ("activation_head_dim", ()),
    # Vision tower: (batch * frames) spread over every device so pixels are never replicated; its
    # weights (0.3B) are gathered per layer instead, which is cheap next to the frames' activations.
    ("activation_frames", ("data", "fsdp", "context", "tensor")),
    ("activation_patches", ()),
    # --- parameters ---
    ("layers", ()),
    ("embed", ("fsdp", "context")),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("head_dim", ()),
    ("norm", ()),
    ("patch", ()),
    ("positions", ()),
    ("channels", ()),
)

_RULES = dict(LOGICAL_AXIS_RULES)


def mesh_axes_for(name: str | None) -> tuple[str, ...]:
  if name is None:
    return ()
  try:
    return _RULES[name]
  except KeyError:
    raise KeyError(f"logical axis {name!r} has no rule in kangaroo_jax.parallel.rules.LOGICAL_AXIS_RULES") from None


def logical_to_spec(names: Sequence[str | None], mesh_shape: dict[str, int] | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Logical names of an array's dims -> PartitionSpec.

  With `mesh_shape`, mesh axes of size 1 are dropped; with `shape` too, an axis is only used when the
  dim stays divisible, so an odd-sized dim falls back to fewer axes instead of failing at compile time.
  """
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    axes = []
    size = 1
    for ax in mesh_axes_for(name):
      if ax in used:
        continue
      n = 1 if mesh_shape is None else mesh_shape.get(ax, 1)
      if mesh_shape is not None and n == 1:
        continue
      if shape is not None and shape[i] % (size * n):
        continue
      axes.append(ax)
      size *= n
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec)


def current_mesh(*, concrete: bool = False):
  """The mesh set with `jax.set_mesh`, or None: the abstract mesh (what a trace compiles for) by default, the
  concrete `Mesh` of real devices with `concrete=True` (to place arrays). The one place that asks jax for it."""
  mesh = jax.sharding.get_mesh() if concrete else jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def shard(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation to its logical sharding when a mesh is set (`jax.set_mesh`); else a no-op."""
  mesh = current_mesh()
  if mesh is None:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"shard: {len(names)} logical names {tuple(names)} for an array of rank {x.ndim}")
  spec = logical_to_spec(names, dict(mesh.shape), x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
