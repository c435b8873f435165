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

Resume (`restore_latest`) verifies the newest checkpoint by restoring it completely. One that cannot
be read (a truncated array file, a damaged `manifest.ocdbt` or `_METADATA`, no `iter/`) is skipped
with a warning and the next older one is tried; once one restores, the skipped ones are moved aside
to `<step>.corrupt` (never deleted), so later saves of those steps do not collide with them. When
none restores, nothing is moved and CheckpointError lists each one's cause. A checkpoint written by
another stage, model shape or process count is not corrupt: CheckpointMismatchError refuses it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from train.config import CheckpointConfig


class CheckpointError(RuntimeError):
  """No checkpoint of the run can be restored; the message names each one and its cause."""


class CheckpointMismatchError(CheckpointError):
  """The newest readable checkpoint was written by another configuration (stage, model shapes, processes)."""


@dataclasses.dataclass
class Restored:
  step: int
  state: dict
  skipped: list[tuple[int, str, str]]  # (step, cause, where it was moved) per unreadable newer checkpoint


class _Unreadable(Exception):
  """This checkpoint cannot be restored (its files are damaged or missing)."""


# tensorstore appends the full JSON spec of what it opened (and sometimes source locations) to the cause.
_TENSORSTORE_TAIL = re.compile(r"\s*\[(tensorstore_spec|source locations)='.*$")


def _one_line(e: BaseException) -> str:
  """An exception as one line: the innermost cause (Orbax wraps tensorstore's error in a generic one that
  names only the slice), without tensorstore's spec dump; a long one keeps its head and its tail."""
  if not isinstance(e, _Unreadable):
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
      e = e.__cause__ or e.__context__
  text = _TENSORSTORE_TAIL.sub("", " ".join(str(e).split()))
  text = text if isinstance(e, _Unreadable) else f"{type(e).__name__}: {text}"
  return text if len(text) <= 500 else f"{text[:200]} ... {text[-280:]}"


_quiet = False


def silence_abandoned_reads() -> None:
  """Drops the noise of a restore that failed (or was interrupted) part way.

  Orbax reads arrays inside `asyncio.run`; when one read fails, the loop closes while tensorstore
  still completes the others, and each completion reports `RuntimeError: Event loop is closed`
  (dozens of tracebacks), "<Task | _GatheringFuture> exception was never retrieved" and "Exception
  ignored in: <coroutine ...>" for the same cause, which the restore reports once itself. Only these
  messages are dropped (the last one only for Orbax's coroutines), from the first restore of the
  process on (they start while the failure unwinds, before any handler could install this).
  """
  global _quiet
  if _quiet:
    return
  _quiet = True
  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    code = getattr(unraisable.object, "cr_code", None)  # an abandoned read coroutine raising as it is closed
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    previous(unraisable)

  class _DropAbandonedTasks(logging.Filter):

    def filter(self, record):  # "Task / Future / _GatheringFuture exception was never retrieved"
      return "exception was never retrieved" not in record.getMessage().split("\n", 1)[0]

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_DropAbandonedTasks())


