"""What `python -m train` and `python -m train.compile` build identically from a config and a mesh:
the model definition, the trainable selection, the optimizer, the state's shapes and shardings, and
the jitted step. One place, so the ahead-of-time compile is the trainer's program, not a copy of it."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kangaroo_jax.data.video import normalize_frames
from kangaroo_jax.model_tree import flatten
from train.config import TrainConfig
from train.optim import check_selection, is_trainable, make_optimizer
from train.params import ModelDef, partition
from train.step import State, init_state, make_train_step, state_shardings


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  model_def: ModelDef
  paths: list[str]  # every parameter path
  trainable: Callable[[str], bool]  # path -> trained (optim.trainable / optim.frozen)
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  state_shapes: State  # ShapeDtypeStructs of the train state (no sharding)
  state_shardings: State  # NamedShardings of the train state
  replicated: NamedSharding

  def abstract_state(self) -> State:
    """The train state as ShapeDtypeStructs carrying their shardings (restore target, AOT argument)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), self.state_shapes, self.state_shardings
    )

  def jit_step(self, grad_accum: int):
    """The jitted train step: state donated, new state placed by `state_shardings`."""
    return jax.jit(
        make_train_step(self.model_def, self.tx, self.lr_schedule, normalize_frames, grad_accum),
        donate_argnums=0,
        out_shardings=(self.state_shardings, None),
    )


def build_program(cfg: TrainConfig, mesh: Mesh) -> TrainProgram:
  model_def = ModelDef(cfg.model, cfg.run)
  shapes = model_def.shapes()
  paths = list(flatten(shapes))
  check_selection(cfg.optim, paths)
  trainable = functools.partial(is_trainable, cfg.optim)
  tx, lr_schedule = make_optimizer(cfg.optim, cfg.total_steps, [p for p in paths if trainable(p)])
  replicated = NamedSharding(mesh, PartitionSpec())
  train_sh, frozen_sh = partition(model_def.shardings(mesh), trainable)
  abstract = jax.eval_shape(lambda p, f: init_state(p, f, tx), *partition(shapes, trainable))
  return TrainProgram(
      model_def,
      paths,
      trainable,
      tx,
      lr_schedule,
      abstract,
      state_shardings(abstract, train_sh, frozen_sh, replicated),
      replicated,
  )
