"""`python -m train --config configs/<stage>.py[:arg] --workdir DIR [--config.optim.lr=3e-4 ...]`.

The same command runs on a laptop CPU, a GPU and every host of a TPU pod. Multi-process runs call
`jax.distributed.initialize` before anything touches a device: on a Cloud TPU VM pod with no
arguments (the TPU runtime names the coordinator), elsewhere with --coordinator_address,
--num_processes and --process_id (e.g. two CPU processes on localhost in the tests).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (get_config(arg))", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard events and the export go here")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "auto: initialise jax.distributed when --coordinator_address or a multi-host TPU "
                                 "environment is present; on: always (TPU pods: no other flags needed)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None, "end after this many steps in this invocation (with a "
                                   "checkpoint), like a job time limit")


def _maybe_initialize_distributed() -> None:
  import os

  import jax
  on = _DISTRIBUTED.value == "on" or (
      _DISTRIBUTED.value == "auto" and (_COORDINATOR.value is not None or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")))
  if not on:
    return
  kwargs = {}
  if _COORDINATOR.value is not None:
    kwargs = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                  process_id=_PROCESS_ID.value)
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU collectives
  jax.distributed.initialize(**kwargs)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  from train.config import from_configdict
  cfg = from_configdict(_CONFIG.value)  # validate everything before a device is touched
  _maybe_initialize_distributed()
  from train.loop import train
  result = train(cfg, _WORKDIR.value, stop_after=_STOP_AFTER.value)
  return 0 if result.status in ("done", "preempted", "stopped") else 1


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  sys.exit(app.run(main))
