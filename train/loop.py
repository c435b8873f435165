"""The training loop: mesh -> model -> data -> restore-or-init -> jitted step -> metrics / checkpoints.

`_train` runs four sections, each a function over the `_Run` that setup fills in: `_setup` (workdir, mesh,
program, data, checkpointer), `_restore_or_init` (the train state, placed by the program's shardings, then
`_check_sharding`), `_step_loop` (steps, logging through `_StepLog`, checkpoints) and `_finish` (the last
checkpoint write, summary.json, the export). All of it runs under the config's sharding rules (`use_rules`).

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
from jax.sharding import Mesh

from kangaroo_jax.data.global_batch import data_shard_for_process, make_global_batch
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.model_tree import init_sharded
from kangaroo_jax.parallel.mesh import MeshError, make_mesh
from kangaroo_jax.parallel.rules import use_rules
from kangaroo_jax.parallel.validate import sharding_report
from kangaroo_jax.pretrained import from_pretrained
from train import metrics as metrics_lib
from train.checkpoint import CheckpointError, Checkpointer, silence_abandoned_reads
from train.config import TrainConfig, validate_for_mesh
from train.coordination import STOP, Coordinator, Interrupted, Preemption
from train.data import grain_iterator
from train.export import write_export
from train.params import ModelDef, combine, flatten, partition
from train.program import TrainProgram, build_program
from train.step import init_state
from train.synthetic import SyntheticIterator


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


class WorkdirError(RuntimeError):
  """WORKDIR cannot be written (read-only, full, no permission); the message names the path and the cause."""


@dataclasses.dataclass
class TrainResult:
  state: dict  # the final train state (device arrays)
  history: list[dict]  # per-step host metrics of this invocation
  status: str  # "done" | "preempted" | "stopped" (stop_after reached)
  step: int
  summary: dict  # what WORKDIR/summary.json holds (data counters summed over all hosts)


def make_iterator(cfg: TrainConfig, data_shard: tuple[int, int]) -> Iterator[dict]:
  """The per-host batch iterator (contract section 3) with get_state / set_state (section 4).

  data_shard: (shard index, shard count) of the rows this process reads (`data_shard_for_process`)."""
  shard, shards = data_shard
  if cfg.data.source == "synthetic":
    return SyntheticIterator(
        cfg.model,
        global_batch=cfg.data.batch_size,
        seq_len=cfg.data.seq_len,
        frame_size=cfg.data.frame_size,
        max_frames=cfg.data.max_frames,
        seed=cfg.data.shuffle_seed,
        shard_index=shard,
        shard_count=shards,
    )
  return grain_iterator(cfg, shard, shards)


def initial_params(cfg: TrainConfig, model_def: ModelDef, mesh) -> dict:
  """The parameters a run without a checkpoint starts from: `init_from`'s export, else a seeded init."""
  if cfg.init_from:
    model, _ = from_pretrained(cfg.init_from, mesh, config=cfg.model, run=cfg.run)
  else:
    model = init_sharded(lambda: Kangaroo(cfg.model, cfg.run, rngs=nnx.Rngs(cfg.seed)), mesh)
  return model_def.to_params(model)


def train(
    cfg: TrainConfig,
    workdir: str,
    *,
    iterator: Iterator[dict] | None = None,
    stop_after: int | None = None,
    place_batch: Callable | None = None,
) -> TrainResult:
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
  with STOP.handling(), use_rules(cfg.rules):  # the run's sharding rules, for everything traced inside
    try:
      return _train(cfg, workdir, iterator, stop_after, place_batch)
    except (NonFiniteError, CheckpointError, WorkdirError):
      raise
    except Exception as e:
      cause = _write_failure(e, os.path.abspath(workdir))
      if cause is None:
        raise
      raise WorkdirError(
          f"workdir {workdir}: a write failed ({cause}); checkpoints saved before it are intact. "
          "Free space or make it writable, then run the same command to resume"
      ) from e


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
    raise WorkdirError(
        f"workdir {workdir}: cannot write there ({e.strerror or e}{where}); choose a writable " "--workdir"
    ) from None


