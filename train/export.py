"""WORKDIR/export in the `kangaroo_jax.from_pretrained` layout, so chat / evaluate take a trained run.

Written with `kangaroo_jax.pretrained.save_pretrained` (config JSON, Orbax `state/`, tokenizer files)
into `export.tmp-<step>`, which replaces the previous export only once complete: `export/` is always
either the previous complete export or the new complete one, never a half-written folder. A crash or
SIGTERM part way leaves `export.tmp-<step>` (removed by the next export) and the previous `export/`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from typing import Callable, ContextManager

import jax
from jax.experimental import multihost_utils

from kangaroo_jax.pretrained import save_pretrained
from train.config import TrainConfig
from train.params import ModelDef


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _swap_in(tmp: str, out_dir: str, step: int) -> None:
  """tmp -> out_dir; the previous export goes to `<out_dir>.old-<step>` first and is removed last."""
  old = f"{out_dir}.old-{step}"
  if os.path.exists(old):
    shutil.rmtree(old)  # left by a crash between the two renames of an earlier export of this step
  if os.path.exists(out_dir):
    os.replace(out_dir, old)
  os.replace(tmp, out_dir)
  for stale in glob.glob(glob.escape(out_dir) + ".old-*"):  # this one and any a crash left behind
    shutil.rmtree(stale, ignore_errors=True)


def write_export(
    out_dir: str,
    cfg: TrainConfig,
    model_def: ModelDef,
    params: dict,
    step: int,
    stoppable: Callable[[], ContextManager] = contextlib.nullcontext,
) -> str:
  """All processes call this (each writes the shards it holds). Returns the export folder.

  `stoppable()` wraps the writing of the temporary folder (train.coordination.STOP.stoppable: SIGTERM
  abandons it there); the swap into place is never interrupted.
  """
  out_dir = os.path.abspath(out_dir)
  tmp = f"{out_dir}.tmp-{step}"
  primary = jax.process_index() == 0
  if primary and os.path.exists(tmp):
    shutil.rmtree(tmp)  # left by a crash during an earlier export
  _sync("export_start")
  with stoppable():
    save_pretrained(model_def.merge(params), cfg.data.tokenizer or None, tmp)
  _sync("export_written")
  if primary:
    _swap_in(tmp, out_dir, step)
  _sync("export_done")
  return out_dir
