"""DataConfig: everything the training input pipeline needs besides the model config and tokenizer."""

from __future__ import annotations

import dataclasses
import glob
import os
import re

from kangaroo_jax.data.prompt import VideoMarkers

# Why a sample was dropped; the index is the slot in the per-row skip-count vector.
SKIP_REASONS = ("bad_record", "missing_video", "bad_video", "bad_conversation", "too_long", "too_many_frames")


class DataConfigError(ValueError):
  """An invalid DataConfig field; the message names it."""


class SkipRateExceeded(RuntimeError):
  """Too many samples were skipped; the message lists the counts per reason.

  Defined here rather than in pipeline.py so the packer (which pipeline.py imports) can raise it too.
  """


TFDS_PREFIX = "tfds:"
_TFDS_SPEC = re.compile(r"(?P<name>[A-Za-z0-9_]+(?:/[A-Za-z0-9_.\-]+)?"  # name[/config]
                        r"(?::\d+\.(?:\d+|\*)\.(?:\d+|\*))?)"  # [:version]; the split may hold ":" ("train[:10]")
                        r"(?::(?P<split>.+))?")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")  # a split expression starts with the split's name: "train[:10%]"


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """`data="tfds:NAME[/CONFIG][:VERSION][:SPLIT]"` parsed (kangaroo_jax.data.tfds_source reads it)."""
  name: str             # as TFDS names it: "coco_captions/2014:1.1.0"
  split: str = "train"  # a TFDS split expression: "train", "validation[:10%]"

  @property
  def dataset(self) -> str:
    """The name without config and version: the key of tfds_mappings.DATASET_SHAPES."""
    return self.name.split(":")[0].split("/")[0]

  def __str__(self) -> str:
    return f"{TFDS_PREFIX}{self.name}:{self.split}"


def is_tfds(data) -> bool:
  return isinstance(data, str) and data.startswith(TFDS_PREFIX)