@dataclasses.dataclass
class _Run:
  """What the setup section builds and the later sections read. Filled in step by step, so that a failure
  part way through startup still closes what was opened (`_close`)."""

  cfg: TrainConfig
  workdir: str
  stoppable: Callable  # phase -> context manager (see _train)
  mesh: Mesh | None = None
  program: TrainProgram | None = None
  data_shard: tuple[int, int] = (0, 1)  # (index, count) of the batch rows this process reads
  place_batch: Callable | None = None  # host batch -> global arrays
  iterator: Iterator[dict] | None = None
  owned_iterator: Iterator[dict] | None = None  # the iterator this run made (a caller's is theirs to close)
  coord: Coordinator | None = None
  ckpt: Checkpointer | None = None
  config_record: dict = dataclasses.field(default_factory=dict)  # saved with every checkpoint
  log: "_StepLog | None" = None

  @property
  def who(self) -> str:
    return f"[{self.cfg.stage}]" + ("" if jax.process_count() == 1 else f" process {jax.process_index()}:")


def _train(
    cfg: TrainConfig,
    workdir: str,
    iterator: Iterator[dict] | None,
    stop_after: int | None,
    place_batch: Callable | None,
) -> TrainResult:
  # One process stops at once when SIGTERM comes during startup or the export (nothing is half done
  # that matters). Several processes must not: the others would wait for it at the next barrier, so
  # the loop's Preemption protocol stops them all together after the first steps.
  single = jax.process_count() == 1
  run = _Run(cfg, workdir, STOP.stoppable if single else (lambda phase: contextlib.nullcontext()))
  try:
    with run.stoppable("startup"):
      _setup(run, iterator, place_batch)
      state, start, resumed = _restore_or_init(run)
      run.log = _StepLog(run, start, resumed)
      run.log.text(
          f"[{cfg.stage}] {resumed}; step {start}/{cfg.total_steps}; mesh {dict(run.mesh.shape)}; "
          f"{run.program.model_def.num_params() / 1e6:.2f}M params, "
          f"{run.program.model_def.num_params(run.program.trainable) / 1e6:.2f}M trainable; "
          f"{jax.process_count()} process(es), {jax.device_count()} device(s)"
      )
      _check_sharding(run, state)
  except Interrupted:
    silence_abandoned_reads()  # it may have stopped a restore part way
    _close(run.ckpt, run.log, run.owned_iterator, quiet=True)
    raise Interrupted(
        "startup",
        f"SIGTERM during startup: stopped before training; nothing in {workdir} was "
        "changed (the checkpoints are as they were). Run the same command to resume",
    ) from None
  except BaseException:
    _close(run.ckpt, run.log, run.owned_iterator, quiet=True)
    raise

  ok = False
  try:
    state, step, status = _step_loop(run, state, start, stop_after)
    summary = _finish(run, state, step, status)
    ok = True
  finally:
    _close(run.ckpt, run.log, run.iterator, quiet=not ok)
  # Every process has finished its checkpoint writes (ckpt.close waits for them): leave together, so
  # none tears down its coordination client or gloo peers while another still needs them. Then the
  # process exit runs jax.distributed.shutdown (its own barrier, jax's shutdown_timeout_seconds).
  run.coord.barrier("train_end")
  return TrainResult(state=state, history=run.log.history, status=status, step=step, summary=summary)


