"""The training loop: mesh -> model -> data -> restore-or-init -> jitted step -> metrics / checkpoints.

Resume precedence: a checkpoint in WORKDIR (exact resume: model, optimizer, step, iterator) >
`init_from` (the previous curriculum stage's export: parameters only, fresh optimizer) > random init.
The newest checkpoint that restores in full wins; unreadable newer ones are moved aside (see
train.checkpoint), and one written by another stage or model shape is refused.

SIGTERM: during startup (one process) the run stops before training, changing nothing; during the
loop it saves at a step boundary (all processes the same step, see train.coordination.Preemption);
during the final export (one process) the export is abandoned in its temporary folder, the finished
checkpoint stays, and the next run writes the export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import time
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from kangaroo_jax.models import Kangaroo
from kangaroo_jax.parallel.mesh import init_sharded, make_mesh
from train import metrics as metrics_lib
from train.checkpoint import CheckpointError, Checkpointer, silence_abandoned_reads
from train.config import TrainConfig, validate_for_mesh
from train.coordination import STOP, Coordinator, Interrupted, Preemption
from train.params import ModelDef, combine, flatten, partition
from train.program import build_program
from train.step import init_state


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


class WorkdirError(RuntimeError):
  """WORKDIR cannot be written (read-only, full, no permission); the message names the path and the cause."""


@dataclasses.dataclass
class TrainResult:
  state: dict                   # the final train state (device arrays)
  history: list[dict]           # per-step host metrics of this invocation
  status: str                   # "done" | "preempted" | "stopped" (stop_after reached)
  step: int
  summary: dict                 # what WORKDIR/summary.json holds (data counters summed over all hosts)


def make_iterator(cfg: TrainConfig, mesh) -> Iterator[dict]:
  """The per-host batch iterator (contract section 3) with get_state / set_state (section 4)."""
  from kangaroo_jax.data.global_batch import data_shard_for_process
  shard, shards = data_shard_for_process(mesh, cfg.data.batch_size)
  if cfg.data.source == "synthetic":
    from train.synthetic import SyntheticIterator
    return SyntheticIterator(cfg.model, global_batch=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                             frame_size=cfg.data.frame_size, max_frames=cfg.data.max_frames,
                             seed=cfg.data.shuffle_seed, shard_index=shard, shard_count=shards)
  from train.data import grain_iterator
  return grain_iterator(cfg, shard, shards)


def initial_params(cfg: TrainConfig, model_def: ModelDef, mesh) -> dict:
  """The parameters a run without a checkpoint starts from: `init_from`'s export, else a seeded init."""
  if cfg.init_from:
    from kangaroo_jax.pretrained import from_pretrained
    model, _ = from_pretrained(cfg.init_from, mesh, config=cfg.model)
  else:
    model = init_sharded(lambda: Kangaroo(cfg.model, rngs=nnx.Rngs(cfg.seed)), mesh)
  return model_def.to_params(model)


def train(cfg: TrainConfig, workdir: str, *, iterator: Iterator[dict] | None = None,
          stop_after: int | None = None, place_batch: Callable | None = None) -> TrainResult:
  """Trains until cfg.total_steps (or `stop_after` steps in this call, or SIGTERM), checkpointing on the way.

  Args:
    iterator: per-host batches; default from cfg.data.
    stop_after: end this invocation after that many steps (with a checkpoint), like a job time limit.
    place_batch: host batch -> global arrays; default kangaroo_jax.data.global_batch.make_global_batch.

  Raises (each with a one-line message; WORKDIR is left resumable in every case):
    WorkdirError: WORKDIR cannot be written (read-only, full, no permission).
    CheckpointError: no checkpoint in WORKDIR can be restored (CheckpointMismatchError: the newest was
      written by another stage / model shape / process count).
    NonFiniteError: optim.max_nonfinite non-finite steps in a row.
    Interrupted: SIGTERM during startup or the final export (one process; several processes stop
      together at a step boundary instead, with a checkpoint).
  """
  with STOP.handling():
    try:
      return _train(cfg, workdir, iterator, stop_after, place_batch)
    except (NonFiniteError, CheckpointError, WorkdirError):
      raise
    except Exception as e:
      cause = _write_failure(e, os.path.abspath(workdir))
      if cause is None:
        raise
      raise WorkdirError(f"workdir {workdir}: a write failed ({cause}); checkpoints saved before it are intact. "
                         "Free space or make it writable, then run the same command to resume") from e


