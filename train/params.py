"""The trainer's view of the parameter tree (kangaroo_jax/model_tree.py): the trainable / frozen split and the
model definition the jitted step rebuilds the module from.

The trainer keeps parameters as parameter trees (`{"llm": {"model": {...}}, ...}` dicts of arrays): the
tree Orbax stores, the layout of `from_pretrained`'s `state/`, and what optax and the freezing regexes
see (paths joined with "/", e.g. "mm_projector/linear_1/kernel").
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kangaroo_jax.config import KangarooConfig
from kangaroo_jax.model_tree import (
    abstract_model,
    flatten,
    merge_params,
    param_tree,
    shardings_of,
    split_params,
    unflatten,
)
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.run_options import RunOptions

Nested = dict


def partition(tree: Nested, pred: Callable[[str], bool]) -> tuple[Nested, Nested]:
  """Splits a nested dict by a predicate on the "/"-joined path: (matching, rest)."""
  flat = flatten(tree)
  return (
      unflatten({k: v for k, v in flat.items() if pred(k)}),
      unflatten({k: v for k, v in flat.items() if not pred(k)}),
  )


def combine(*trees: Nested) -> Nested:
  flat = {}
  for t in trees:
    flat.update(flatten(t))
  return unflatten(flat)


class ModelDef:
  """The static half of a Kangaroo model: split once here, rebuilt from a parameter tree inside the traced step."""

  def __init__(self, cfg: KangarooConfig, run: RunOptions = RunOptions()):
    self.cfg, self.run = cfg, run
    self.abstract_model = abstract_model(cfg, run)
    self.graphdef, tree = split_params(self.abstract_model)  # params only: the step carries nothing else
    self._shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flatten(tree).items()}

  def shapes(self) -> Nested:
    """Nested dict of jax.ShapeDtypeStruct (no sharding)."""
    return unflatten(self._shapes)

  def shardings(self, mesh: Mesh) -> Nested:
    """Nested dict of NamedSharding from the logical-axis rules."""
    sharding_of = shardings_of(self.abstract_model, mesh)
    return unflatten({p: sharding_of(p) for p, _ in nnx.to_flat_state(nnx.state(self.abstract_model))})

  def merge(self, params: Nested) -> Kangaroo:
    """The model with these parameters (a complete tree: trainable and frozen combined)."""
    return merge_params(self.graphdef, params)

  def to_params(self, model: nnx.Module) -> Nested:
    return param_tree(model)

  def num_params(self, pred: Callable[[str], bool] = lambda _: True) -> int:
    return sum(int(np.prod(s.shape)) for k, s in self._shapes.items() if pred(k))
