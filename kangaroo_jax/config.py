"""Model configuration: frozen, validated dataclasses and the named presets.

Every field is checked once in `__post_init__`, before anything is traced, so a bad
config fails with a message naming the field instead of an XLA shape error later.
The `kangaroo-8b` preset carries the released shapes (docs/model.md); the design choices
docs/model.md marks ASSUMED are fields here, not constants in the model code. These classes say what the
model is (what a checkpoint stores); how it runs (dtypes, attention impl, remat) is
`kangaroo_jax.run_options.RunOptions`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal, get_args

# ConfigError lives with the checks that raise it; re-exported here, where callers import it from.
from kangaroo_jax.checks import ConfigError, check, check_choice, check_positive_ints  # noqa: F401

FeatureTap = Literal["last_prenorm", "last_postnorm", "penultimate"]
PosEmbedInterpolation = Literal["bicubic", "bilinear"]
TPEKind = Literal["sinusoidal", "learned", "none"]
Patchify = Literal["avg", "conv3d", "none"]
ProjectorType = Literal["mlp2x_gelu"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 style frequency scaling ("llama3" rope_type in transformers)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    c = "RopeScaling"
    check(self.factor >= 1.0, c, "factor", f"expected >= 1, got {self.factor}")
    check(
        self.high_freq_factor > self.low_freq_factor > 0,
        c,
        "high_freq_factor",
        f"expected high_freq_factor > low_freq_factor > 0, got {self.high_freq_factor}, {self.low_freq_factor}",
    )
    check(self.original_max_position_embeddings > 0, c, "original_max_position_embeddings", "expected > 0")


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
    check_positive_ints(
        self,
        c,
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "max_position_embeddings",
    )
    check(
        self.num_heads % self.num_kv_heads == 0,
        c,
        "num_kv_heads",
        f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
    )
    check(self.head_dim % 2 == 0, c, "head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
    check(self.rms_norm_eps > 0, c, "rms_norm_eps", "expected > 0")
    check(self.rope_theta > 0, c, "rope_theta", "expected > 0")
    check(
        not self.tie_word_embeddings,
        c,
        "tie_word_embeddings",
        "Kangaroo uses an untied lm_head; tied embeddings are not implemented",
    )


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
  feature_tap: FeatureTap = "last_prenorm"
  # How pos_embed is resized when frames are not `image_size` (torch F.interpolate semantics).
  pos_embed_interpolation: PosEmbedInterpolation = "bicubic"
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
    check_positive_ints(
        self,
        c,
        "image_size",
        "patch_size",
        "num_channels",
        "width",
        "num_layers",
        "head_width",
        "mlp_hidden",
        "pt_hw_seq_len",
    )
    check(
        self.width % self.head_width == 0,
        c,
        "head_width",
        f"width ({self.width}) must be a multiple of head_width ({self.head_width})",
    )
    check(
        self.head_width % 4 == 0,
        c,
        "head_width",
        f"2-D RoPE splits each head into h/w halves of rotated pairs; need head_width % 4 == 0, "
        f"got {self.head_width}",
    )
    check(
        self.image_size % self.patch_size == 0,
        c,
        "image_size",
        f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})",
    )
    check(self.layer_norm_eps > 0, c, "layer_norm_eps", "expected > 0")
    check_choice(self, c, "feature_tap", get_args(FeatureTap))
    check(
        self.feature_tap != "penultimate" or self.num_layers >= 2,
        c,
        "feature_tap",
        "penultimate tap needs at least 2 layers",
    )
    check_choice(self, c, "pos_embed_interpolation", get_args(PosEmbedInterpolation))


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """Temporal position embedding, spatial-temporal patchify and the mlp2x_gelu projector.

  Design and the assumed choices: docs/model.md sections 1 and 3.
  """

  # "sinusoidal": fixed embedding of each frame's timestamp (seconds), no parameters (our default, ASSUMED);
  # "learned": a table indexed by the rounded timestamp in seconds; "none".
  tpe: TPEKind = "sinusoidal"
  tpe_max_seconds: int = 4096  # rows of the learned table; later timestamps clamp to the last row
  tpe_base: float = 10000.0
  # "avg": parameter-free mean over temporal x spatial windows (ASSUMED default); "conv3d": depthwise
  # Conv3d with kernel == stride == window; "none": every frame's patches pass through.
  patchify: Patchify = "avg"
  temporal_patch: int = 2
  spatial_patch: int = 2
  projector_type: ProjectorType = "mlp2x_gelu"

  @property
  def frames_per_group(self) -> int:
    return 1 if self.patchify == "none" else self.temporal_patch

  def tokens_per_group(self, grid_h: int, grid_w: int) -> int:
    if self.patchify == "none":
      return grid_h * grid_w
    return (grid_h // self.spatial_patch) * (grid_w // self.spatial_patch)

  def __post_init__(self):
    c = "ProjectorConfig"
    check_choice(self, c, "tpe", get_args(TPEKind))
    check_choice(self, c, "patchify", get_args(Patchify))
    check_choice(self, c, "projector_type", get_args(ProjectorType))
    check_positive_ints(self, c, "tpe_max_seconds", "temporal_patch", "spatial_patch")
    check(self.tpe_base > 1.0, c, "tpe_base", "expected > 1")


@dataclasses.dataclass(frozen=True)
class KangarooConfig:
  """The assembled video-language model: its parts' shapes and the visual placeholder id (no run options)."""

  llm: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
  # Id written into `input_ids` at every visual-token position. Negative, so it can never be a vocab id.
  visual_token_id: int = -200

  def __post_init__(self):
    c = "KangarooConfig"
    check(
        self.visual_token_id < 0,
        c,
        "visual_token_id",
        f"must be negative so it never collides with a token id, got {self.visual_token_id}",
    )
    if self.projector.patchify != "none":
      g = self.vision.trained_grid
      check(
          g % self.projector.spatial_patch == 0,
          c,
          "projector.spatial_patch",
          f"the trained patch grid {g}x{g} is not divisible by spatial_patch {self.projector.spatial_patch}",
      )

  def replace(self, **changes) -> "KangarooConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> "KangarooConfig":
    """Builds a config from `to_dict` output; unknown keys are an error naming the key.

    A kangaroo_config.json written before run options moved out also holds run-option keys: split them
    off first with `kangaroo_jax.run_options.split_legacy_keys` (kangaroo_jax.pretrained.load_config does).
    """
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
    raise ConfigError(
        f"unknown config key(s) {[prefix + k for k in unknown]} for {cls.__name__}; " f"known keys: {sorted(known)}"
    )
  return cls(**values)


def kangaroo_8b() -> KangarooConfig:
  """The released Kangaroo shapes: Llama-3-8B-Instruct + EVA02-CLIP-L/14-448 + mlp2x_gelu (1024 -> 4096)."""
  return KangarooConfig()


def tiny() -> KangarooConfig:
  """A few-hundred-thousand-parameter model with every structural feature of the real one (tests, demo)."""
  return KangarooConfig(
      llm=LlamaConfig(
          vocab_size=512,
          hidden_size=64,
          intermediate_size=160,
          num_layers=2,
          num_heads=4,
          num_kv_heads=2,
          head_dim=16,
          max_position_embeddings=4096,
          bos_token_id=1,
          eos_token_ids=(2,),
      ),
      vision=VisionConfig(
          image_size=56, patch_size=14, width=32, num_layers=2, head_width=16, mlp_hidden=64, pt_hw_seq_len=2
      ),
      projector=ProjectorConfig(),
  )


PRESETS = {"kangaroo-8b": kangaroo_8b, "tiny": tiny}


def preset(name: str) -> KangarooConfig:
  try:
    return PRESETS[name]()
  except KeyError:
    raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None
