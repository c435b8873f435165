"""Video / image loading, frame sampling and the released preprocessing (spec section 6, contract section 2).

Decoding uses PyAV and seeks: for each sampled frame index it either keeps decoding forward (target
close ahead) or seeks to the keyframe before the target and decodes from there, so only the GOPs
holding sampled frames are decoded, and only sampled frames are converted to RGB.

Sampling (frame indices are 0-based in the whole video; `start`/`end` seconds restrict the clip):
  * `num_frames=n`: uniform segments over the clip, middle frame of each (VideoChat-style);
  * `fps=r`: one frame every 1/r seconds from the clip start; `max_frames` caps the count (uniformly
    thinned when exceeded);
  * neither: every frame of the clip (up to `max_frames`).
Timestamps are `index / fps` in seconds (spec section 12). Frame counts are made even by repeating the
last frame, so patchify groups of 2 never straddle samples. A clip `start` at or past the end of the video
is an error (ClipRangeError), not a clip of repeated last frames; an `end` past it is clamped. An image
file is a 1-frame video (padded to 2). A folder of images is a video at `frames_fps` frames per second
(frame files sorted by name).

Frames come out upright: a video's display matrix (the rotation phones and ffmpeg record as side data,
read back by PyAV as `VideoFrame.rotation`, counter-clockwise degrees) and an image's EXIF orientation are
applied on decode. Mirroring in a display matrix is not applied (PyAV exposes only its rotation).

The released transform (Kangaroo data_utils): PIL `Resize((448, 448), BICUBIC)` on each frame, i.e.
squash to a square with PIL's antialiased bicubic (a = -0.5, support scaled with the reduction), then
ToTensor and CLIP mean/std. `preprocess_frames` runs exactly that PIL resize; `normalize_frames` does
the rest in float32 (numpy or jax.numpy, so it can run on device inside the jitted step).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class VideoError(ValueError):
  """A video / image that cannot be read or sampled; the message names the path and the problem."""


class ClipRangeError(VideoError):
  """The clip `start` lies at or past the video's end (raised by sample_indices, re-raised naming the path)."""


@dataclasses.dataclass(frozen=True)
class DecodedVideo:
  """frames uint8 [f, h, w, 3] (f even), timestamps float32 [f] seconds, indices int64 [f], source fps."""
  frames: np.ndarray
  timestamps: np.ndarray
  fps: float
  indices: np.ndarray


def sample_indices(total: int, fps: float, *, num_frames: int | None = None, sample_fps: float | None = None,
                   max_frames: int | None = None, start: float | None = None, end: float | None = None) -> np.ndarray:
  """Frame indices (int64 [n], non-decreasing, within [0, total)) for the sampling modes in the module doc."""
  if total <= 0:
    raise ValueError("the video has no frames")
  if num_frames is not None and sample_fps is not None:
    raise ValueError("give num_frames or fps, not both")
  for name, v in (("num_frames", num_frames), ("max_frames", max_frames)):
    if v is not None and v <= 0:
      raise ValueError(f"{name} must be positive, got {v}")
  if sample_fps is not None and not sample_fps > 0:
    raise ValueError(f"fps must be positive, got {sample_fps}")
  if start is not None and end is not None and end <= start:
    raise ValueError(f"clip end {end}s is not after start {start}s")
  for name, t in (("start", start), ("end", end)):
    if t is not None and not (math.isfinite(t) and t >= 0):
      raise ValueError(f"clip {name} must be a finite, non-negative number of seconds, got {t}")
  # Compared in seconds before any `t * fps`: a huge start (1e308) would overflow the frame arithmetic.
  if start is not None and (start >= total / fps + 1 or math.floor(start * fps + 1e-6) >= total):
    raise ClipRangeError(f"clip start {start:g}s is at or past the end of the video "
                         f"({total} frames at {fps:g} fps = {total / fps:g}s)")
  first = 0 if start is None else max(int(math.floor(start * fps + 1e-6)), 0)
  end = None if end is None else min(end, total / fps)
  stop = total if end is None else min(max(int(math.ceil(end * fps - 1e-6)), first + 1), total)
  n = stop - first
  if sample_fps is not None:
    count = max(1, int(math.floor(n / fps * sample_fps + 1e-6)))
    idx = first + np.floor(np.arange(count) * fps / sample_fps + 1e-6).astype(np.int64)
    idx = np.minimum(idx, stop - 1)
    if max_frames is not None and count > max_frames:
      idx = idx[_uniform(count, max_frames)]
    return idx
  count = n if num_frames is None else num_frames
  if max_frames is not None:
    count = min(count, max_frames)
  return first + _uniform(n, count)


def _sample(path: str, total: int, fps: float, sampling: dict) -> np.ndarray:
  """sample_indices with its errors re-raised as VideoError / ClipRangeError naming `path`."""
  try:
    return sample_indices(total, fps, **sampling)
  except ClipRangeError as e:
    raise ClipRangeError(f"{path}: {e}") from None
  except ValueError as e:
    raise VideoError(f"{path}: {e}") from None


