"""The one home of the model <-> parameter tree <-> mesh plumbing.

A parameter tree is a nested dict keyed by the NNX attribute path, e.g. {"llm": {"lm_head": {"kernel": x}}}:
what Orbax stores (from_pretrained's `state/`, the trainer's checkpoints), what optax sees, and exactly
`nnx.state(model, nnx.Param).to_pure_dict()`, so `nnx.merge(graphdef, tree)` rebuilds the model from it with
no conversion. Flat forms key the same leaves by "/"-joined path ("llm/lm_head/kernel", what the freezing
regexes match) or by path tuple (what the weight-mapping table uses).

  flatten / unflatten      nested tree <-> flat dict
  abstract_split / abstract_model   shapes and logical axis names only, nothing allocated
  init_sharded             a model with every parameter born on its shard of a mesh
  shardings_of             path -> NamedSharding on a mesh (the rules table), else one device
  split_params / merge_params / with_values   model <-> (graphdef, tree), abstract model + values -> model
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from kangaroo_jax.config import KangarooConfig
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.parallel.sharding import param_shardings
from kangaroo_jax.run_options import RunOptions

# Needed (not a workaround): parameters carry logical axis names ("embed", "vocab") that
# kangaroo_jax.parallel.rules resolves to mesh axes. With flax's default (eager sharding) every Variable is
# placed at construction by those names taken as mesh axes: without a mesh construction fails ("an auto mesh
# context ... is required"), under one the names are not its axes. Set here, at `import kangaroo_jax`
# (kangaroo_jax/__init__.py imports this module first), so it holds before any model is built.
flax.config.update("flax_always_shard_variable", False)

Path = tuple[str, ...]


def path_key(path) -> str:
  """An NNX path (a tuple of names) -> "a/b/c"."""
  return "/".join(map(str, path))


def flatten(tree: dict, prefix: Path = ()) -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[path_key(prefix + (k,))] = v
  return out


def unflatten(flat: dict) -> dict:
  """{"a/b": x} or {("a", "b"): x} -> {"a": {"b": x}}."""
  out: dict = {}
  for path, value in flat.items():
    *head, last = path.split("/") if isinstance(path, str) else tuple(map(str, path))
    node = out
    for k in head:
      node = node.setdefault(k, {})
    node[last] = value
  return out


def abstract_split(create: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state of ShapeDtypeStructs) of `create()`: shapes, dtypes and logical axis names, nothing allocated."""
  # jax.eval_shape rather than nnx.eval_shape: under an ambient mesh the latter turns the logical axis names
  # into mesh shardings itself, and logical names are not mesh axes; shardings_of / param_shardings resolve
  # them through the rules table.
  return jax.eval_shape(lambda: nnx.split(create()))


def abstract_model(cfg: KangarooConfig, run: RunOptions = RunOptions(), cls: type[Kangaroo] = Kangaroo) -> Kangaroo:
  """`cls(cfg, run)`'s shapes (parameters in `run.param_dtype`) and logical axis names, nothing allocated."""
  return nnx.merge(*abstract_split(lambda: cls(cfg, run, rngs=nnx.Rngs(0))))


def init_sharded(create: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
  """Creates a model with every parameter born on its shard (jit with out_shardings): no host copy."""
  graphdef, abstract_state = abstract_split(create)
  param_sh = dict(nnx.to_flat_state(param_shardings(nnx.merge(graphdef, abstract_state), mesh)))
  replicated = NamedSharding(mesh, PartitionSpec())  # non-param state (RNG counters) is tiny
  out = nnx.from_flat_state([(p, param_sh.get(p, v.replace(replicated))) for p, v in nnx.to_flat_state(abstract_state)])
  with jax.set_mesh(mesh):
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=out)()
  return nnx.merge(graphdef, state)


def shardings_of(abstract: nnx.Module, mesh: Mesh | None) -> Callable[[Path], jax.sharding.Sharding]:
  """Where each parameter goes: NNX path -> NamedSharding on `mesh` (the rules table), else one device."""
  if mesh is None:
    one = SingleDeviceSharding(jax.devices()[0])
    return lambda p: one
  shardings = dict(nnx.to_flat_state(param_shardings(abstract, mesh)))
  return lambda p: shardings[p].get_value()


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, parameter tree). The model must hold parameters only: other state (RNG counters) would need
  carrying through the train step and the checkpoint as well."""
  graphdef, state = nnx.split(model)
  others = [path_key(p) for p, v in nnx.to_flat_state(state) if not isinstance(v, nnx.Param)]
  if others:
    raise NotImplementedError(
        f"{type(model).__name__} holds non-parameter state {others[:4]}; " "only parameters are carried"
    )
  return graphdef, nnx.to_pure_dict(state)


def merge_params(graphdef: nnx.GraphDef, tree: dict) -> nnx.Module:
  """The model of `graphdef` with the parameter tree's arrays (inside a traced function too)."""
  return nnx.merge(graphdef, tree)


def param_tree(model: nnx.Module) -> dict:
  """The model's parameters as a parameter tree (the arrays themselves, no copy)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_values(abstract: nnx.Module, value_of: Callable[[Path], jax.Array]) -> nnx.Module:
  """`abstract` with every parameter replaced by `value_of(path)` (a jax.Array)."""
  graphdef, state = nnx.split(abstract)
  return merge_params(graphdef, unflatten({p: value_of(p) for p, _ in nnx.to_flat_state(state)}))
