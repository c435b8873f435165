"""DataConfig: the one data configuration, of the trainer's `data` section and of the input pipeline alike."""

from __future__ import annotations

import dataclasses
import glob
import os
import re

from kangaroo_jax.checks import check, check_bool, check_choice, check_float, check_int, check_str, fail
from kangaroo_jax.config import ConfigError
from kangaroo_jax.data.prompt import VideoMarkers

# Why a sample was dropped; the index is the slot in the per-row skip-count vector.
SKIP_REASONS = ("bad_record", "missing_video", "bad_video", "bad_conversation", "too_long", "too_many_frames")


class DataConfigError(ConfigError):
  """A data field whose value cannot be used (no shards, an unknown TFDS dataset, ...); the message names it.

  A ConfigError, so the trainer's CLI reports it as one line (exit 2) like any other config field."""


class SkipRateExceeded(RuntimeError):
  """Too many samples were skipped; the message lists the counts per reason.

  Defined here rather than in pipeline.py so the packer (which pipeline.py imports) can raise it too.
  """


TFDS_PREFIX = "tfds:"
_TFDS_SPEC = re.compile(
    r"(?P<name>[A-Za-z0-9_]+(?:/[A-Za-z0-9_.\-]+)?"  # name[/config]
    r"(?::\d+\.(?:\d+|\*)\.(?:\d+|\*))?)"  # [:version]; the split may hold ":" ("train[:10]")
    r"(?::(?P<split>.+))?"
)
SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")  # a split expression starts with the split's name: "train[:10%]"


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """`dataset="tfds:NAME[/CONFIG][:VERSION][:SPLIT]"` parsed (kangaroo_jax.data.tfds_source reads it)."""

  name: str  # as TFDS names it: "coco_captions/2014:1.1.0"
  split: str = "train"  # a TFDS split expression: "train", "validation[:10%]"

  @property
  def dataset(self) -> str:
    """The name without config and version: the key of tfds_mappings.DATASET_SHAPES."""
    return self.name.split(":")[0].split("/")[0]

  def __str__(self) -> str:
    return f"{TFDS_PREFIX}{self.name}:{self.split}"


def is_tfds(data) -> bool:
  return isinstance(data, str) and data.startswith(TFDS_PREFIX)


def parse_tfds(data: str, field: str = "data.dataset") -> TfdsSpec:
  """ "tfds:NAME[/CONFIG][:VERSION][:SPLIT]" -> TfdsSpec; DataConfigError naming `field` when it does not parse."""
  m = _TFDS_SPEC.fullmatch(data[len(TFDS_PREFIX) :]) if is_tfds(data) else None
  if m is None:
    raise DataConfigError(
        f"{field}={data!r}: expected tfds:NAME[/CONFIG][:VERSION][:SPLIT], e.g. "
        "tfds:coco_captions/2014:train or tfds:kangaroo_video_qa:1.0.0:validation[:10%]"
    )
  split = m.group("split") or "train"
  if not SPLIT_NAME.match(split):
    raise DataConfigError(f"{field}={data!r}: split {split!r} does not start with a split name")
  return TfdsSpec(m.group("name"), split)