def _uniform(n: int, count: int) -> np.ndarray:
  """Middle element of each of `count` equal segments of range(n)."""
  return np.minimum(np.floor((np.arange(count) + 0.5) * n / count).astype(np.int64), n - 1)


def _pad_even(frames: np.ndarray, timestamps: np.ndarray, indices: np.ndarray):
  if frames.shape[0] % 2:
    frames = np.concatenate([frames, frames[-1:]])
    timestamps = np.concatenate([timestamps, timestamps[-1:]])
    indices = np.concatenate([indices, indices[-1:]])
  return frames, timestamps, indices


def _read_image(path: str) -> np.ndarray:
  """An image file -> uint8 [h, w, 3], turned upright by its EXIF orientation."""
  from PIL import Image, ImageOps
  try:
    with Image.open(path) as im:
      return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
  except Image.DecompressionBombError as e:  # a header claiming a huge size; not an OSError
    raise VideoError(f"{path}: image too large to decode: {e}") from None
  except Exception as e:  # noqa: BLE001  Pillow's decoders raise OSError, ValueError, SyntaxError, struct.error, ...
    raise VideoError(f"{path}: cannot read image: {type(e).__name__}: {e}") from None


def _upright(frame, rgb: np.ndarray) -> np.ndarray:
  """A decoded frame's pixels rotated as its display matrix says (`rotation` counter-clockwise degrees,
  rounded to a quarter turn); np.rot90 turns an image counter-clockwise as it is displayed."""
  quarter_turns = int(round((getattr(frame, "rotation", 0) or 0) / 90)) % 4
  return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


