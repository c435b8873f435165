"""Checks that a model config, a mesh and the rules table fit together.

`validate_mesh_for_model` runs once before tracing: every problem is collected and reported in one
error, each naming the config field or shape and what would make it divisible.
`sharding_report` / `assert_params_sufficiently_sharded` run once the parameters are placed: they name
the largest tensors that the rules left replicated on every device (a rule that maps nothing to the mesh
multiplies memory by the device count without failing anywhere).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
from flax import nnx

from kangaroo_jax.config import KangarooConfig
from kangaroo_jax.parallel.mesh import MeshError
from kangaroo_jax.parallel.rules import mesh_axes_for
from kangaroo_jax.run_options import RunOptions


def validate_mesh_for_model(
    cfg: KangarooConfig,
    run: RunOptions,
    mesh_shape: Mapping[str, int],
    *,
    batch: int,
    seq_len: int,
    frames_per_row: int = 0,
) -> None:
  """Raises MeshError listing every shape the mesh cannot split.

  Args:
    cfg, run: the model's shapes and how it runs (attention impl, ulysses degree, zigzag load balance).
    mesh_shape: {"data": .., "fsdp": .., "context": .., "tensor": ..} (e.g. dict(mesh.shape)).
    batch: global batch (rows); seq_len: tokens per row; frames_per_row: video frames per row.
  """
  # Which mesh axes split what comes from the rules table in force (the default: batch over data*fsdp,
  # sequence over context, heads / mlp / vocab over tensor).
  batch_axes, batch_n = _split(mesh_shape, "activation_batch")
  heads_axes, tensor = _split(mesh_shape, "activation_heads")
  mlp_axes, mlp_n = _split(mesh_shape, "activation_mlp")
  vocab_axes, vocab_n = _split(mesh_shape, "activation_vocab")
  _, context = _split(mesh_shape, "activation_length")
  llm, vision = cfg.llm, cfg.vision
  problems = []

  def need(cond: bool, msg: str):
    if not cond:
      problems.append(msg)

  need(batch % batch_n == 0, f"global batch {batch} must be divisible by {batch_axes} = {batch_n}")
  if tensor > 1:
    need(llm.num_heads % tensor == 0, f"llm.num_heads {llm.num_heads} must be divisible by {heads_axes}={tensor}")
    need(
        llm.num_kv_heads % tensor == 0,
        f"llm.num_kv_heads {llm.num_kv_heads} must be divisible by {heads_axes}={tensor}",
    )
    need(vision.num_heads % tensor == 0, f"vision heads {vision.num_heads} must be divisible by {heads_axes}={tensor}")
  if mlp_n > 1:
    need(
        llm.intermediate_size % mlp_n == 0,
        f"llm.intermediate_size {llm.intermediate_size} must be divisible by {mlp_axes}={mlp_n}",
    )
  if vocab_n > 1:
    need(llm.vocab_size % vocab_n == 0, f"llm.vocab_size {llm.vocab_size} must be divisible by {vocab_axes}={vocab_n}")
  if context > 1:
    if run.attention_impl == "reference":
      problems.append(f"context={context} needs attention_impl 'ring', 'all_gather' or 'usp', not 'reference'")
    if run.attention_impl == "usp":
      u = run.ulysses_degree
      kv_local = llm.num_kv_heads // tensor if llm.num_kv_heads % tensor == 0 else 0
      if u:
        need(context % u == 0, f"ulysses_degree {u} must divide context={context}")
        need(
            kv_local % u == 0,
            f"llm.num_kv_heads {llm.num_kv_heads} / {heads_axes}={tensor} must be divisible by "
            f"ulysses_degree {u} (each all-to-all group member takes whole kv heads)",
        )
    multiple = 2 * context if (run.attention_impl in ("ring", "usp") and run.load_balance) else context
    need(
        seq_len % multiple == 0,
        f"sequence length {seq_len} must be divisible by {multiple} "
        f"({'2*context for zigzag load balancing' if multiple != context else 'context'}); pad the packed rows",
    )
  if frames_per_row:
    need(
        frames_per_row % cfg.projector.frames_per_group == 0,
        f"frames per row {frames_per_row} must be a multiple of ProjectorConfig.temporal_patch "
        f"({cfg.projector.frames_per_group}); pad by repeating the last frame",
    )
  if problems:
    raise MeshError("mesh " + str(dict(mesh_shape)) + " does not fit the model/batch:\n  " + "\n  ".join(problems))


def _split(mesh_shape: Mapping[str, int], logical: str) -> tuple[str, int]:
  """("data*fsdp", their total size): the mesh axes the rules give `logical`, for messages, and how many
  ways they split it."""
  axes = mesh_axes_for(logical)
  return "*".join(axes) or "no axis", math.prod(mesh_shape.get(a, 1) for a in axes)


@dataclasses.dataclass(frozen=True)
class ShardingReport:
  """Parameter bytes held whole on every device of a multi-device mesh.

  largest: (path, shape, bytes) of the replicated tensors, largest first (at most `top` of them)."""

  total_bytes: int
  replicated_bytes: int
  largest: tuple[tuple[str, tuple[int, ...], int], ...]

  @property
  def fraction(self) -> float:
    return self.replicated_bytes / max(self.total_bytes, 1)

  def describe(self) -> str:
    """One line: the fraction and the largest replicated tensors by path, shape and size."""
    top = ", ".join(f"{p} {list(s)} {_mib(b)}" for p, s, b in self.largest)
    return (
        f"{self.fraction:.1%} of parameter bytes ({_mib(self.replicated_bytes)} of {_mib(self.total_bytes)}) "
        f"are replicated on every device" + (f"; largest: {top}" if top else "")
    )


def _mib(n: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n / 2**10:.1f} KiB"


def _path(keys) -> str:
  parts = []
  for k in keys:
    k = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    if k != "value":  # nnx.Variable's own field, not part of the parameter's name
      parts.append(str(k))
  return "/".join(parts)


def sharding_report(params: Any, top: int = 5) -> ShardingReport:
  """params: an nnx.Module (its nnx.Param state) or any pytree of placed jax.Arrays (the trainer's dicts)."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  total = replicated = 0
  found = []
  for keys, arr in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not isinstance(arr, jax.Array):
      continue
    nbytes = arr.size * arr.dtype.itemsize
    total += nbytes
    if len(arr.sharding.device_set) > 1 and arr.sharding.is_fully_replicated:
      replicated += nbytes
      found.append((_path(keys), tuple(arr.shape), nbytes))
  found.sort(key=lambda t: (-t[2], t[0]))
  return ShardingReport(total, replicated, tuple(found[:top]))


def assert_params_sufficiently_sharded(params: Any, tolerance: float = 0.02, top: int = 5) -> ShardingReport:
  """Raises MeshError (naming the largest replicated tensors) when more than `tolerance` of the parameter
  bytes are replicated on every device; returns the report otherwise."""
  report = sharding_report(params, top)
  if report.fraction > tolerance:
    raise MeshError(
        f"{report.describe()} (tolerance {tolerance:.0%}); check the logical-axis rules "
        "(sharding_rules) and the mesh shape"
    )
  return report