DATA_SOURCES = ("synthetic", "grain")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The one data configuration: the trainer's `data` section (configs/*.py: `c.data.update(...)`) and the
  options of `make_train_iterator`, validated once in `__post_init__` (ConfigError naming `data.<field>`).

  source: "synthetic" (train.synthetic: contract-shaped generated rows, no files) or "grain" (this package's
    pipeline over `dataset`, which needs `tokenizer` too).
  dataset: a folder of `*.array_record` shards (tools.build_dataset output), one shard file, or a glob; or a
    TFDS dataset split, "tfds:NAME[/CONFIG][:VERSION][:SPLIT]" (kangaroo_jax.data.tfds_source), read from
    `tfds_data_dir` ("": TFDS's own, $TFDS_DATA_DIR or ~/tensorflow_datasets) through the mapping its
    name declares (tfds_mappings.DATASET_SHAPES), or the shape `tfds_mapping` names.
  batch_size: rows per optimizer step over all hosts and micro-batches. seq_len: L, tokens per packed row.
  frame_size: H = W of every frame slot, or (H, W) (the trainer takes square frames); records stored at
    another size are resized (squash, or letterboxed into H x W when `keep_aspect`).
  max_frames: F, frame slots per row (even: patchify pairs frames).
  num_frames / fps / max_sampled_frames: sampling for records that reference a video (decoded in the
    workers): num_frames evenly spread frames, or `fps` frames per second (num_frames=None) capped at
    max_sampled_frames.
  packing_bins: rows kept open for first-fit packing (more bins = fuller rows, more host memory).
  max_skip_rate: stop with an error when skipped / seen samples exceeds this, checked once at least
    `skip_check_min_samples` samples were seen. The packer also stops, whatever the rate, after
    `10 * skip_check_min_samples` consecutive skipped samples (nothing could ever be packed).
  """

  source: str = "synthetic"
  dataset: str = ""
  tokenizer: str = ""  # folder with tokenizer files (grain; copied into the export)
  batch_size: int = 8
  seq_len: int = 256
  frame_size: int | tuple[int, int] = 56
  max_frames: int = 8
  keep_aspect: bool = False
  num_frames: int | None = 8
  fps: float | None = None
  max_sampled_frames: int | None = None
  packing_bins: int = 4
  shuffle: bool = True
  shuffle_seed: int = 0
  num_epochs: int | None = None  # None: repeat forever
  worker_count: int = 0  # Grain worker processes
  worker_buffer_size: int = 2
  max_skip_rate: float = 0.05
  skip_check_min_samples: int = 100
  system_prompt: str | None = None
  markers: VideoMarkers = VideoMarkers()
  tfds_data_dir: str = ""
  tfds_mapping: str = ""  # a mapping shape for a dataset tfds_mappings.DATASET_SHAPES does not name

  def __post_init__(self):
    w = "data"
    if isinstance(self.frame_size, list):  # a pair from JSON / a ConfigDict
      object.__setattr__(self, "frame_size", tuple(self.frame_size))
    if isinstance(self.markers, dict):
      object.__setattr__(self, "markers", VideoMarkers(**self.markers))
    check_choice(self, w, "source", DATA_SOURCES)
    for f in ("batch_size", "seq_len", "max_frames", "packing_bins", "worker_buffer_size", "skip_check_min_samples"):
      check_int(self, w, f, 1)
    for f in ("worker_count", "shuffle_seed"):
      check_int(self, w, f, 0)
    fs = self.frame_size
    check(
        _positive_int(fs) or (isinstance(fs, tuple) and len(fs) == 2 and all(map(_positive_int, fs))),
        w,
        "frame_size",
        f"expected a positive int or (H, W), got {fs!r}",
    )
    for f in ("num_frames", "max_sampled_frames", "num_epochs"):
      if getattr(self, f) is not None:
        check_int(self, w, f, 1)
    if self.fps is not None:
      check_float(self, w, "fps", 0.0, open_lo=True)
      check(self.num_frames is None, w, "fps", f"set num_frames or fps, not both (num_frames={self.num_frames})")
    check_float(self, w, "max_skip_rate", 0.0, 1.0)
    for f in ("keep_aspect", "shuffle"):
      check_bool(self, w, f)
    check(
        self.max_frames % 2 == 0 and (self.num_frames or 0) % 2 == 0,
        w,
        "max_frames",
        f"frame counts must be even (patchify pairs frames), got max_frames={self.max_frames}, "
        f"num_frames={self.num_frames}",
    )
    check(
        self.num_frames is None or self.num_frames <= self.max_frames,
        w,
        "num_frames",
        f"{self.num_frames} frames per video exceed max_frames={self.max_frames}",
    )
    for f in ("dataset", "tokenizer", "tfds_data_dir", "tfds_mapping"):
      check_str(self, w, f)
    if self.source == "grain":
      for f in ("dataset", "tokenizer"):
        check(bool(getattr(self, f)), w, f, "required when data.source='grain'")
    if is_tfds(self.dataset):
      parse_tfds(self.dataset)
    elif self.tfds_data_dir or self.tfds_mapping:
      f = "tfds_data_dir" if self.tfds_data_dir else "tfds_mapping"
      raise fail(w, f, f"only for a TFDS dataset (data.dataset='tfds:NAME[:SPLIT]'), got dataset={self.dataset!r}")
    if self.tfds_mapping:
      from kangaroo_jax.data.tfds_mappings import MAPPINGS  # its feature code imports this module

      check(
          self.tfds_mapping in MAPPINGS,
          w,
          "tfds_mapping",
          f"got {self.tfds_mapping!r}, expected one of {sorted(MAPPINGS)}",
      )

  @property
  def frame_hw(self) -> tuple[int, int]:
    """(H, W) of a frame slot."""
    return (self.frame_size, self.frame_size) if isinstance(self.frame_size, int) else self.frame_size

  @property
  def tfds(self) -> TfdsSpec | None:
    """The TFDS split to read, or None when `dataset` names ArrayRecord shards."""
    return parse_tfds(self.dataset) if is_tfds(self.dataset) else None

  def shard_files(self) -> list[str]:
    """The ArrayRecord files, sorted; DataConfigError when there are none."""
    if self.tfds is not None:
      raise DataConfigError(f"data.dataset={self.dataset!r} is a TFDS dataset, not shard files")
    if os.path.isdir(self.dataset):
      files = sorted(glob.glob(os.path.join(self.dataset, "*.array_record")))
    else:
      files = sorted(glob.glob(self.dataset))
    if not files:
      hint = _tfds_hint(self.dataset) if os.path.isdir(self.dataset) else ""
      raise DataConfigError(f"data.dataset={self.dataset!r}: no *.array_record files found{hint}")
    return files


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _tfds_hint(folder: str) -> str:
  """How to read `folder` when it holds a TFDS build of tools.build_dataset (its summary.json says so)."""
  import json

  try:
    with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
      tfds_info = json.load(f).get("tfds")
    name = tfds_info["name"]
  except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError):
    return ""
  return f"; it holds the TFDS dataset {name!r}: read it as dataset='tfds:{name}' with tfds_data_dir={folder!r}"
