"""Video / image loading, frame sampling and the released preprocessing (docs/model.md sections 1 and 3,
docs/pipeline_contracts.md section 2).

Decoding uses PyAV in forward passes over the packets, never a seek per frame: only GOPs holding sampled
frames are decoded, within them only the reference chain up to the last sampled frame (skip_frame NONREF
drops the rest), and only sampled frames are converted to RGB (see _SampledDecode). The GOPs are shared out
in runs over `threads` single-threaded decoders, each with its own open container (_split_targets). The
pixels equal a front-to-back decode, and decord's `get_batch` on closed-GOP video; on open-GOP video decord's
seeks decode leading pictures without their references (tests/test_video_decode_exact.py).

Sampling (frame indices are 0-based in the whole video; `start`/`end` seconds restrict the clip):
  * `num_frames=n`: uniform segments over the clip, middle frame of each (VideoChat-style);
  * `fps=r`: one frame every 1/r seconds from the clip start; `max_frames` caps the count (uniformly
    thinned when exceeded);
  * neither: every frame of the clip (up to `max_frames`).
Timestamps are `index / fps` in seconds (docs/model.md section 3). Frame counts are made even by repeating the
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

import bisect
import collections
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
  """frames uint8 [f, h, w, 3] (f even), timestamps float32 [f] seconds, source fps, indices int64 [f] (the
  source frame each output frame is), num_unique: how many distinct source frames the f frames are.

  num_unique is below f when frames repeat: the padding to an even count, a video with fewer frames than
  requested, or one that decodes fewer frames than its header claims (a truncated file: the targets past its
  end all get its last decodable frame). Left out, it is counted from `indices`.
  """

  frames: np.ndarray
  timestamps: np.ndarray
  fps: float
  indices: np.ndarray
  num_unique: int = -1

  def __post_init__(self):
    if self.num_unique < 0:
      object.__setattr__(self, "num_unique", int(np.unique(self.indices).size))


def sample_indices(
    total: int,
    fps: float,
    *,
    num_frames: int | None = None,
    sample_fps: float | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
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
    raise ClipRangeError(
        f"clip start {start:g}s is at or past the end of the video "
        f"({total} frames at {fps:g} fps = {total / fps:g}s)"
    )
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


_MAX_GROUP_PACKETS = 1024  # a stream without keyframes is read in groups this long, each decoded whole


class _SampledDecode:
  """Decodes the frames at sampled indices in one forward pass over the packets, GOP by GOP (a keyframe packet
  and the packets after it up to the next keyframe, in decode order; held in memory one GOP at a time).

  A GOP holding no pending target is demuxed but never decoded. In one that holds some, packets are sent up to
  the last one a target needs; the others before it go with skip_frame NONREF, so the decoder drops the frames
  nothing references (none of them a target) and decodes only the reference chain. When a GOP was sent to its
  end the decoder runs on into the next (a plain front-to-back decode); otherwise it is drained and flushed, and
  restarts at the next needed keyframe as after a seek, which gives the same pixels at an IDR keyframe. An open
  GOP (pictures shown before its keyframe, referencing the previous GOP) whose leading pictures hold a target is
  decoded after the whole previous GOP. A frame's index is `round((pts - start) * time_base * fps)`; a target
  is the first frame at or after it, or the last frame of the stream for targets past its end. Each sampled
  frame is converted to RGB once, straight into its rows of `out`. The pass ends once every target is in.
  """

  def __init__(self, path: str, stream, targets: Sequence[int], fps: float, out: "_Output"):
    self.path = path
    self.codec = stream.codec_context
    self.time_base = float(stream.time_base)
    self.start = stream.start_time or 0
    self.fps = fps
    self.out = out
    self.pending = collections.deque(sorted(set(targets)))
    self.live = False  # the decoder was sent every packet so far, so it can run on into the next GOP
    self.dirty = False  # packets were sent since the last flush
    self.skip = None  # the skip_frame setting last given to the decoder
    self.last = None  # [index, frame, rgb or None] of the latest decoded frame, for targets past the end
    self.decode_errors = 0

  def run(self, container, stream):
    group, prev = [], None
    for packet in self._packets(container, stream):
      if group and (packet.is_keyframe or len(group) >= _MAX_GROUP_PACKETS):
        self._group(group, prev, whole=not packet.is_keyframe)
        group, prev = [], group
        if not self.pending:  # every target is in: the rest of the file is not read
          return
      group.append(packet)
    if group:
      self._group(group, prev, whole=False, final=True)
    self._drain()
    while self.pending and self.last is not None:  # past the last decodable frame (a truncated file or an
      self._fill(self.pending.popleft(), self.last)  # overstated frame count): its last frame stands in

  def _packets(self, container, stream):
    import av

    packets = container.demux(stream)
    while True:
      try:
        packet = next(packets)
      except StopIteration:
        return
      except av.error.FFmpegError:  # a truncated or damaged file: what was read so far is the video
        return
      if packet.size:  # the empty packet at the end only asks for a flush; _drain does that
        yield packet

  def _index(self, ts) -> int | None:
    return None if ts is None else int(round((ts - self.start) * self.time_base * self.fps))

  def _group(self, group, prev, *, whole: bool, final: bool = False):
    stamps = [p.pts if p.pts is not None else p.dts for p in group]
    index = [self._index(ts) for ts in stamps]
    known = sorted((i, ts, pos) for pos, (i, ts) in enumerate(zip(index, stamps)) if i is not None)
    continuation = prev is not None and not group[0].is_keyframe  # the rest of a keyframe-less run
    need: set[int] = set()  # decode positions of the frames that targets take
    if not known:
      need = set(range(len(group))) if self.pending else need
    else:
      top = known[-1][0]
      order = [k[0] for k in known]
      for t in self.pending:
        if t > top:
          break
        need.add(known[bisect.bisect_left(order, t)][2])
      if final and self.pending and self.pending[-1] > top:
        need.add(known[-1][2])  # the last frame stands in for targets past the end
    if not need and not (whole or continuation):
      self._drain()
      return
    stop = len(group) - 1 if whole or continuation else max(need)
    keyframe_index = index[0]
    leading = keyframe_index is not None and any(index[p] is not None and index[p] < keyframe_index for p in need)
    if leading and not self.live and prev is not None:
      self._drain()
      for packet in prev:
        self._send(packet, keep=False)
    for pos in range(stop + 1):
      self._send(group[pos], keep=pos in need or not known)
    self.live = stop == len(group) - 1
    if not self.live:
      self._drain()

  def _send(self, packet, *, keep: bool):
    import av

    skip = "DEFAULT" if keep else "NONREF"
    if skip != self.skip:
      self.codec.skip_frame = self.skip = skip
    self.dirty = True
    try:
      frames = self.codec.decode(packet)
    except av.error.FFmpegError:  # a damaged packet: the frames after it still count
      self.decode_errors += 1
      return
    for frame in frames:
      self._take(frame)

  def _drain(self):
    import av

    if self.dirty:
      try:
        frames = self.codec.decode(None)
      except av.error.FFmpegError:
        self.decode_errors += 1
        frames = []
      for frame in frames:
        self._take(frame)
      self.codec.flush_buffers()
    self.dirty = self.live = False

  def _take(self, frame):
    i = self._index(frame.pts if frame.pts is not None else frame.dts)
    if i is None:
      return
    self.last = entry = [i, frame, None]
    while self.pending and self.pending[0] <= i:
      self._fill(self.pending.popleft(), entry)

  def _fill(self, target: int, entry):
    """Writes the frame of `entry` ([index, frame, rgb or None]) into the rows of `target`."""
    if entry[2] is None:
      entry[2] = _upright(entry[1], entry[1].to_ndarray(format="rgb24"))
    self.out.fill(target, entry[0], entry[2])


class _Output:
  """The decoded rows: frames uint8 [n, h, w, 3] (allocated at the first frame) and source int64 [n] (the
  source frame index of each row, -1 until filled) for the sampled targets int [n]; decode threads fill
  distinct rows."""

  def __init__(self, path: str, targets: np.ndarray):
    import threading

    self.path = path
    self.rows: dict[int, list[int]] = {}  # target index -> the output rows that show it
    for row, t in enumerate(int(t) for t in targets):
      self.rows.setdefault(t, []).append(row)
    self.frames = None
    self.source = np.full(len(targets), -1, np.int64)
    self.lock = threading.Lock()

  def fill(self, target: int, index: int, rgb: np.ndarray):
    with self.lock:
      if self.frames is None:
        self.frames = np.empty((len(self.source),) + rgb.shape, np.uint8)
    if rgb.shape != self.frames.shape[1:]:
      raise VideoError(f"{self.path}: frame size changes mid-stream ({self.frames.shape[1:3]}, {rgb.shape[:2]})")
    for row in self.rows[target]:
      self.frames[row] = rgb
      self.source[row] = index

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    """-> (frames, source); a row no decode reached (its part of a truncated file) repeats the nearest filled
    row before it (after it for the first rows)."""
    filled = np.flatnonzero(self.source >= 0)
    if not filled.size:
      raise VideoError(f"{self.path}: no frame could be decoded")
    for row in np.flatnonzero(self.source < 0):
      before = filled[filled < row]
      near = before[-1] if before.size else filled[0]
      self.frames[row], self.source[row] = self.frames[near], self.source[near]
    return self.frames, self.source


def _split_targets(stream, targets: list[int], workers: int) -> list[tuple[int | None, list[int]]]:
  """Splits the sorted distinct `targets` into at most `workers` runs of whole GOPs of about equal decoding
  work (frames from each GOP's keyframe to its last target), from the container's keyframe index (for MP4 one
  entry per frame in decode order, so a closed GOP's keyframe at entry k is frame k). Each run is
  (frame index to seek to, None for the file start; its targets): the seek lands one GOP before the run, so
  an open GOP's leading pictures still find their references. Single-threaded decoders beat FFmpeg's frame
  threads even when the runs are uneven (a short clip of two GOPs), so any split is taken."""
  try:
    entries = stream.index_entries
    keys = [k for k, e in enumerate(entries) if e.is_keyframe] if len(entries) == stream.frames else []
  except Exception:  # noqa: BLE001  an index PyAV cannot read just means no split
    keys = []
  if workers < 2 or len(keys) < 2:
    return [(None, targets)]
  gops: dict[int, list[int]] = {}  # position of the GOP's keyframe in `keys` -> its targets
  for t in targets:
    gops.setdefault(max(bisect.bisect_right(keys, t) - 1, 0), []).append(t)
  work = {g: ts[-1] - keys[g] + 1 for g, ts in gops.items()}
  share = sum(work.values()) / workers
  runs: list[tuple[int | None, list[int]]] = []
  done = 0.0
  for g in sorted(gops):
    if not runs or (done >= share * len(runs) and len(runs) < workers):
      runs.append((None if g < 2 else keys[g] - 1, []))
    runs[-1][1].extend(gops[g])
    done += work[g]
  return runs


def _decode_indices(path: str, container, stream, targets: np.ndarray, fps: float, threads: int):
  """(frames uint8 [n, h, w, 3], source frame indices int64 [n]) for the sampled `targets` int [n] (sorted,
  repeats allowed). With `threads` > 1 and several GOPs to decode, that many single-threaded decoders (each
  its own container) take runs of GOPs; otherwise one decoder with FFmpeg's frame + slice threads."""
  from concurrent.futures import ThreadPoolExecutor
  import av

  out = _Output(path, targets)
  runs = _split_targets(stream, sorted({int(t) for t in targets}), threads)
  if len(runs) == 1:
    stream.thread_type, stream.codec_context.thread_count = "AUTO", threads
    _SampledDecode(path, stream, runs[0][1], fps, out).run(container, stream)
    return out.result()

  def decode_run(run):
    seek_index, run_targets = run
    try:
      c = av.open(path)
    except (av.error.FFmpegError, OSError) as e:  # e.g. the file went away after the first open
      raise VideoError(f"{path}: cannot reopen for a decoding thread: {e}") from None
    with c:
      s = c.streams.video[0]
      s.thread_type, s.codec_context.thread_count = "SLICE", 1
      if seek_index is not None:
        t0 = s.start_time or 0
        try:
          c.seek(t0 + int(round(seek_index / fps / float(s.time_base))), stream=s, backward=True, any_frame=False)
        except av.error.FFmpegError:  # a damaged index: this run's targets fall back to the nearest rows decoded
          return
      _SampledDecode(path, s, run_targets, fps, out).run(c, s)

  with ThreadPoolExecutor(len(runs)) as ex:
    list(ex.map(decode_run, runs))
  return out.result()


def load_video(
    path: str,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    frames_fps: float = 1.0,
    threads: int | None = None,
) -> DecodedVideo:
  """Reads the sampled frames of a video file, an image file, or a folder of frame images.

  `threads`: decoding threads (default: FFmpeg's automatic count, the usable CPUs + 1, at most 8).

  Returns DecodedVideo(frames uint8 [f, h, w, 3], timestamps float32 [f] seconds, fps, indices [f],
  num_unique), f even. A file that decodes fewer frames than its header claims gives its last decodable frame
  for the targets past that point (indices and num_unique say so). Raises VideoError (naming `path`) for
  missing, unreadable or empty inputs and for files of which no frame decodes.
  """
  sampling = dict(num_frames=num_frames, sample_fps=fps, max_frames=max_frames, start=start, end=end)
  decode_threads = _thread_count(threads)
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
    rate = stream.average_rate or stream.guessed_rate
    if not rate or float(rate) <= 0:
      raise VideoError(f"{path}: unknown frame rate")
    vfps = float(rate)
    total = int(stream.frames or 0)
    if not total:
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
    if len(idx) % 2:  # padded here, so the repeat is one more row of the output rather than a copy of it
      idx = np.append(idx, idx[-1])
    frames, source = _decode_indices(path, container, stream, idx, vfps, decode_threads)
  return _finish(frames, source, vfps)


def _thread_count(threads: int | None) -> int:
  """`threads`, or by default FFmpeg's own automatic count (what decord gets): one more than the usable CPUs
  when there are several, so a thread waiting on I/O or a finished run leaves no core idle; at most 8."""
  if threads is not None:
    if threads < 1:
      raise ValueError(f"threads must be at least 1, got {threads}")
    return threads
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cpus = os.cpu_count() or 1
  return min(cpus + 1, 8) if cpus > 1 else 1


def frame_size_for(
    height: int, width: int, size: int, *, keep_aspect: bool = False, patch_size: int = 14, multiple: int | None = None
) -> tuple[int, int]:
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


def preprocess_frames(
    frames_uint8: np.ndarray, size: int | Sequence[int], *, keep_aspect: bool = False, patch_size: int = 14
) -> np.ndarray:
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


def frames_for_model(frames_uint8: np.ndarray, vision) -> np.ndarray:
  """uint8 [f, h, w, 3] -> float32 [f, S, S, 3] as a model's vision tower takes them: resized as the release does
  at `vision.image_size` (on its `patch_size` grid), then CLIP-normalised. `vision`: a VisionConfig."""
  return normalize_frames(preprocess_frames(frames_uint8, vision.image_size, patch_size=vision.patch_size))


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
