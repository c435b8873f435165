"""Video / image URLs of a request -> the normalised frames the engine encodes, and a small cache of them.

URLs: a local path, `file://PATH`, or `data:<mime>;base64,<bytes>` (written to a temporary file that is removed
after decoding). Remote URLs (http, https, ...) are refused: this server never fetches anything. Several images
are the frames of one video at `FRAMES_FPS` (lmms-eval sends a video that way); decoding then samples
`num_frames` of them uniformly, as for a video file, or takes them all when there are fewer (an odd count gets
its last frame repeated, as every video does). Decoding reuses the chat API's path (load_video,
frames_for_model).
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import mimetypes
import os
import shutil
import tempfile
import threading
import urllib.parse
from typing import Any

import numpy as np

from kangaroo_jax.data.video import VideoError, frames_for_model, load_video
from kangaroo_jax.serve.errors import bad_request
from kangaroo_jax.serve.protocol import MediaRef

FRAMES_FPS = 1.0  # timestamps of image-sequence frames: one a second (load_video's default for a frame folder)
# data: URL mime types -> the file suffix load_video recognises them by (videos: PyAV sniffs the content).
IMAGE_SUFFIXES = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
}


@dataclasses.dataclass
class Visual:
  """One decoded video: frames float32 [f, S, S, 3] (normalised; None once encoded), timestamps float32 [f],
  grid (f, S, S), and `tokens`, its visual tokens [1, n_vis, embed] once the engine has encoded it."""

  key: tuple
  frames: np.ndarray | None
  timestamps: np.ndarray
  grid: tuple[int, int, int]
  tokens: Any = None


class VisualCache:
  """The last `capacity` videos by key (thread-safe): a multi-turn conversation re-sends its video every turn."""

  def __init__(self, capacity: int):
    self.capacity = capacity
    self._items: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()
    self.hits = self.decodes = 0

  def get(self, key: tuple) -> Visual | None:
    with self._lock:
      v = self._items.get(key)
      if v is not None:
        self._items.move_to_end(key)
        self.hits += 1
      return v

  def put(self, v: Visual) -> None:
    with self._lock:
      self.decodes += 1
      self._items[v.key] = v
      self._items.move_to_end(v.key)
      while len(self._items) > self.capacity:
        self._items.popitem(last=False)


@dataclasses.dataclass(frozen=True)
class _Source:
  """A URL resolved: a local `path`, or `data` bytes with the `suffix` of the temporary file they go to."""

  path: str | None = None
  data: bytes | None = None
  suffix: str = ""

  def identity(self) -> tuple:
    if self.path is not None:
      st = os.stat(self.path) if os.path.exists(self.path) else None
      return ("path", os.path.abspath(self.path), st and st.st_mtime_ns, st and st.st_size)
    return ("data", hashlib.sha256(self.data).hexdigest())


def _resolve(url: str, param: str, kind: str) -> _Source:
  scheme = url.split(":", 1)[0].lower() if ":" in url else ""
  if scheme == "data":
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
      raise bad_request(f"{param}: a data: URL must be base64 (data:<mime>;base64,<bytes>)", param)
    mime = head[5 : -len(";base64")].lower()
    try:
      data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
      raise bad_request(f"{param}: the data: URL is not valid base64", param) from None
    if not data:
      raise bad_request(f"{param}: the data: URL holds no bytes", param)
    if mime.startswith("image/") and mime not in IMAGE_SUFFIXES:
      raise bad_request(f"{param}: image type {mime} is not one of {sorted(IMAGE_SUFFIXES)}", param)
    is_image = mime in IMAGE_SUFFIXES or (kind == "image_url" and not mime.startswith("video/"))
    suffix = IMAGE_SUFFIXES.get(mime, ".png") if is_image else mimetypes.guess_extension(mime) or ".video"
    return _Source(data=data, suffix=suffix)
  if scheme == "file":
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
      raise bad_request(
          f"{param}: file:// URLs must name a local file (file:///path), got host {parsed.netloc!r}", param
      )
    return _Source(path=urllib.parse.unquote(parsed.path))
  if len(scheme) > 1 and "://" in url:  # a one-letter "scheme" is a Windows drive; anything else is remote
    raise bad_request(
        f"{param}: remote URLs ({scheme}://) are not fetched by this server; pass a local path, a "
        "file:// URL or a base64 data: URL",
        param,
    )
  return _Source(path=url)


def _materialise(sources: list[_Source], folder: str) -> list[str]:
  """Paths of the sources; data is written under `folder` (numbered, so a frame sequence keeps its order)."""
  paths = []
  for i, s in enumerate(sources):
    if s.path is not None:
      paths.append(s.path)
      continue
    path = os.path.join(folder, f"frame_{i:05d}{s.suffix}")
    with open(path, "wb") as f:
      f.write(s.data)
    paths.append(path)
  return paths


def _frame_folder(paths: list[str], folder: str) -> str:
  """A folder holding the frame images in request order (links to local files, the data files moved in)."""
  frames = os.path.join(folder, "frames")
  os.mkdir(frames)
  for i, p in enumerate(paths):
    if not os.path.isfile(p):
      raise VideoError(f"{p}: no such file")
    target = os.path.join(frames, f"{i:05d}{os.path.splitext(p)[1].lower()}")
    if os.path.dirname(p) == folder:
      os.replace(p, target)
    else:
      os.symlink(os.path.abspath(p), target)
  return frames


def load_visual(media: MediaRef, *, num_frames: int, vision, cache: VisualCache, tmp_root: str | None = None) -> Visual:
  """The decoded (or cached) video of a request, sized for the model's `vision` config (a VisionConfig); ApiError
  400 naming the field for anything unreadable."""
  kind = "video_url" if media.kind == "video" else "image_url"
  sources = [_resolve(u, media.param, kind) for u in media.urls]
  if media.kind == "frames":  # the client sampled these frames: never more than it sent (no repeated frames)
    num_frames = min(num_frames, len(sources))
  try:
    key = (media.kind, num_frames) + tuple(s.identity() for s in sources)
  except OSError as e:
    raise bad_request(f"{media.param}: {e}", media.param) from None
  hit = cache.get(key)
  if hit is not None:
    return hit
  folder = tempfile.mkdtemp(prefix="kangaroo_serve_", dir=tmp_root)
  try:
    paths = _materialise(sources, folder)
    target = paths[0] if media.kind != "frames" else _frame_folder(paths, folder)
    decoded = load_video(target, num_frames=num_frames, frames_fps=FRAMES_FPS)
    frames = frames_for_model(decoded.frames, vision)
  except VideoError as e:
    raise bad_request(f"{media.param}: {_without(str(e), folder)}", media.param, code="invalid_media") from None
  except (ValueError, OSError) as e:  # e.g. a sampling range the clip cannot give, an unreadable file
    raise bad_request(
        f"{media.param}: cannot read the media: {_without(str(e), folder)}", media.param, code="invalid_media"
    ) from None
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  visual = Visual(key, frames, np.asarray(decoded.timestamps, np.float32), tuple(frames.shape[:3]))
  cache.put(visual)
  return visual


def _without(message: str, folder: str) -> str:
  """The message with the temporary folder's name replaced (it means nothing to the client)."""
  return message.replace(folder + os.sep, "").replace(folder, "<upload>")