def parse_tfds(data: str, field: str = "DataConfig.data") -> TfdsSpec:
  """"tfds:NAME[/CONFIG][:VERSION][:SPLIT]" -> TfdsSpec; DataConfigError naming `field` when it does not parse."""
  m = _TFDS_SPEC.fullmatch(data[len(TFDS_PREFIX):]) if is_tfds(data) else None
  if m is None:
    raise DataConfigError(f"{field}={data!r}: expected tfds:NAME[/CONFIG][:VERSION][:SPLIT], e.g. "
                          "tfds:coco_captions/2014:train or tfds:kangaroo_video_qa:1.0.0:validation[:10%]")
  split = m.group("split") or "train"
  if not SPLIT_NAME.match(split):
    raise DataConfigError(f"{field}={data!r}: split {split!r} does not start with a split name")
  return TfdsSpec(m.group("name"), split)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Validated options of `make_train_iterator`.

  data: a folder of `*.array_record` shards (tools.build_dataset output), one shard file, or a glob; or a TFDS
    dataset split, "tfds:NAME[/CONFIG][:VERSION][:SPLIT]" (kangaroo_jax.data.tfds_source), read from
    `tfds_data_dir` (default: TFDS's own, $TFDS_DATA_DIR or ~/tensorflow_datasets) through the mapping its
    name declares (tfds_mappings.DATASET_SHAPES), or the shape `tfds_mapping` names.
  seq_len: L, tokens per packed row. global_batch_size: rows per step over all hosts.
  frame_size: (H, W) of every frame slot; records stored at another size are resized (squash, or
    letterboxed into H x W when `keep_aspect`). max_frames_per_row: F, frame slots per row.
  num_frames / fps / max_frames: sampling for records that reference a video (decoded in the workers).
  packing_bins: rows kept open for first-fit packing (more bins = fuller rows, more host memory).
  max_skip_rate: stop with an error when skipped / seen samples exceeds this, checked once at least
    `skip_check_min_samples` samples were seen. The packer also stops, whatever the rate, after
    `10 * skip_check_min_samples` consecutive skipped samples (nothing could ever be packed).
  """
  data: str
  seq_len: int = 4096
  global_batch_size: int = 8
  frame_size: tuple[int, int] = (448, 448)
  max_frames_per_row: int = 64
  keep_aspect: bool = False
  num_frames: int | None = 16
  fps: float | None = None
  max_frames: int | None = None
  packing_bins: int = 4
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = None  # None: repeat forever
  worker_count: int = 0
  worker_buffer_size: int = 2
  max_skip_rate: float = 0.05
  skip_check_min_samples: int = 100
  system_prompt: str | None = None
  markers: VideoMarkers = VideoMarkers()
  tfds_data_dir: str | None = None
  tfds_mapping: str | None = None

  def __post_init__(self):
    if isinstance(self.frame_size, int):
      object.__setattr__(self, "frame_size", (self.frame_size, self.frame_size))
    object.__setattr__(self, "frame_size", tuple(int(s) for s in self.frame_size))
    if isinstance(self.markers, dict):
      object.__setattr__(self, "markers", VideoMarkers(**self.markers))
    for name in ("seq_len", "global_batch_size", "max_frames_per_row", "packing_bins", "worker_buffer_size"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise DataConfigError(f"DataConfig.{name} must be a positive int, got {v!r}")
    if len(self.frame_size) != 2 or min(self.frame_size) <= 0:
      raise DataConfigError(f"DataConfig.frame_size must be (H, W) > 0, got {self.frame_size}")
    if self.max_frames_per_row % 2:
      raise DataConfigError(f"DataConfig.max_frames_per_row must be even (frame pairs), got {self.max_frames_per_row}")
    if self.num_frames is not None and self.fps is not None:
      raise DataConfigError("DataConfig: set num_frames or fps, not both")
    if self.worker_count < 0:
      raise DataConfigError(f"DataConfig.worker_count must be >= 0, got {self.worker_count}")
    if not 0.0 <= self.max_skip_rate <= 1.0:
      raise DataConfigError(f"DataConfig.max_skip_rate must be in [0, 1], got {self.max_skip_rate}")
    if not isinstance(self.skip_check_min_samples, int) or self.skip_check_min_samples <= 0:
      raise DataConfigError(
          f"DataConfig.skip_check_min_samples must be a positive int, got {self.skip_check_min_samples!r}")
    if self.num_epochs is not None and self.num_epochs <= 0:
      raise DataConfigError(f"DataConfig.num_epochs must be positive or None, got {self.num_epochs}")
    if is_tfds(self.data):
      parse_tfds(self.data)
    elif self.tfds_data_dir or self.tfds_mapping:
      raise DataConfigError(f"DataConfig.tfds_data_dir / tfds_mapping are for tfds: data, got data={self.data!r}")
    if self.tfds_mapping:
      from kangaroo_jax.data.tfds_mappings import MAPPINGS
      if self.tfds_mapping not in MAPPINGS:
        raise DataConfigError(f"DataConfig.tfds_mapping={self.tfds_mapping!r}: expected one of {sorted(MAPPINGS)}")

  @property
  def tfds(self) -> TfdsSpec | None:
    """The TFDS split to read, or None when `data` names ArrayRecord shards."""
    return parse_tfds(self.data) if is_tfds(self.data) else None

  def shard_files(self) -> list[str]:
    """The ArrayRecord files, sorted; DataConfigError when there are none."""
    if self.tfds is not None:
      raise DataConfigError(f"DataConfig.data={self.data!r} is a TFDS dataset, not shard files")
    if os.path.isdir(self.data):
      files = sorted(glob.glob(os.path.join(self.data, "*.array_record")))
    else:
      files = sorted(glob.glob(self.data))
    if not files:
      hint = _tfds_hint(self.data) if os.path.isdir(self.data) else ""
      raise DataConfigError(f"DataConfig.data={self.data!r}: no *.array_record files found{hint}")
    return files


def _tfds_hint(folder: str) -> str:
  """How to read `folder` when it holds a TFDS build of tools.build_dataset (its summary.json says so)."""
  import json
  try:
    with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
      tfds_info = json.load(f).get("tfds")
    name = tfds_info["name"]
  except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError):
    return ""
  return f"; it holds the TFDS dataset {name!r}: read it as data='tfds:{name}' with tfds_data_dir={folder!r}"
