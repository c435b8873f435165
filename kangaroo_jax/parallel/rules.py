"""The one table that maps logical axis names to mesh axes, for parameters and activations alike.

Mesh axes are `data, fsdp, context, tensor`. Modules only ever name logical axes; this file is the
single place where those names meet the mesh, so changing a sharding strategy is a one-line edit, or,
per experiment, an override (`c.sharding_rules = (("activation_embed", "tensor"), ...)`, merged over this
table by `merge_rules` and made current with `use_rules` for everything traced inside it). Code that needs
a mesh axis by role (the ring's axis, the batch axes) asks `mesh_axes_for` too, never spells the name.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from kangaroo_jax.config import ConfigError

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

_DEFAULT = dict(LOGICAL_AXIS_RULES)
# The table in force: the default, or an experiment's merged override inside `use_rules`. A context variable,
# not a global, so a trace in one thread never sees another thread's override.
_ACTIVE: contextvars.ContextVar[dict[str, tuple[str, ...]]] = contextvars.ContextVar(
    "logical_axis_rules", default=_DEFAULT
)


class RulesError(ConfigError):
  """A sharding-rules override that names an unknown logical axis or mesh axis; the message names it (one
  line: a ConfigError, so the trainer's CLI exits 2 with it)."""


def merge_rules(
    overrides: Any, base: Sequence[tuple[str, tuple[str, ...]]] = LOGICAL_AXIS_RULES, where: str = "sharding_rules"
) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """`((logical axis, mesh axes), ...)` laid over `base` -> the full table, in `base`'s order.

  Mesh axes may be None / () (unsharded), one name, or a tuple of names. Raises RulesError (one line,
  naming `where[i]` and the logical axis) for an unknown logical axis, an unknown or repeated mesh axis,
  or an entry that is not a pair."""
  table = dict(base)
  if overrides is None:
    return tuple(table.items())
  if isinstance(overrides, dict):
    overrides = tuple(overrides.items())
  if isinstance(overrides, str) or not isinstance(overrides, (list, tuple)):
    raise RulesError(f"{where}: expected ((logical axis, mesh axes), ...), got {overrides!r}")
  for i, item in enumerate(overrides):
    if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
      raise RulesError(f"{where}[{i}]: expected a (logical axis, mesh axes) pair, got {item!r}")
    name, axes = item
    if name not in table:
      raise RulesError(f"{where}[{i}]: unknown logical axis {name!r}; known: {sorted(table)}")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if not isinstance(axes, (list, tuple)) or any(a not in MESH_AXES for a in axes):
      raise RulesError(f"{where}[{i}] ({name}): mesh axes {item[1]!r} are not a subset of {MESH_AXES}")
    if len(set(axes)) != len(axes):
      raise RulesError(f"{where}[{i}] ({name}): mesh axis repeated in {tuple(axes)}")
    table[name] = tuple(axes)
  return tuple(table.items())


@contextlib.contextmanager
def use_rules(rules: Sequence[tuple[str, tuple[str, ...]]] | None) -> Iterator[None]:
  """Makes `rules` (a full table, e.g. from `merge_rules`; None: the default) the one in force inside.

  Shardings are fixed when a function is traced: trace and compile inside the block."""
  token = _ACTIVE.set(_DEFAULT if rules is None else dict(rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_rules() -> tuple[tuple[str, tuple[str, ...]], ...]:
  return tuple(_ACTIVE.get().items())


def mesh_axes_for(name: str | None) -> tuple[str, ...]:
  """The mesh axes the table in force gives logical axis `name` (() for None)."""
  if name is None:
    return ()
  try:
    return _ACTIVE.get()[name]
  except KeyError:
    raise KeyError(f"logical axis {name!r} has no rule in kangaroo_jax.parallel.rules.LOGICAL_AXIS_RULES") from None


def mesh_axes_in(mesh_shape, name: str) -> tuple[str, ...]:
  """`mesh_axes_for(name)` restricted to the axes of `mesh_shape` ({axis: size}) larger than 1."""
  return tuple(a for a in mesh_axes_for(name) if mesh_shape.get(a, 1) > 1)


def logical_to_spec(
    names: Sequence[str | None], mesh_shape: dict[str, int] | None = None, shape: Sequence[int] | None = None
) -> PartitionSpec:
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