# Errors that only a write can cause: reported as WorkdirError wherever they surface (Orbax's save
# thread, TensorBoard, summary.json, the export). Permission errors count only under WORKDIR.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
_WRITE_MESSAGES = ("No space left on device", "Read-only file system", "Disk quota exceeded")


def _write_failure(e: BaseException | None, workdir: str) -> str | None:
  """The cause, if `e` or an exception it wraps is a failed write to `workdir`; else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError):
      name = str(e.filename or "")
      if e.errno in _WRITE_ERRNOS or (e.errno in (errno.EACCES, errno.EPERM) and name.startswith(workdir)):
        return f"{e.strerror or e}" + (f": {name}" if name else "")
    for message in _WRITE_MESSAGES:  # tensorstore reports the OS error inside its own exception text
      if message in str(e):
        return message
    e = e.__cause__ or e.__context__
  return None


def _check_workdir(workdir: str) -> None:
  """Creates WORKDIR and proves it takes a small durable write, before anything else is done."""
  probe = os.path.join(workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"0")
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    where = f": {e.filename}" if e.filename else ""
    raise WorkdirError(f"workdir {workdir}: cannot write there ({e.strerror or e}{where}); choose a writable "
                       "--workdir") from None


def _train(cfg: TrainConfig, workdir: str, iterator: Iterator[dict] | None, stop_after: int | None,
           place_batch: Callable | None) -> TrainResult:
  primary = jax.process_index() == 0
  single = jax.process_count() == 1
  # One process stops at once when SIGTERM comes during startup or the export (nothing is half done
  # that matters). Several processes must not: the others would wait for it at the next barrier, so
  # the loop's Preemption protocol stops them all together after the first steps.
  stoppable = STOP.stoppable if single else (lambda phase: contextlib.nullcontext())
  ckpt = writer = None
  owned_iterator = None
  ok = False
  try:
    with stoppable("startup"):
      _check_workdir(workdir)
      mesh = make_mesh(cfg.mesh)
      validate_for_mesh(cfg, dict(mesh.shape), jax.process_count())
      program = build_program(cfg, mesh)
      model_def, paths, trainable, tx = program.model_def, program.paths, program.trainable, program.tx
      shapes, state_sh = model_def.shapes(), program.state_shardings

      from kangaroo_jax.data.global_batch import data_shard_for_process
      data_shard = data_shard_for_process(mesh, cfg.data.batch_size)[0]
      if place_batch is None:
        from kangaroo_jax.data.global_batch import make_global_batch
        place_batch = functools.partial(make_global_batch, mesh=mesh)
      if iterator is None:
        iterator = owned_iterator = make_iterator(cfg, mesh)
      # Multi-process: the first cross-process collectives (Orbax's barriers, then the train step)
      # each set up a gloo group on CPU, which fails if the processes arrive more than 30 s apart.
      # Start both from a coordination-service barrier; no-op for one process.
      coord = Coordinator()
      coord.barrier("checkpointer")
      ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.ckpt)
      config_record = dict(cfg.raw, model_config=cfg.model.to_dict())

      target = program.abstract_state()
      who = f"[{cfg.stage}]" + ("" if single else f" process {jax.process_index()}:")
      restored = ckpt.restore_latest(target, iterator, config_record, coord,
                                     log=lambda line: print(f"{who} {line}", flush=True))
      if restored is not None:
        state = restored.state
        resumed = f"resumed from {ckpt.directory}/{restored.step}"
        if restored.skipped:
          resumed += " (unreadable, moved aside: " + ", ".join(f"{s} -> {m}" for s, _, m in restored.skipped) + ")"
      else:
        params = initial_params(cfg, model_def, mesh)
        with jax.set_mesh(mesh):
          state = jax.jit(lambda p: init_state(*partition(p, trainable), tx), out_shardings=state_sh,
                          donate_argnums=0)(params)
        resumed = f"initialised from {cfg.init_from}" if cfg.init_from else "random init"
      start = int(jax.device_get(state["step"]))

      step_fn = program.jit_step(cfg.optim.grad_accum)

      flops = metrics_lib.FlopModel.build(cfg.model, {p: s.shape for p, s in flatten(shapes).items()},
                                          {p for p in paths if trainable(p)}, cfg.data.frame_size)
      peak = metrics_lib.peak_flops(mesh.devices.flat[0], cfg.peak_flops_per_device)
      writer = metrics_lib.Writer(workdir, cfg.total_steps, start, primary)
      n_train = model_def.num_params(trainable)
      writer.text(f"[{cfg.stage}] {resumed}; step {start}/{cfg.total_steps}; mesh {dict(mesh.shape)}; "
                  f"{model_def.num_params() / 1e6:.2f}M params, {n_train / 1e6:.2f}M trainable; "
                  f"{jax.process_count()} process(es), {jax.device_count()} device(s)")
  except Interrupted:
    silence_abandoned_reads()  # it may have stopped a restore part way
    _close(ckpt, writer, owned_iterator, quiet=True)
    raise Interrupted("startup", f"SIGTERM during startup: stopped before training; nothing in {workdir} was "
                      "changed (the checkpoints are as they were). Run the same command to resume") from None
  except BaseException:
    _close(ckpt, writer, owned_iterator, quiet=True)
    raise

  def data_snapshot() -> dict:
    # This host's counters right after it read a batch, so they line up with that batch's step.
    read = getattr(iterator, "metrics", None)
    return read() if read is not None else {}

  history: list[dict] = []
  window = dict(steps=0, time=0.0, tokens=0.0, frames=0.0, flops=0.0, losses=[])
  pending = None  # (step, device metrics, host batch stats): read one step late so the device never idles
  status = "done"
  step = start

  def drain(p) -> dict:
    s, dev, stats, dt, data_m = p
    m = {k: float(v) for k, v in jax.device_get(dev).items()}
    tokens, sq, frames = stats
    m["step"] = s
    m.update(data_m)
    history.append(m)
    if dt is not None:  # None: the step that compiled; it would distort every rate
      window["steps"] += 1
      window["time"] += dt
      # Hosts hold equal shares of the global batch: scale this host's counts by the process count.
      window["tokens"] += tokens * jax.process_count()
      window["frames"] += frames * jax.process_count()
      window["flops"] += flops.train_flops(tokens, sq, frames) * jax.process_count()
    if m["finite"]:
      window["losses"].append(m["loss"])
    if m["nonfinite_streak"] >= cfg.optim.max_nonfinite:
      saved = ckpt.latest_step()
      last_good = (f"the last good state is checkpoint {saved} in {ckpt.directory}" if saved is not None else
                   f"no checkpoint was saved yet (this run started from {resumed})")
      raise NonFiniteError(f"step {s}: {int(m['nonfinite_streak'])} non-finite steps in a row "
                           f"(optim.max_nonfinite={cfg.optim.max_nonfinite}); {last_good}")
    return m

  def log(m: dict) -> None:
    vals = dict(loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"], skipped=m["skipped"])
    data_scalars = {}
    if any(k.startswith("data/") for k in m):
      totals = metrics_lib.data_totals({k: v for k, v in m.items() if k.startswith("data/")}, data_shard)
      data_scalars = totals
      if totals["data/skipped_total"]:
        vals["data"] = metrics_lib.describe_skips(totals)
    if window["steps"]:
      t = window["time"]
      per_dev = window["flops"] / t / mesh.size
      vals.update(tokens_per_s=window["tokens"] / t, frames_per_s=window["frames"] / t,
                  step_time_s=t / window["steps"], tflops_per_device=per_dev / 1e12,
                  mfu=per_dev / peak if peak else None)
    writer.scalars(int(m["step"]), {f"train/{k}": v for k, v in vals.items() if k != "data"} | data_scalars)
    writer.console(int(m["step"]), cfg.total_steps, vals)
    window.update(steps=0, time=0.0, tokens=0.0, frames=0.0, flops=0.0)

  def save(s: int) -> None:
    losses = window["losses"]
    ckpt.save(s, state, iterator, config_record, float(np.mean(losses)) if losses else float("nan"))
    window["losses"] = []

  try:
    with Preemption(coord) as preemption:
      t_last = time.perf_counter()
      while step < cfg.total_steps:
        preemption.publish(step)  # before this step is dispatched (see Preemption)
        host_batch = next(iterator)
        stats = metrics_lib.batch_stats(host_batch)
        data_m = data_snapshot()
        batch = place_batch(host_batch)
        with jax.set_mesh(mesh):
          if coord.multi and step == start:
            # Compile first (jit reuses it), then start the first step together: compile times
            # differ between hosts by more than gloo's 30 s rendezvous under load.
            step_fn.lower(state, batch).compile()
            coord.barrier("train_step_compiled")
          state, dev_metrics = step_fn(state, batch)
        step += 1
        if pending is not None:
          m = drain(pending)
          if m["step"] % cfg.log_every == 0:
            log(m)
        now = time.perf_counter()
        # The first step of an invocation includes compilation: keep it out of the rates.
        pending = (step, dev_metrics, stats, None if step == start + 1 else now - t_last, data_m)
        t_last = now
        writer.advance()
        stop = stop_after is not None and step - start >= stop_after
        preempted = preemption.agreed(step)
        if step % cfg.ckpt.every == 0 or step == cfg.total_steps or stop or preempted:
          m = drain(pending)
          pending = None
          if m["step"] % cfg.log_every == 0 or step == cfg.total_steps:
            log(m)
          save(step)
        if preempted:
          status = "preempted"
          writer.text(f"[{cfg.stage}] SIGTERM: saved step {step}, exiting")
          break
        if stop:
          status = "stopped"
          break
      if pending is not None:
        drain(pending)
    ckpt.wait()
    final_data = data_snapshot()
    summary = _summary(cfg, status, step, history,
                       metrics_lib.data_totals(final_data, data_shard) if final_data else None)
    writer.text(f"[{cfg.stage}] {status} at step {step}; data: " + (
        metrics_lib.describe_skips(summary["data"]) if summary["data"] else "no skip accounting (synthetic)"))
    if primary and (history or not _has_summary(workdir, step)):
      # A run that trained nothing (rerun only to write the export) keeps the summary of the run that did.
      _write_json(os.path.join(workdir, "summary.json"), summary)
    if status == "done" and cfg.export:
      from train.export import write_export
      try:
        out = write_export(os.path.join(workdir, "export"), cfg, model_def,
                           combine(state["params"], state["frozen"]), step, stoppable=lambda: stoppable("export"))
      except Interrupted:
        raise Interrupted("export", f"SIGTERM during the export: training is done and checkpoint {step} is saved in "
                          f"{ckpt.directory}; {workdir}/export was not replaced (a partial one may be left in "
                          f"export.tmp-{step}). Run the same command to write the export") from None
      writer.text(f"[{cfg.stage}] exported to {out}")
    ok = True
  finally:
    _close(ckpt, writer, iterator, quiet=not ok)
  # Every process has finished its checkpoint writes (ckpt.close waits for them): leave together, so
  # none tears down its coordination client or gloo peers while another still needs them. Then the
  # process exit runs jax.distributed.shutdown (its own barrier, jax's shutdown_timeout_seconds).
  coord.barrier("train_end")
  return TrainResult(state=state, history=history, status=status, step=step, summary=summary)


def _close(ckpt: Checkpointer | None, writer, iterator, quiet: bool) -> None:
  """Closes what a run opened. `quiet` (an error is already on its way out): a second error from a
  close is dropped, so the first one is the one reported."""
  first = None
  for close in (getattr(ckpt, "close", None), getattr(writer, "close", None), getattr(iterator, "close", None)):
    if close is None:
      continue
    try:
      close()
    except Exception as e:
      first = first or e
  if first is not None and not quiet:
    raise first


def _summary(cfg: TrainConfig, status: str, step: int, history: list[dict], data: dict | None) -> dict:
  last = history[-1] if history else {}
  return dict(stage=cfg.stage, status=status, step=step, total_steps=cfg.total_steps,
              steps_this_run=len(history), last_loss=last.get("loss"),
              nonfinite_steps_skipped=int(last.get("skipped", 0)), data=data)


def _has_summary(workdir: str, step: int) -> bool:
  try:
    with open(os.path.join(workdir, "summary.json")) as f:
      return json.load(f).get("step") == step
  except (OSError, ValueError):
    return False


def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)