def _load_frame_dir(path, frames_fps, **sampling) -> DecodedVideo:
  names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise VideoError(f"{path}: frames folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  idx = _sample(path, len(names), frames_fps, sampling)
  frames = [_read_image(os.path.join(path, names[i])) for i in idx]
  shapes = {f.shape for f in frames}
  if len(shapes) > 1:
    raise VideoError(f"{path}: frames have different sizes {sorted(shapes)}")
  return _finish(np.stack(frames), idx, frames_fps)


def _finish(frames, idx, fps) -> DecodedVideo:
  ts = (idx / fps).astype(np.float32)
  frames, ts, idx = _pad_even(frames, ts, idx.astype(np.int64))
  return DecodedVideo(np.ascontiguousarray(frames), ts, float(fps), idx)


def _decode_indices(path: str, container, stream, targets: np.ndarray, fps: float, known_total: bool):
  """Decodes the frames at the sorted `targets` indices; returns {index: uint8 [h, w, 3]}."""
  import av
  tb = float(stream.time_base)
  t0 = stream.start_time or 0
  # Seeking restarts at the previous keyframe, so it only pays off for targets well ahead.
  seek_ahead = max(int(2 * fps), 16)
  out: dict[int, np.ndarray] = {}
  frames_iter = None
  cur = -1  # index of the last decoded frame
  for target in dict.fromkeys(int(t) for t in targets):
    if frames_iter is None or target - cur > seek_ahead:
      container.seek(t0 + int(round(target / fps / tb)), stream=stream, backward=True, any_frame=False)
      frames_iter = container.decode(stream)
    while True:
      try:
        frame = next(frames_iter)
      except StopIteration:
        frame = None
      except av.error.FFmpegError as e:
        raise VideoError(f"{path}: decoding failed near frame {target}: {e}") from None
      if frame is None:
        if out and not known_total:  # the frame count was only estimated from the duration
          out[target] = out[max(out)]
          break
        raise VideoError(f"{path}: stream ended before frame {target} (decoded up to frame {cur}); "
                         "the file is truncated or its frame count is wrong")
      if frame.pts is None:
        continue
      cur = int(round((frame.pts - t0) * tb * fps))
      if cur >= target:
        out[target] = _upright(frame, frame.to_ndarray(format="rgb24"))
        break
  return out


def load_video(path: str, *, num_frames: int | None = None, fps: float | None = None,
               max_frames: int | None = None, start: float | None = None, end: float | None = None,
               frames_fps: float = 1.0) -> DecodedVideo:
  """Reads the sampled frames of a video file, an image file, or a folder of frame images.

  Returns DecodedVideo(frames uint8 [f, h, w, 3], timestamps float32 [f] seconds, fps, indices [f]),
  f even. Raises VideoError (naming `path`) for missing, unreadable, empty or truncated inputs.
  """
  sampling = dict(num_frames=num_frames, sample_fps=fps, max_frames=max_frames, start=start, end=end)
  if not os.path.exists(path):
    raise VideoError(f"{path}: no such file or folder")
  if os.path.isdir(path):
    return _load_frame_dir(path, frames_fps, **sampling)
  if path.lower().endswith(IMAGE_EXTENSIONS):
    return _finish(_read_image(path)[None], np.zeros(1, np.int64), 1.0)
  if os.path.getsize(path) == 0:
    raise VideoError(f"{path}: file is empty (0 bytes)")
  import av
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise VideoError(f"{path}: cannot open as a video: {e}") from None
  with container:
    if not container.streams.video:
      raise VideoError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    if not rate or float(rate) <= 0:
      raise VideoError(f"{path}: unknown frame rate")
    vfps = float(rate)
    total, known = int(stream.frames or 0), bool(stream.frames)
    if not known:
      if stream.duration is not None:
        seconds = float(stream.duration * stream.time_base)
      elif container.duration is not None:
        seconds = container.duration / 1e6
      else:
        seconds = 0.0
      total = int(round(seconds * vfps))
    if total <= 0:
      raise VideoError(f"{path}: the video has no frames (zero length)")
    idx = _sample(path, total, vfps, sampling)
    got = _decode_indices(path, container, stream, idx, vfps, known)
  frames = np.stack([got[int(i)] for i in idx])
  return _finish(frames, idx, vfps)


def frame_size_for(height: int, width: int, size: int, *, keep_aspect: bool = False,
                   patch_size: int = 14, multiple: int | None = None) -> tuple[int, int]:
  """Output (H, W) for a `height x width` source.

  Squash mode: (size, size). Keep-aspect mode: the long side becomes `size` and the short side keeps the
  aspect ratio, both rounded to a multiple of `multiple` (default 2 * patch_size, so the 2x2 spatial
  patchify tiles the patch grid), at least one `multiple`.
  """
  if not keep_aspect:
    return size, size
  m = multiple or 2 * patch_size
  if size % m:
    raise ValueError(f"size {size} must be a multiple of {m} in keep-aspect mode")
  long_side, short_side = max(height, width), min(height, width)
  short = max(m, int(round(size * short_side / long_side / m)) * m)
  return (size, short) if height >= width else (short, size)


def preprocess_frames(frames_uint8: np.ndarray, size: int | Sequence[int], *, keep_aspect: bool = False,
                      patch_size: int = 14) -> np.ndarray:
  """uint8 [f, h, w, 3] -> uint8 [f, H, W, 3] with PIL bicubic (antialiased, as the released transform).

  `size` is an int (square, or the long side with keep_aspect) or an explicit (H, W).
  """
  from PIL import Image
  frames = np.asarray(frames_uint8)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames must be uint8 [f, h, w, 3], got {frames.dtype} {frames.shape}")
  f, h, w, _ = frames.shape
  if isinstance(size, (tuple, list)):
    out_h, out_w = (int(s) for s in size)
  else:
    out_h, out_w = frame_size_for(h, w, int(size), keep_aspect=keep_aspect, patch_size=patch_size)
  if (out_h, out_w) == (h, w):
    return frames.copy()
  out = np.empty((f, out_h, out_w, 3), np.uint8)

  def one(i):
    out[i] = np.asarray(Image.fromarray(frames[i]).resize((out_w, out_h), Image.Resampling.BICUBIC))

  # Pillow releases the GIL while resampling, so frames resize in parallel threads (as decoding does).
  threads = min(f, os.cpu_count() or 1, 8)
  if threads > 1 and h * w >= 128 * 128:
    with _executor(threads) as ex:
      list(ex.map(one, range(f)))
  else:
    for i in range(f):
      one(i)
  return out


def _executor(threads: int):
  from concurrent.futures import ThreadPoolExecutor
  return ThreadPoolExecutor(threads)


def normalize_frames(frames_uint8):
  """uint8 [..., 3] -> float32 [..., 3]: x / 255, then CLIP mean/std. numpy in -> numpy out, jax in -> jax out."""
  if isinstance(frames_uint8, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp
  mean = xp.asarray(CLIP_MEAN, dtype=xp.float32)
  inv_std = xp.asarray([1.0 / s for s in CLIP_STD], dtype=xp.float32)
  if xp is np and frames_uint8.ndim >= 2 and frames_uint8.shape[-1] == 3:
    return _normalize_rows(frames_uint8, mean, inv_std)
  return (frames_uint8.astype(xp.float32) * xp.float32(1.0 / 255.0) - mean) * inv_std


def _normalize_rows(frames: np.ndarray, mean: np.ndarray, inv_std: np.ndarray) -> np.ndarray:
  """Same arithmetic, same bits, about 5x faster: broadcasting a length-3 last axis makes numpy's inner
  loop 3 elements long, so each image row [w * 3] is processed against the per-channel constants tiled to
  that row, in place in one output buffer."""
  width = frames.shape[-2]
  rows = np.ascontiguousarray(frames).reshape(-1, width * 3)
  out = np.empty(rows.shape, np.float32)
  np.multiply(rows, np.float32(1.0 / 255.0), out=out)
  np.subtract(out, np.tile(mean, width), out=out)
  np.multiply(out, np.tile(inv_std, width), out=out)
  return out.reshape(frames.shape)
