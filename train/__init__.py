"""Trainer for kangaroo-jax: `python -m train --config configs/<stage>.py --workdir DIR`.

config.py      ml_collections config -> validated, frozen `TrainConfig` (before anything is traced)
optim.py       schedule, trainable/frozen split and per-module learning rates by regex over param paths
step.py        the pure train step: masked per-token loss, gradient accumulation, NaN/inf guard
checkpoint.py  Orbax CheckpointManager: state + per-process iterator state + config, keep-last-K + best
metrics.py     FLOPs from model shapes, MFU, data skip counters, TensorBoard + console line
loop.py        mesh -> model -> data -> restore-or-init -> jitted step loop (SIGTERM-safe) -> WORKDIR/summary.json
export.py      WORKDIR/export in the `from_pretrained` layout
launch_tpu_vm.sh  the same `python -m train --distributed=on` on every host of a TPU VM pod (gcloud ssh)
"""