def _setup(run: _Run, iterator: Iterator[dict] | None, place_batch: Callable | None) -> None:
  """Workdir, mesh, program, data and checkpointer: everything before the train state exists."""
  cfg = run.cfg
  _check_workdir(run.workdir)
  run.mesh = make_mesh(cfg.mesh)
  validate_for_mesh(cfg, dict(run.mesh.shape), jax.process_count())
  run.program = build_program(cfg, run.mesh)
  run.data_shard = data_shard_for_process(run.mesh, cfg.data.batch_size)
  run.place_batch = place_batch or functools.partial(make_global_batch, mesh=run.mesh)
  if iterator is None:
    iterator = run.owned_iterator = make_iterator(cfg, run.data_shard)
  run.iterator = iterator
  # Multi-process: the first cross-process collectives (Orbax's barriers, then the train step)
  # each set up a gloo group on CPU, which fails if the processes arrive more than 30 s apart.
  # Start both from a coordination-service barrier; no-op for one process.
  run.coord = Coordinator()
  run.coord.barrier("checkpointer")
  run.ckpt = Checkpointer(os.path.join(run.workdir, "checkpoints"), cfg.ckpt)
  run.config_record = dict(cfg.raw, model_config=cfg.model.to_dict())


def _restore_or_init(run: _Run) -> tuple[dict, int, str]:
  """(train state on the mesh, its step, how it was obtained): WORKDIR's newest restorable checkpoint,
  else `init_from` / a seeded init with a fresh optimizer."""
  cfg, program = run.cfg, run.program
  restored = run.ckpt.restore_latest(
      program.abstract_state(),
      run.iterator,
      run.config_record,
      run.coord,
      log=lambda line: print(f"{run.who} {line}", flush=True),
  )
  if restored is not None:
    state = restored.state
    resumed = f"resumed from {run.ckpt.directory}/{restored.step}"
    if restored.skipped:
      resumed += " (unreadable, moved aside: " + ", ".join(f"{s} -> {m}" for s, _, m in restored.skipped) + ")"
  else:
    params = initial_params(cfg, program.model_def, run.mesh)
    with jax.set_mesh(run.mesh):
      state = jax.jit(
          lambda p: init_state(*partition(p, program.trainable), program.tx),
          out_shardings=program.state_shardings,
          donate_argnums=0,
      )(params)
    resumed = f"initialised from {cfg.init_from}" if cfg.init_from else "random init"
  return state, int(jax.device_get(state["step"])), resumed


def _check_sharding(run: _Run, state: dict) -> None:
  """The sufficiently-sharded check on the placed parameters: over `max_replicated_fraction` of their bytes
  replicated on every device, a warning line naming the largest such tensors, or MeshError (sharding_check)."""
  cfg = run.cfg
  if cfg.sharding_check == "off":
    return
  report = sharding_report(combine(state["params"], state["frozen"]))
  if report.fraction <= cfg.max_replicated_fraction:
    return
  what = (
      f"{report.describe()} (max_replicated_fraction {cfg.max_replicated_fraction:.0%}); check sharding_rules "
      f"and the mesh {dict(run.mesh.shape)}"
  )
  if cfg.sharding_check == "error":
    raise MeshError(what)
  run.log.text(f"[{cfg.stage}] warning: {what}")


def _data_snapshot(iterator) -> dict:
  """This host's data counters (skips per reason, samples seen) right now; {} for sources without them."""
  read = getattr(iterator, "metrics", None)
  return read() if read is not None else {}


