"""DataConfig: everything the training input pipeline needs besides the model config and tokenizer."""

from __future__ import annotations

import dataclasses
import glob
import os

from kangaroo_jax.data.prompt import VideoMarkers

# Why a sample was dropped; the index is the slot in the per-row skip-count vector.
SKIP_REASONS = ("bad_record", "missing_video", "bad_video", "bad_conversation", "too_long", "too_many_frames")


class DataConfigError(ValueError):
  """An invalid DataConfig field; the message names it."""


class SkipRateExceeded(RuntimeError):
  """Too many samples were skipped; the message lists the counts per reason.

  Defined here rather than in pipeline.py so the packer (which pipeline.py imports) can raise it too.
  """


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Validated options of `make_train_iterator`.

  data: a folder of `*.array_record` shards (tools.build_dataset output), one shard file, or a glob.
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

  def shard_files(self) -> list[str]:
    """The ArrayRecord files, sorted; DataConfigError when there are none."""
    if os.path.isdir(self.data):
      files = sorted(glob.glob(os.path.join(self.data, "*.array_record")))
    else:
      files = sorted(glob.glob(self.data))
    if not files:
      raise DataConfigError(f"DataConfig.data={self.data!r}: no *.array_record files found")
    return files
