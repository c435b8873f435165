"""WORKDIR/export in the `kangaroo_jax.from_pretrained` layout, so chat / evaluate take a trained run.

Written with `kangaroo_jax.pretrained.save_pretrained` (config JSON, Orbax `state/`, tokenizer files)
into a temporary folder that replaces the previous export only once complete.
"""

from __future__ import annotations

import os
import shutil

import jax
from jax.experimental import multihost_utils

from kangaroo_jax.pretrained import save_pretrained
from train.config import TrainConfig
from train.params import ModelDef


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def write_export(out_dir: str, cfg: TrainConfig, model_def: ModelDef, params: dict, step: int) -> str:
  """All processes call this (each writes the shards it holds). Returns the export folder."""
  out_dir = os.path.abspath(out_dir)
  tmp = f"{out_dir}.tmp-{step}"
  primary = jax.process_index() == 0
  if primary and os.path.exists(tmp):
    shutil.rmtree(tmp)  # left by a crash during an earlier export
  _sync("export_start")
  save_pretrained(model_def.merge(params), cfg.data.tokenizer or None, tmp)
  _sync("export_written")
  if primary:
    old = f"{out_dir}.old"
    if os.path.exists(out_dir):
      os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
  _sync("export_done")
  return out_dir
