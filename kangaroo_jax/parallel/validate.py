"""Config-time checks that a model config, a mesh shape and the batch shapes fit together.

Run once before tracing: every problem is collected and reported in one error, each naming the
config field or shape and what would make it divisible.
"""

from __future__ import annotations

from typing import Mapping

from kangaroo_jax.config import KangarooConfig
from kangaroo_jax.parallel.mesh import MeshError


def validate_mesh_for_model(cfg: KangarooConfig, mesh_shape: Mapping[str, int], *, batch: int, seq_len: int,
                            frames_per_row: int = 0) -> None:
  """Raises MeshError listing every shape the mesh cannot split.

  Args:
    mesh_shape: {"data": .., "fsdp": .., "context": .., "tensor": ..} (e.g. dict(mesh.shape)).
    batch: global batch (rows); seq_len: tokens per row; frames_per_row: video frames per row.
  """
  data, fsdp = mesh_shape.get("data", 1), mesh_shape.get("fsdp", 1)
  context, tensor = mesh_shape.get("context", 1), mesh_shape.get("tensor", 1)
  llm, vision = cfg.llm, cfg.vision
  problems = []

  def need(cond: bool, msg: str):
    if not cond:
      problems.append(msg)

  need(batch % (data * fsdp) == 0, f"global batch {batch} must be divisible by data*fsdp = {data * fsdp}")
  if tensor > 1:
    need(llm.num_heads % tensor == 0, f"llm.num_heads {llm.num_heads} must be divisible by tensor={tensor}")
    need(llm.num_kv_heads % tensor == 0, f"llm.num_kv_heads {llm.num_kv_heads} must be divisible by tensor={tensor}")
    need(llm.intermediate_size % tensor == 0,
         f"llm.intermediate_size {llm.intermediate_size} must be divisible by tensor={tensor}")
    need(llm.vocab_size % tensor == 0, f"llm.vocab_size {llm.vocab_size} must be divisible by tensor={tensor}")
    need(vision.num_heads % tensor == 0, f"vision heads {vision.num_heads} must be divisible by tensor={tensor}")
  if context > 1:
    if cfg.attention_impl == "reference":
      problems.append(f"context={context} needs attention_impl 'ring', 'all_gather' or 'usp', not 'reference'")
    if cfg.attention_impl == "usp":
      u = cfg.ulysses_degree
      kv_local = llm.num_kv_heads // tensor if llm.num_kv_heads % tensor == 0 else 0
      if u:
        need(context % u == 0, f"ulysses_degree {u} must divide context={context}")
        need(kv_local % u == 0, f"llm.num_kv_heads {llm.num_kv_heads} / tensor={tensor} must be divisible by "
             f"ulysses_degree {u} (each all-to-all group member takes whole kv heads)")
    multiple = 2 * context if (cfg.attention_impl in ("ring", "usp") and cfg.load_balance) else context
    need(seq_len % multiple == 0, f"sequence length {seq_len} must be divisible by {multiple} "
         f"({'2*context for zigzag load balancing' if multiple != context else 'context'}); pad the packed rows")
  if frames_per_row:
    need(frames_per_row % cfg.projector.frames_per_group == 0,
         f"frames per row {frames_per_row} must be a multiple of ProjectorConfig.temporal_patch "
         f"({cfg.projector.frames_per_group}); pad by repeating the last frame")
  if problems:
    raise MeshError("mesh " + str(dict(mesh_shape)) + " does not fit the model/batch:\n  " + "\n  ".join(problems))
