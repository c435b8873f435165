"""Model configuration: frozen, validated dataclasses and the named presets.

Every field is checked once in `__post_init__`, before anything is traced, so a bad
config fails with a message naming the field instead of an XLA shape error later.
The `kangaroo-8b` preset carries the released shapes (docs/model.md); the design choices
docs/model.md marks ASSUMED are fields here, not constants in the model code.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import jax.numpy as jnp

AttentionImpl = Literal["reference", "ring", "all_gather", "usp"]
AttentionKernel = Literal["auto", "xla", "splash", "cudnn"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
DTypeName = Literal["float32", "bfloat16", "float16"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ATTENTION_IMPLS = ("reference", "ring", "all_gather", "usp")
_ATTENTION_KERNELS = ("auto", "xla", "splash", "cudnn")
_REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


class ConfigError(ValueError):
  """A configuration field holds a value the model cannot use."""


def _check(cond: bool, cls: str, field: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"{cls}.{field}: {msg}")


def _check_choice(value: Any, choices: tuple, cls: str, field: str) -> None:
  _check(value in choices, cls, field, f"got {value!r}, expected one of {choices}")


def _check_positive(obj: Any, *fields: str) -> None:
  for f in fields:
    v = getattr(obj, f)
    _check(isinstance(v, int) and v > 0, type(obj).__name__, f, f"expected a positive int, got {v!r}")


def dtype_of(name: str):
  """Maps a dtype name of the config to the jnp dtype."""
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 style frequency scaling ("llama3" rope_type in transformers)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    c = "RopeScaling"
    _check(self.factor >= 1.0, c, "factor", f"expected >= 1, got {self.factor}")
    _check(self.high_freq_factor > self.low_freq_factor > 0, c, "high_freq_factor",
           f"expected high_freq_factor > low_freq_factor > 0, got {self.high_freq_factor}, {self.low_freq_factor}")
    _check(self.original_max_position_embeddings > 0, c, "original_max_position_embeddings", "expected > 0")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama-3 decoder. Defaults are Llama-3-8B-Instruct as used by Kangaroo."""

  vocab_size: int = 128256
  hidden_size: int = 4096
  intermediate_size: int = 14336
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 128
  rms_norm_eps: float = 1e-5
  rope_theta: float = 500000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 8192
  tie_word_embeddings: bool = False
  bos_token_id: int = 128000
  eos_token_ids: tuple[int, ...] = (128001, 128009)

  def __post_init__(self):
    c = "LlamaConfig"
    _check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
    _check(self.num_heads % self.num_kv_heads == 0, c, "num_kv_heads",
           f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    _check(self.head_dim % 2 == 0, c, "head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
    _check(self.rms_norm_eps > 0, c, "rms_norm_eps", "expected > 0")
    _check(self.rope_theta > 0, c, "rope_theta", "expected > 0")
    _check(not self.tie_word_embeddings, c, "tie_word_embeddings",
           "Kangaroo uses an untied lm_head; tied embeddings are not implemented")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """EVA02-CLIP ViT. Defaults are EVA02-CLIP-L/14 at 448 px (docs/model.md section 1)."""

  image_size: int = 448  # the size pos_embed was trained at; other frame sizes interpolate
  patch_size: int = 14
  num_channels: int = 3
  width: int = 1024
  num_layers: int = 24
  head_width: int = 64
  mlp_hidden: int = 2730  # int(1024 * 2.6667)
  layer_norm_eps: float = 1e-6
  pt_hw_seq_len: int = 16  # grid the RoPE frequencies were pre-trained at (224 / 14)
  rope_theta: float = 10000.0
  # Which activations feed the projector (docs/model.md section 3): output of the last block before the final
  # norm ("last_prenorm"), after it ("last_postnorm"), or of the second-to-last block ("penultimate").
  feature_tap: Literal["last_prenorm", "last_postnorm", "penultimate"] = "last_prenorm"
  # How pos_embed is resized when frames are not `image_size` (torch F.interpolate semantics).
  pos_embed_interpolation: Literal["bicubic", "bilinear"] = "bicubic"
  pos_embed_antialias: bool = False

  @property
  def num_heads(self) -> int:
    return self.width // self.head_width

  @property
  def trained_grid(self) -> int:
    return self.image_size // self.patch_size

  def grid_for(self, height: int, width: int) -> tuple[int, int]:
    """Patch grid [gh, gw] for frames of the given pixel size; validates divisibility."""
    for name, v in (("height", height), ("width", width)):
      if v % self.patch_size:
        raise ConfigError(f"frame {name} {v} is not a multiple of VisionConfig.patch_size ({self.patch_size})")
    return height // self.patch_size, width // self.patch_size

  def __post_init__(self):
    c = "VisionConfig"
    _check_positive(self, "image_size", "patch_size", "num_channels", "width", "num_layers", "head_width",
                    "mlp_hidden", "pt_hw_seq_len")
    _check(self.width % self.head_width == 0, c, "head_width",
           f"width ({self.width}) must be a multiple of head_width ({self.head_width})")
    _check(self.head_width % 4 == 0, c, "head_width",
           f"2-D RoPE splits each head into h/w halves of rotated pairs; need head_width % 4 == 0, got {self.head_width}")
    _check(self.image_size % self.patch_size == 0, c, "image_size",
           f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
    _check(self.layer_norm_eps > 0, c, "layer_norm_eps", "expected > 0")
    _check_choice(self.feature_tap, ("last_prenorm", "last_postnorm", "penultimate"), c, "feature_tap")
    _check(self.feature_tap != "penultimate" or self.num_layers >= 2, c, "feature_tap",
           "penultimate tap needs at least 2 layers")
    _check_choice(self.pos_embed_interpolation, ("bicubic", "bilinear"), c, "pos_embed_interpolation")


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """Temporal position embedding, spatial-temporal patchify and the mlp2x_gelu projector.

  Design and the assumed choices: docs/model.md sections 1 and 3.
  """

  # "sinusoidal": fixed embedding of each frame's timestamp (seconds), no parameters (our default, ASSUMED);
  # "learned": a table indexed by the rounded timestamp in seconds; "none".
  tpe: Literal["sinusoidal", "learned", "none"] = "sinusoidal"
  tpe_max_seconds: int = 4096  # rows of the learned table; later timestamps clamp to the last row
  tpe_base: float = 10000.0
  # "avg": parameter-free mean over temporal x spatial windows (ASSUMED default); "conv3d": depthwise
  # Conv3d with kernel == stride == window; "none": every frame's patches pass through.
  patchify: Literal["avg", "conv3d", "none"] = "avg"
  temporal_patch: int = 2
  spatial_patch: int = 2
  projector_type: Literal["mlp2x_gelu"] = "mlp2x_gelu"

  @property
  def frames_per_group(self) -> int:
    return 1 if self.patchify == "none" else self.temporal_patch

  def tokens_per_group(self, grid_h: int, grid_w: int) -> int:
    if self.patchify == "none":
      return grid_h * grid_w
    return (grid_h // self.spatial_patch) * (grid_w // self.spatial_patch)

  def __post_init__(self):
    c = "ProjectorConfig"
    _check_choice(self.tpe, ("sinusoidal", "learned", "none"), c, "tpe")
    _check_choice(self.patchify, ("avg", "conv3d", "none"), c, "patchify")
    _check_choice(self.projector_type, ("mlp2x_gelu",), c, "projector_type")
    _check_positive(self, "tpe_max_seconds", "temporal_patch", "spatial_patch")
    _check(self.tpe_base > 1.0, c, "tpe_base", "expected > 1")


@dataclasses.dataclass(frozen=True)
class KangarooConfig:
  """The assembled video-language model plus the numerics / execution options shared by its parts."""

  llm: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
  # Id written into `input_ids` at every visual-token position. Negative, so it can never be a vocab id.
  visual_token_id: int = -200
  param_dtype: DTypeName = "float32"
  compute_dtype: DTypeName = "bfloat16"
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
  scan_layers: bool = True
  logits_fp32: bool = True

  def __post_init__(self):
    c = "KangarooConfig"
    _check(self.visual_token_id < 0, c, "visual_token_id",
           f"must be negative so it never collides with a token id, got {self.visual_token_id}")
    _check_choice(self.param_dtype, tuple(_DTYPES), c, "param_dtype")
    _check_choice(self.compute_dtype, tuple(_DTYPES), c, "compute_dtype")
    _check_choice(self.attention_impl, _ATTENTION_IMPLS, c, "attention_impl")
    _check_choice(self.attention_kernel, _ATTENTION_KERNELS, c, "attention_kernel")
    _check_choice(self.remat_policy, _REMAT_POLICIES, c, "remat_policy")
    _check(self.attention_block > 0, c, "attention_block", f"must be a positive token count, got {self.attention_block}")
    _check(isinstance(self.ulysses_degree, int) and self.ulysses_degree >= 0, c, "ulysses_degree",
           f"must be a device count >= 0 (0 = automatic), got {self.ulysses_degree!r}")
    _check(isinstance(self.vision_chunk_frames, int) and self.vision_chunk_frames >= 0, c, "vision_chunk_frames",
           f"must be a frame count >= 0 (0 = no chunking), got {self.vision_chunk_frames!r}")
    if self.projector.patchify != "none":
      g = self.vision.trained_grid
      _check(g % self.projector.spatial_patch == 0, c, "projector.spatial_patch",
             f"the trained patch grid {g}x{g} is not divisible by spatial_patch {self.projector.spatial_patch}")

  @property
  def dtype(self):
    return dtype_of(self.compute_dtype)

  @property
  def params_dtype(self):
    return dtype_of(self.param_dtype)

  def replace(self, **changes) -> "KangarooConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> "KangarooConfig":
    """Builds a config from `to_dict` output; unknown keys are an error naming the key."""
    d = dict(d)
    llm = dict(d.pop("llm", {}))
    if llm.get("rope_scaling") is not None:
      llm["rope_scaling"] = _build(RopeScaling, llm["rope_scaling"], "llm.rope_scaling")
    if "eos_token_ids" in llm:
      llm["eos_token_ids"] = tuple(llm["eos_token_ids"])
    parts = dict(
        llm=_build(LlamaConfig, llm, "llm"),
        vision=_build(VisionConfig, d.pop("vision", {}), "vision"),
        projector=_build(ProjectorConfig, d.pop("projector", {}), "projector"),
    )
    return _build(cls, {**d, **parts}, "")


def _build(cls, values: dict, where: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    prefix = f"{where}." if where else ""
    raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
                      f"known keys: {sorted(known)}")
  return cls(**values)


def kangaroo_8b() -> KangarooConfig:
  """The released Kangaroo shapes: Llama-3-8B-Instruct + EVA02-CLIP-L/14-448 + mlp2x_gelu (1024 -> 4096)."""
  return KangarooConfig()


def tiny() -> KangarooConfig:
  """A few-hundred-thousand-parameter model with every structural feature of the real one (tests, demo)."""
  return KangarooConfig(
      llm=LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=1,
                      eos_token_ids=(2,)),
      vision=VisionConfig(image_size=56, patch_size=14, width=32, num_layers=2, head_width=16, mlp_hidden=64,
                          pt_hw_seq_len=2),
      projector=ProjectorConfig(),
      param_dtype="float32",
      compute_dtype="float32",
  )


PRESETS = {"kangaroo-8b": kangaroo_8b, "tiny": tiny}


def preset(name: str) -> KangarooConfig:
  try:
    return PRESETS[name]()
  except KeyError:
    raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None
