"""`python -m train --config configs/<stage>.py[:arg] --workdir DIR [--config.optim.lr=3e-4 ...]`.

The same command runs on a laptop CPU, a GPU and every host of a TPU pod. Multi-process runs call
`jax.distributed.initialize` before anything touches a device: on a Cloud TPU VM pod with no
arguments (the TPU runtime names the coordinator), elsewhere with --coordinator_address,
--num_processes and --process_id (e.g. two CPU processes on localhost in the tests).

Exit status: 0 done, stopped (--stop_after) or stopped by SIGTERM (resumable: run the same command
again); 2 bad input, with one line on stderr (a flag, a config field, a mesh that does not fit the
devices, a workdir that cannot be written, checkpoints that cannot be restored or were written by
another stage); 1 training failed (too many non-finite steps, also one line) or an unexpected error.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from train.coordination import STOP, Interrupted

STOP.install()  # first: a SIGTERM during the slow imports and startup below must end cleanly, not kill

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (get_config(arg))", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard events and the export go here")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "auto: initialise jax.distributed when --coordinator_address or a multi-host TPU "
    "environment is present; on: always (TPU pods: no other flags needed)",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after", None, "end after this many steps in this invocation (with a " "checkpoint), like a job time limit"
)

EXIT_BAD_INPUT = 2
_HELP_FLAGS = ("-h", "-?", "--help", "-help", "--helpshort", "--helpfull")


def _fail(message: str, code: int = EXIT_BAD_INPUT, skip_exit_handlers: bool = False):
  """One line on stderr, then exit: multi-line messages (a mesh's list of problems) are joined."""
  lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
  print("error: " + "; ".join(lines).replace(":; ", ": "), file=sys.stderr, flush=True)
  if skip_exit_handlers:
    # The workdir cannot be written: TensorBoard's exit handler and writer thread would each fail
    # again with a traceback after this line. The checkpointer has already finished (train() closed it).
    sys.stdout.flush()
    os._exit(code)
  sys.exit(code)


def _config_spec(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_override(config, argv: list[str]) -> str | None:
  """'--config.optim.x: unknown field optim.x; known: ...' for the first override naming no field."""
  for arg in argv:
    if not (arg.startswith("--config.") or arg.startswith("--noconfig.")):
      continue
    path = arg.split("=", 1)[0].split(".", 1)[1]
    node, done = config, []
    for part in path.split("."):
      if not hasattr(node, "keys"):
        return f"--config.{path}: {'.'.join(done)} is a {type(node).__name__}, it has no field {part!r}"
      if part not in node:
        known = ", ".join(sorted(node.keys()))
        return f"--config.{path}: unknown field {'.'.join(done + [part])}; known: {known or '(none)'}"
      node, done = node[part], done + [part]
  return None


def _flag_error(argv: list[str], error: Exception) -> str:
  """One line for a failed flag parse: which override or flag, and what was expected."""
  spec = _config_spec(argv)
  if spec is None:
    return "--config is required (an experiment config file, e.g. configs/stage2_video_pretrain.py:mode=cpu)"
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    return f"--config {spec}: no such file {path!r}"
  try:  # loaded again, as config_flags does, to say which part of the command line is wrong
    module_spec = importlib.util.spec_from_file_location("_train_config_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(*spec.split(":", 1)[1:])
  except Exception as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"--config {spec}: {type(e).__name__}: {lines[-1] if lines else ''}"
  unknown = _unknown_override(config, argv)
  if unknown is not None:
    return unknown
  lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
  return (lines[-1] if lines else type(error).__name__) + " (see --help)"


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parse, with --help exiting 0 and every bad flag or override a one-line error (exit 2)."""
  own = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
  asked = [a for a in own if a in _HELP_FLAGS]
  if asked:
    app.usage(shorthelp=asked[0] != "--helpfull", writeto_stdout=True, exitcode=0)
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # flags.Error, or what the config file / an override raised
    _fail(_flag_error(argv, e))
  if _CONFIG.value is None:
    _fail(_flag_error([], ValueError()))
  try:
    _CONFIG.value.keys()  # a config file that failed to load raises only when first used
  except Exception as e:
    _fail(_flag_error(argv, e))
  if not _WORKDIR.value:
    _fail("--workdir is required (checkpoints, TensorBoard events and the export go there)")
  if len(rest) > 1:
    _fail(f"unexpected arguments {rest[1:]} (flags are --name=value; see --help)")
  return rest


def _maybe_initialize_distributed() -> None:
  import jax

  multi_host_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  on = _DISTRIBUTED.value == "on" or (
      _DISTRIBUTED.value == "auto" and (_COORDINATOR.value is not None or multi_host_tpu)
  )
  if not on:
    return
  kwargs = {}
  if _COORDINATOR.value is not None:
    kwargs = dict(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
    )
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU collectives
  jax.distributed.initialize(**kwargs)
  STOP.install()  # again: initialize put the distributed runtime's preemption notifier on SIGTERM


def _run() -> int:
  try:
    with STOP.stoppable("startup"):  # raises at once if SIGTERM came during the imports or the flag parse
      from train.config import from_configdict

      cfg = from_configdict(_CONFIG.value)  # validate everything before a device is touched
  except Interrupted:
    raise Interrupted(
        "startup",
        "SIGTERM during startup: stopped before training; nothing was changed. Run the " "same command to start",
    ) from None
  from kangaroo_jax import compile_cache

  compile_cache.enable()  # before anything compiles: a rerun or resume loads the step instead of compiling it
  _maybe_initialize_distributed()
  from train.loop import train

  result = train(cfg, _WORKDIR.value, stop_after=_STOP_AFTER.value)
  return 0 if result.status in ("done", "preempted", "stopped") else 1


def main(argv) -> int:
  try:
    return _run()
  except Interrupted as e:  # the message says what state the workdir is in
    print(e, flush=True)
    return 0
  except Exception as e:
    from kangaroo_jax.config import ConfigError
    from kangaroo_jax.parallel.mesh import MeshError
    from train.checkpoint import CheckpointError
    from train.loop import NonFiniteError, WorkdirError

    if isinstance(e, (ConfigError, MeshError, WorkdirError, CheckpointError)):
      _fail(str(e), skip_exit_handlers=isinstance(e, WorkdirError))
    if isinstance(e, NonFiniteError):
      _fail(str(e), code=1)
    raise


def console() -> None:
  """The `kangaroo-train` console script (same as `python -m train`)."""
  sys.modules["__main__"].__doc__ = __doc__  # absl's usage text is the main module's docstring
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=_parse_flags))
