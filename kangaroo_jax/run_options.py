"""How a model runs, apart from what it is: numerics, attention implementation, rematerialisation.

`KangarooConfig` (kangaroo_jax/config.py) holds shapes only and is what a checkpoint stores; `RunOptions`
is chosen per run (training config's `run` section, `from_pretrained(path, **run_overrides)`, CLI flags)
and passed once, as one object, to each model constructor. Every choice list below is spelled once, as a
`Literal`; the tuples the checks use are derived from it (the attention and remat registries are tested
against them in tests/test_config.py).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import jax.numpy as jnp

from kangaroo_jax.checks import ConfigError, check_bool, check_choice, check_int, fail

AttentionImpl = Literal["reference", "ring", "all_gather", "usp"]
# The vision tower attends within each frame (1 + patches tokens, not split over the context axis), so it
# takes only the dense impl today; a context-parallel one would need the patch axis sharded.
VisionAttentionImpl = Literal["reference"]
AttentionKernel = Literal["auto", "xla", "splash", "cudnn"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
DTypeName = Literal["float32", "bfloat16", "float16"]

ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)
VISION_ATTENTION_IMPLS: tuple[str, ...] = get_args(VisionAttentionImpl)
ATTENTION_KERNELS: tuple[str, ...] = get_args(AttentionKernel)
REMAT_POLICIES: tuple[str, ...] = get_args(RematPolicy)
DTYPE_NAMES: tuple[str, ...] = get_args(DTypeName)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
assert tuple(_DTYPES) == DTYPE_NAMES

# Keys an old kangaroo_config.json (before shapes and run options were split) may hold at its top level:
# every RunOptions field, read into the loaded run options, and `scan_layers`, which nothing ever read.
DROPPED_KEYS = ("scan_layers",)


def dtype_of(name: str):
  """Maps a dtype name ("float32", "bfloat16", "float16") to the jnp dtype."""
  return _DTYPES[name]


def dtype_name(dtype) -> str:
  """The inverse of `dtype_of` (numpy / jnp dtype or its name); ConfigError for other dtypes."""
  name = jnp.dtype(dtype).name
  if name not in _DTYPES:
    raise ConfigError(f"dtype {name!r}: expected one of {DTYPE_NAMES}")
  return name


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """Execution options shared by the model's parts; defaults are exact float32 on one device.

  Training configs and the loaders set bf16 compute where the weights or the run call for it
  (configs/common.py, `kangaroo_jax.pretrained.from_pretrained`).
  """

  param_dtype: DTypeName = "float32"
  compute_dtype: DTypeName = "float32"
  attention_impl: AttentionImpl = "reference"
  # Per-device kernel: "auto" = splash on TPU, cuDNN on GPU (dense, half precision), XLA otherwise.
  # "splash" off TPU runs Pallas in interpret mode (tests).
  attention_kernel: AttentionKernel = "auto"
  # Ring attention tile length (tokens per query/key block). Larger tiles mean fewer loop
  # iterations and bigger score buffers; fused kernels on TPU/GPU pick their own inner blocks.
  attention_block: int = 512
  # USP (attention_impl "usp"): devices per all-to-all (Ulysses) group on the context axis; the rest form
  # the ring. 0 = the largest divisor of both the context axis and the kv heads per device.
  ulysses_degree: int = 0
  # Zigzag reorder of the sequence for causal ring / USP attention (only acts when context > 1).
  load_balance: bool = True
  remat_policy: RematPolicy = "none"
  # Frames the vision tower encodes per step of a rematerialised scan (all devices together; 0 = all at
  # once). Bounds the tower's activation memory for thousands of frames; must divide batch x frames.
  vision_chunk_frames: int = 0
  vision_attention_impl: VisionAttentionImpl = "reference"
  logits_fp32: bool = True

  def __post_init__(self):
    c = "RunOptions"  # from_dict renames it to where the options came from (run., from_pretrained.)
    check_choice(self, c, "param_dtype", DTYPE_NAMES)
    check_choice(self, c, "compute_dtype", DTYPE_NAMES)
    check_choice(self, c, "attention_impl", ATTENTION_IMPLS)
    check_choice(self, c, "vision_attention_impl", VISION_ATTENTION_IMPLS)
    check_choice(self, c, "attention_kernel", ATTENTION_KERNELS)
    check_choice(self, c, "remat_policy", REMAT_POLICIES)
    check_int(self, c, "attention_block", lo=1, what="a positive token count")
    check_int(self, c, "ulysses_degree", lo=0, what="a device count >= 0 (0 = automatic)")
    check_int(self, c, "vision_chunk_frames", lo=0, what="a frame count >= 0 (0 = no chunking)")
    for f in ("load_balance", "logits_fp32"):
      check_bool(self, c, f)

  def check_for_training(self, where: str = "run") -> None:
    """ConfigError naming `where.param_dtype` unless the weights the optimizer updates are float32."""
    if self.param_dtype != "float32":
      raise fail(
          where,
          "param_dtype",
          f"training keeps float32 master weights, got {self.param_dtype!r} "
          f"(set {where}.compute_dtype for bf16 matmuls)",
      )

  @property
  def dtype(self):
    """The compute dtype (activations, matmuls) as a jnp dtype."""
    return dtype_of(self.compute_dtype)

  @property
  def params_dtype(self):
    return dtype_of(self.param_dtype)

  def replace(self, **changes) -> "RunOptions":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def from_dict(cls, values: dict, where: str = "RunOptions") -> "RunOptions":
    """Builds run options from a dict; an unknown key or a bad value is a ConfigError naming `where.key`."""
    known = cls.field_names()
    unknown = sorted(set(values) - set(known))
    if unknown:
      raise ConfigError(f"{where}.{unknown[0]}: unknown run option; known: {sorted(known)}")
    try:
      return cls(**values)
    except ConfigError as e:
      raise ConfigError(str(e).replace("RunOptions.", f"{where}.", 1)) from None


def split_legacy_keys(data: dict) -> tuple[dict, dict]:
  """An old-style kangaroo_config.json dict -> (shape keys, run-option keys found at its top level).

  The rule for checkpoints written before the split: a top-level key naming a RunOptions field is
  returned as a run option (the loader uses it as that checkpoint's default, overrides win); the keys of
  DROPPED_KEYS are dropped; everything else is left for `KangarooConfig.from_dict`, which rejects what it
  does not know.
  """
  names = set(RunOptions.field_names())
  shapes = {k: v for k, v in data.items() if k not in names and k not in DROPPED_KEYS}
  run = {k: v for k, v in data.items() if k in names}
  return shapes, run
