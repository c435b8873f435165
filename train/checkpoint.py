"""Orbax checkpoints of a training run: `WORKDIR/checkpoints/<step>/{state, iter, config}`.

  state   the train-state pytree (model, optimizer, step, skip counters), each array written by the
          processes that hold its shards; restored straight onto the shardings of the *current* mesh,
          so a run can resume on a different mesh shape.
  iter    one JSON file per process with that process's data-iterator state (contract section 4).
  config  the plain experiment config (JSON), for the record and for `train.export`.

Saves are asynchronous (training continues while arrays are written). Orbax writes each step into a
temporary folder and renames it only once complete, so a crash during a save leaves the previous
checkpoints untouched and the half-written one is ignored (and cleaned up) on the next start.
Retention: the last `keep` steps plus the `keep_best` steps with the lowest mean training loss.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from train.config import CheckpointConfig


def _state_to_text(state) -> str:
  # Grain's DataLoaderIterator gives bytes (JSON text); DatasetIterators and ours give a JSON-able dict.
  if isinstance(state, bytes):
    return json.dumps({"__bytes__": state.decode()})
  return json.dumps(state)


def _state_from_text(text: str):
  d = json.loads(text)
  if isinstance(d, dict) and set(d) == {"__bytes__"}:
    return d["__bytes__"].encode()
  return d


class IteratorHandler(ocp.CheckpointHandler):
  """Each process writes / reads `process_<i>-of-<n>.json` with its own iterator's state."""

  def save(self, directory: epath.Path, args: "IteratorSave"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (directory / name).write_text(args.state_text)

  def restore(self, directory: epath.Path, args: "IteratorRestore"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path = directory / name
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(f"{path}: no iterator state for this process (found {found}); resuming with a "
                              "different process count needs a topology-independent iterator state")
    state = _state_from_text(path.read_text())
    args.iterator.set_state(state)
    if hasattr(args.iterator, "start_prefetch"):  # Grain DataLoaderIterator resumes prefetching explicitly
      args.iterator.start_prefetch()
    return state

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  state_text: str  # captured when save() is called, so the async write sees the state of that step


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


class Checkpointer:
  """CheckpointManager for one run. All processes call every method (Orbax coordinates them)."""

  def __init__(self, directory: str, cfg: CheckpointConfig):
    self.directory = os.path.abspath(directory)
    keep = [policies.LatestN(n=cfg.keep)]
    if cfg.keep_best:
      keep.append(policies.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=cfg.keep_best,
                                 keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=cfg.async_save,
        create=True,
        cleanup_tmp_directories=True,  # removes what a crash left half-written
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(), iter=IteratorHandler(),
                           config=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict, iterator, config: dict, loss: float) -> bool:
    """Starts an async save of `state` at `step`; returns once the arrays are safe to donate/modify."""
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              iter=IteratorSave(_state_to_text(iterator.get_state())),
                              config=ocp.args.JsonSave(config))
    # A non-finite loss must not win "best"; it is still saved as one of the last K.
    loss = float(loss) if loss == loss and abs(loss) != float("inf") else 1e30
    return self.manager.save(step, args=args, metrics={"loss": loss}, force=True)

  def restore(self, step: int, abstract_state: dict, iterator) -> dict:
    """Restores onto the shardings carried by `abstract_state` (jax.ShapeDtypeStruct leaves) and
    sets the iterator's state in place."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), iter=IteratorRestore(iterator))
    return self.manager.restore(step, args=args)["state"]

  def restore_state(self, step: int) -> dict:
    """The state as saved (host arrays, no sharding): for inspection and tests."""
    return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
