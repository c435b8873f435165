"""Parameters as plain nested dicts keyed by the NNX path, and back to a model inside jit.

The trainer keeps parameters as `{"llm": {"model": {...}}, ...}` dicts of arrays: that is the tree
Orbax stores, the layout of `from_pretrained`'s `state/`, and what optax and the freezing regexes
see (paths joined with "/", e.g. "mm_projector/linear_1/kernel").
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kangaroo_jax.config import KangarooConfig
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.parallel.sharding import param_shardings
from kangaroo_jax.run_options import RunOptions

Nested = dict


def flatten(tree: Nested, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, prefix + (k,)))
    else:
      out["/".join(prefix + (k,))] = v
  return out


def unflatten(flat: dict[str, Any]) -> Nested:
  out: dict = {}
  for path, v in flat.items():
    node = out
    *head, last = path.split("/")
    for k in head:
      node = node.setdefault(k, {})
    node[last] = v
  return out


def partition(tree: Nested, pred: Callable[[str], bool]) -> tuple[Nested, Nested]:
  """Splits a nested dict by a predicate on the "/"-joined path: (matching, rest)."""
  flat = flatten(tree)
  return (unflatten({k: v for k, v in flat.items() if pred(k)}),
          unflatten({k: v for k, v in flat.items() if not pred(k)}))


def combine(*trees: Nested) -> Nested:
  flat = {}
  for t in trees:
    flat.update(flatten(t))
  return unflatten(flat)


class ModelDef:
  """The static half of a Kangaroo model: builds the module from a params dict inside a traced function."""

  def __init__(self, cfg: KangarooConfig, run: RunOptions = RunOptions()):
    self.cfg, self.run = cfg, run
    # Shapes only, built outside any ambient mesh so flax keeps the logical names (rules.py resolves them).
    with jax.set_mesh(Mesh(np.empty((), dtype=object), ())):
      abstract = nnx.eval_shape(lambda: Kangaroo(cfg, run, rngs=nnx.Rngs(0)))
    self.abstract_model = abstract
    self.graphdef, state = nnx.split(abstract)
    self._flat = list(nnx.to_flat_state(state))
    non_params = [p for p, v in self._flat if not isinstance(v, nnx.Param)]
    if non_params:  # RNG state etc. would need to be carried through the step and the checkpoint
      raise NotImplementedError(f"Kangaroo holds non-parameter state {non_params[:4]}; the trainer carries params only")

  def key(self, path) -> str:
    return "/".join(map(str, path))

  def shapes(self) -> Nested:
    """Nested dict of jax.ShapeDtypeStruct (no sharding)."""
    return unflatten({self.key(p): jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in self._flat})

  def shardings(self, mesh: Mesh) -> Nested:
    """Nested dict of NamedSharding from the logical-axis rules."""
    sh = dict(nnx.to_flat_state(param_shardings(self.abstract_model, mesh)))
    return unflatten({self.key(p): sh[p].get_value() for p, _ in self._flat})

  def merge(self, params: Nested) -> Kangaroo:
    flat = flatten(params)
    state = nnx.from_flat_state([(p, v.replace(flat[self.key(p)])) for p, v in self._flat])
    return nnx.merge(self.graphdef, state)

  def to_params(self, model: nnx.Module) -> Nested:
    return unflatten({self.key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))})

  def num_params(self, pred: Callable[[str], bool] = lambda _: True) -> int:
    return sum(int(np.prod(v.shape)) for p, v in self._flat if pred(self.key(p)))