class _StepLog:
  """The metrics of one invocation: per-step host values (read one step late), the throughput window between
  log lines, the losses since the last checkpoint, and the console / TensorBoard writer (process 0)."""

  def __init__(self, run: _Run, start: int, resumed: str):
    cfg, program = run.cfg, run.program
    self.run, self.resumed = run, resumed
    self.flops = metrics_lib.FlopModel.build(
        cfg.model,
        {p: s.shape for p, s in flatten(program.model_def.shapes()).items()},
        {p for p in program.paths if program.trainable(p)},
        cfg.data.frame_size,
    )
    self.peak = metrics_lib.peak_flops(run.mesh.devices.flat[0], cfg.peak_flops_per_device)
    self.writer = metrics_lib.Writer(run.workdir, cfg.total_steps, start, jax.process_index() == 0)
    self.history: list[dict] = []
    self.losses: list[float] = []  # finite losses since the last checkpoint: its "best" score
    self._reset_window()

  def _reset_window(self) -> None:
    self.steps, self.time, self.tokens, self.frames, self.flop_count = 0, 0.0, 0.0, 0.0, 0.0

  def text(self, line: str) -> None:
    self.writer.text(line)

  def advance(self) -> None:
    self.writer.advance()

  def record(self, pending: tuple) -> dict:
    """(step, device metrics, host batch stats, step time or None, data counters) -> the step's host metrics,
    appended to `history`; NonFiniteError after optim.max_nonfinite non-finite steps in a row."""
    cfg, ckpt = self.run.cfg, self.run.ckpt
    s, dev, stats, dt, data_m = pending
    m = {k: float(v) for k, v in jax.device_get(dev).items()}
    tokens, sq, frames = stats
    m["step"] = s
    m.update(data_m)
    self.history.append(m)
    if dt is not None:  # None: the step that compiled; it would distort every rate
      # Hosts hold equal shares of the global batch: scale this host's counts by the process count.
      n = jax.process_count()
      self.steps += 1
      self.time += dt
      self.tokens += tokens * n
      self.frames += frames * n
      self.flop_count += self.flops.train_flops(tokens, sq, frames) * n
    if m["finite"]:
      self.losses.append(m["loss"])
    if m["nonfinite_streak"] >= cfg.optim.max_nonfinite:
      saved = ckpt.latest_step()
      last_good = (
          f"the last good state is checkpoint {saved} in {ckpt.directory}"
          if saved is not None
          else f"no checkpoint was saved yet (this run started from {self.resumed})"
      )
      raise NonFiniteError(
          f"step {s}: {int(m['nonfinite_streak'])} non-finite steps in a row "
          f"(optim.max_nonfinite={cfg.optim.max_nonfinite}); {last_good}"
      )
    return m

  def log(self, m: dict) -> None:
    """One console line and the TensorBoard scalars for step m["step"], with the rates since the last one."""
    cfg = self.run.cfg
    vals = dict(loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"], skipped=m["skipped"])
    data_scalars = {}
    if any(k.startswith("data/") for k in m):
      totals = metrics_lib.data_totals({k: v for k, v in m.items() if k.startswith("data/")}, self.run.data_shard[0])
      data_scalars = totals
      if totals["data/skipped_total"]:
        vals["data"] = metrics_lib.describe_skips(totals)
    if self.steps:
      t = self.time
      per_dev = self.flop_count / t / self.run.mesh.size
      vals.update(
          tokens_per_s=self.tokens / t,
          frames_per_s=self.frames / t,
          step_time_s=t / self.steps,
          tflops_per_device=per_dev / 1e12,
          mfu=per_dev / self.peak if self.peak else None,
      )
    self.writer.scalars(int(m["step"]), {f"train/{k}": v for k, v in vals.items() if k != "data"} | data_scalars)
    self.writer.console(int(m["step"]), cfg.total_steps, vals)
    self._reset_window()

  def take_mean_loss(self) -> float:
    """The mean finite loss since the last call (nan when none), for the checkpoint being saved."""
    mean = float(np.mean(self.losses)) if self.losses else float("nan")
    self.losses = []
    return mean

  def close(self) -> None:
    self.writer.close()


def _step_loop(run: _Run, state: dict, start: int, stop_after: int | None) -> tuple[dict, int, str]:
  """Steps until total_steps, `stop_after` steps, or an agreed preemption: (state, step, status)."""
  cfg, log, ckpt, iterator, coord = run.cfg, run.log, run.ckpt, run.iterator, run.coord
  step_fn = run.program.jit_step(cfg.optim.grad_accum)
  pending = None  # (step, device metrics, host batch stats, ...): read one step late so the device never idles
  status = "done"
  step = start

  def save(s: int) -> None:
    ckpt.save(s, state, iterator, run.config_record, log.take_mean_loss())

  with Preemption(coord) as preemption:
    t_last = time.perf_counter()
    while step < cfg.total_steps:
      preemption.publish(step)  # before this step is dispatched (see Preemption)
      host_batch = next(iterator)
      stats = metrics_lib.batch_stats(host_batch)
      data_m = _data_snapshot(iterator)  # right after the read, so the counters line up with this step
      batch = run.place_batch(host_batch)
      with jax.set_mesh(run.mesh):
        if coord.multi and step == start:
          # Compile first (jit reuses it), then start the first step together: compile times
          # differ between hosts by more than gloo's 30 s rendezvous under load.
          step_fn.lower(state, batch).compile()
          coord.barrier("train_step_compiled")
        state, dev_metrics = step_fn(state, batch)
      step += 1
      if pending is not None:
        m = log.record(pending)
        if m["step"] % cfg.log_every == 0:
          log.log(m)
      now = time.perf_counter()
      # The first step of an invocation includes compilation: keep it out of the rates.
      pending = (step, dev_metrics, stats, None if step == start + 1 else now - t_last, data_m)
      t_last = now
      log.advance()
      stop = stop_after is not None and step - start >= stop_after
      preempted = preemption.agreed(step)
      if step % cfg.ckpt.every == 0 or step == cfg.total_steps or stop or preempted:
        m = log.record(pending)
        pending = None
        if m["step"] % cfg.log_every == 0 or step == cfg.total_steps:
          log.log(m)
        save(step)
      if preempted:
        status = "preempted"
        log.text(f"[{cfg.stage}] SIGTERM: saved step {step}, exiting")
        break
      if stop:
        status = "stopped"
        break
    if pending is not None:
      log.record(pending)
  return state, step, status


def _finish(run: _Run, state: dict, step: int, status: str) -> dict:
  """Waits for the last checkpoint, writes summary.json (process 0) and, when done, the export: the summary."""
  cfg, log, ckpt, workdir = run.cfg, run.log, run.ckpt, run.workdir
  ckpt.wait()
  final_data = _data_snapshot(run.iterator)
  summary = _summary(
      cfg, status, step, log.history, metrics_lib.data_totals(final_data, run.data_shard[0]) if final_data else None
  )
  log.text(
      f"[{cfg.stage}] {status} at step {step}; data: "
      + (metrics_lib.describe_skips(summary["data"]) if summary["data"] else "no skip accounting (synthetic)")
  )
  if jax.process_index() == 0 and (log.history or not _has_summary(workdir, step)):
    # A run that trained nothing (rerun only to write the export) keeps the summary of the run that did.
    _write_json(os.path.join(workdir, "summary.json"), summary)
  if status == "done" and cfg.export:
    try:
      out = write_export(
          os.path.join(workdir, "export"),
          cfg,
          run.program.model_def,
          combine(state["params"], state["frozen"]),
          step,
          stoppable=lambda: run.stoppable("export"),
      )
    except Interrupted:
      raise Interrupted(
          "export",
          f"SIGTERM during the export: training is done and checkpoint {step} is saved in "
          f"{ckpt.directory}; {workdir}/export was not replaced (a partial one may be left in "
          f"export.tmp-{step}). Run the same command to write the export",
      ) from None
    log.text(f"[{cfg.stage}] exported to {out}")
  return summary


def _close(ckpt: Checkpointer | None, log: _StepLog | None, iterator, quiet: bool) -> None:
  """Closes what a run opened. `quiet` (an error is already on its way out): a second error from a
  close is dropped, so the first one is the one reported."""
  first = None
  for close in (getattr(ckpt, "close", None), getattr(log, "close", None), getattr(iterator, "close", None)):
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
  return dict(
      stage=cfg.stage,
      status=status,
      step=step,
      total_steps=cfg.total_steps,
      steps_this_run=len(history),
      last_loss=last.get("loss"),
      nonfinite_steps_skipped=int(last.get("skipped", 0)),
      data=data,
  )


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