def _key(k) -> str:
  for attr in ("key", "idx", "name"):  # DictKey / SequenceKey / GetAttrKey (namedtuples are saved by field name)
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_table(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """ "a/b/0" -> (shape, dtype name) for every array leaf of a state or of its saved metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    out["/".join(_key(k) for k in path)] = (tuple(getattr(leaf, "shape", ())), str(dtype))
  return out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def _config_differences(saved: dict, now: dict) -> list[str]:
  """The fields that decide whether a checkpoint fits: stage, model config, trainable selection."""
  saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))  # tuples -> lists, as saved
  out = []
  if saved.get("stage") != now.get("stage"):
    out.append(f"stage: {saved.get('stage')!r} in the checkpoint, {now.get('stage')!r} now")
  for section, name in (("model_config", "model"), ("optim", "optim")):
    a, b = _flat(saved.get(section, {})), _flat(now.get(section, {}))
    # A field only one side has was added (or removed) by a code change, not by this run's config.
    keys = sorted(set(a) & set(b)) if section == "model_config" else ["trainable", "frozen"]
    for k in keys:
      if a.get(k) != b.get(k):
        out.append(f"{name}.{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now")
  return out


def _iterator_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


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
    (directory / _iterator_file()).write_text(args.state_text)

  def restore(self, directory: epath.Path, args: "IteratorRestore"):
    path = directory / _iterator_file()
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(
          f"{path}: no iterator state for this process (found {found}); resuming with a "
          "different process count needs a topology-independent iterator state"
      )
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
      keep.append(
          policies.BestN(
              get_metric_fn=lambda m: m["loss"], reverse=True, n=cfg.keep_best, keep_checkpoints_without_metrics=False
          )
      )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=cfg.async_save,
        create=True,
        cleanup_tmp_directories=True,  # removes what a crash left half-written
    )
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers=dict(
            state=ocp.StandardCheckpointHandler(), iter=IteratorHandler(), config=ocp.JsonCheckpointHandler()
        ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict, iterator, config: dict, loss: float) -> bool:
    """Starts an async save of `state` at `step`; returns once the arrays are safe to donate/modify."""
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        iter=IteratorSave(_state_to_text(iterator.get_state())),
        config=ocp.args.JsonSave(config),
    )
    # A non-finite loss must not win "best"; it is still saved as one of the last K.
    loss = float(loss) if loss == loss and abs(loss) != float("inf") else 1e30
    return self.manager.save(step, args=args, metrics={"loss": loss}, force=True)

  def restore(self, step: int, abstract_state: dict, iterator) -> dict:
    """Restores onto the shardings carried by `abstract_state` (jax.ShapeDtypeStruct leaves) and
    sets the iterator's state in place."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), iter=IteratorRestore(iterator))
    return self.manager.restore(step, args=args)["state"]

  def restore_latest(
      self, abstract_state: dict, iterator, config: dict, coord=None, log: Callable[[str], None] = print
  ) -> Restored | None:
    """Restores the newest checkpoint that can be read in full (see the module docstring); None if
    there is none at all. All processes call this; they restore the same step (agreed through
    `coord`, a train.coordination.Coordinator) and only process 0 moves skipped ones aside.

    Args:
      abstract_state: jax.ShapeDtypeStruct leaves with the shardings to restore onto.
      iterator: its state is set from the restored checkpoint (and only from that one).
      config: this run's config record (what `save` stores): a checkpoint must match its stage,
        model config (where the array shapes differ) and trainable selection.
    """
    failed: list[tuple[int, str]] = []
    steps = sorted(self.manager.all_steps(), reverse=True)
    if steps:
      silence_abandoned_reads()  # before the first read: the noise starts while the failure unwinds
      log(f"restoring the newest readable of {len(steps)} checkpoint(s) in {self.directory} (steps {steps})")
    for step in steps:
      verdict, state, iter_state = "ok", None, None
      try:
        state, iter_state = self._verified(step, abstract_state, config)
      except CheckpointMismatchError as e:
        verdict, reason = "mismatch", str(e)
      except Exception as e:  # whatever a damaged checkpoint raises: tensorstore, JSON, Orbax, our checks
        verdict, reason = "unreadable", _one_line(e)
      verdicts = coord.gather(f"restore/{step}", verdict) if coord is not None else [verdict]
      if "mismatch" in verdicts:
        if verdict != "mismatch":
          reason = f"process {verdicts.index('mismatch')} found that {self.directory}/{step} does not fit this run"
        raise CheckpointMismatchError(reason)
      if verdict == "ok" and all(v == "ok" for v in verdicts):
        break
      if verdict == "ok":
        reason = f"process {[i for i, v in enumerate(verdicts) if v != 'ok']} could not read it (see its log)"
      log(f"WARNING: checkpoint {self.directory}/{step} cannot be restored, trying an older one: {reason}")
      failed.append((step, reason))
    else:
      if not failed:
        return None
      causes = "; ".join(f"step {s}: {why}" for s, why in failed)
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be restored ({causes}); nothing was moved or deleted. Move the "
          f"damaged ones aside (e.g. `mv {self.directory}/{failed[0][0]} {self.directory}/{failed[0][0]}.corrupt`) "
          "to resume from an older one, or use a new workdir"
      )
    skipped = [(s, why, self._move_aside(s, coord)) for s, why in failed]
    if failed:
      self.manager.reload()
      log(
          f"WARNING: resuming from step {step}; moved aside (not deleted): "
          + ", ".join(f"{s} -> {moved}" for s, _, moved in skipped)
      )
    iterator.set_state(iter_state)
    if hasattr(iterator, "start_prefetch"):  # Grain DataLoaderIterator resumes prefetching explicitly
      iterator.start_prefetch()
    return Restored(step=step, state=state, skipped=skipped)

  def _verified(self, step: int, abstract_state: dict, config: dict):
    """(state, iterator state) of `step`, read in full; raises _Unreadable or CheckpointMismatchError."""
    where = f"{self.directory}/{step}"
    try:
      saved_config = self.restore_config(step)
    except Exception as e:
      raise _Unreadable(f"config: {_one_line(e)}") from e
    try:
      saved_tree = self.manager.item_metadata(step)["state"]
      saved_arrays = _leaf_table(saved_tree)
    except Exception as e:
      raise _Unreadable(f"state metadata: {_one_line(e)}") from e
    wanted = _leaf_table(abstract_state)
    differing_arrays = sorted(k for k in set(saved_arrays) | set(wanted) if saved_arrays.get(k) != wanted.get(k))
    fields = _config_differences(saved_config, config)
    if differing_arrays or any(f.startswith("stage:") for f in fields):
      first = differing_arrays[0] if differing_arrays else None
      arrays = (
          (
              f"; {len(differing_arrays)} state arrays differ, e.g. {first}: {saved_arrays.get(first)} in the "
              f"checkpoint, {wanted.get(first)} now"
          )
          if differing_arrays
          else ""
      )
      raise CheckpointMismatchError(
          f"{where} was written by another configuration ({'; '.join(fields) or 'no config field differs'}{arrays}); "
          "use a new --workdir for this run, or resume with the configuration that wrote it"
      )
    iter_dir = os.path.join(where, "iter")
    if not os.path.isdir(iter_dir):
      raise _Unreadable(f"{iter_dir} is missing (no data-iterator state)")
    path = os.path.join(iter_dir, _iterator_file())
    if not os.path.exists(path):
      others = sorted(p for p in os.listdir(iter_dir) if p.endswith(".json"))
      if others:
        raise CheckpointMismatchError(
            f"{where} was written by another number of processes (iterator states {others}, this run has "
            f"{jax.process_count()}); resuming needs the same process count"
        )
      raise _Unreadable(f"{path} is missing")
    try:
      with open(path) as f:
        iter_state = _state_from_text(f.read())
    except Exception as e:
      raise _Unreadable(f"{path}: {_one_line(e)}") from e
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    state = self.manager.restore(step, args=args)["state"]
    if "step" in state and int(jax.device_get(state["step"])) != step:
      raise _Unreadable(f"its state holds step {int(jax.device_get(state['step']))}")
    return state, iter_state

  def _move_aside(self, step: int, coord) -> str:
    """Renames a checkpoint that cannot be restored to `<step>.corrupt` (`.corrupt-2`, ... if taken)."""
    src = os.path.join(self.directory, str(step))
    dst, n = f"{src}.corrupt", 1
    while os.path.exists(dst):
      n += 1
      dst = f"{src}.corrupt-{n}"
    if coord is not None:
      coord.barrier(f"move_aside/{step}")  # every process has picked the same name before it is taken
    if jax.process_index() == 0:
      os.replace(src, dst)
    if coord is not None:
      coord.barrier(f"moved_aside/{step}")
    return dst

  def restore_state(self, step: int) -> dict:
    """The state as saved (host arrays, no sharding): for inspection and tests."""
    return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    # The manager removes what a crash left half-written in a background thread, which only its
    # save() waits for; a run that ends before its first save (an error or SIGTERM during startup)
    # would exit under that thread, which then logs a traceback from the interpreter's shutdown.
    getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    self.manager.wait_until_finished()
    self.manager.close()
