"""Declared mappings from TFDS datasets' features to our samples (a conversation plus sampled frames).

A mapping belongs to a dataset *shape*: the feature names and types it reads. `DATASET_SHAPES` says which
TFDS catalog datasets have which shape; `DataConfig.tfds_mapping` applies a shape to any other dataset with
the same features.

  kangaroo_video_qa     ours (tools.build_dataset --tfds): id, messages/{role, content}, frames, timestamps,
                        video/{path, start, end} -> the record as built
  image_caption         coco_captions: image (Image uint8 [h, w, 3]), captions/text (strings) -> 1 frame;
                        user "<video>Describe the image briefly.", assistant: caption i mod n at read i
  video_classification  ucf101: video (Video uint8 [t, h, w, 3], 25 fps), label (ClassLabel) -> frames sampled
                        as DataConfig says; user "<video>What action is performed in the video?", assistant: the
                        label name in words ("ApplyEyeMakeup" -> "apply eye makeup")
  video_caption         webvid: video (Video uint8 [t, h, w, 3], 30 fps), caption (string) -> frames sampled as
                        DataConfig says; user "<video>Describe the video briefly.", assistant: the caption

Features are checked once, when the dataset is opened (`Mapping.bind`): a missing feature or one of another
kind / dtype is a MappingError naming the dataset, split and feature. What a single example holds (an
undecodable frame, no caption, a label out of range) is checked per example and skips it (RecordError /
VideoError, counted by the pipeline).

Image and Video features are read still encoded (see tfds_source.KeepEncoded) and decoded here with PIL, so
only the sampled frames of a video are decoded and a corrupt frame skips its example instead of stopping the
reader.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from typing import Any, Callable

import numpy as np

from kangaroo_jax.data.config import DataConfigError
from kangaroo_jax.data.records import RecordError
from kangaroo_jax.data.video import VideoError, load_video, sample_indices

# Field kinds: what a mapped feature must be (checked against the dataset's declared features).
KINDS = {
    "image": "an image (Image, or a uint8 Tensor [h, w, c])",
    "frames": "a sequence of images (Video / Sequence(Image), or a uint8 Tensor [t, h, w, c])",
    "string": "a string (Text, or a string Tensor of shape ())",
    "strings": "a sequence of strings (Sequence(Text) or a string Tensor [n])",
    "class_label": "a ClassLabel",
    "integer": "an integer scalar",
    "floats": "a float Tensor [n]",
    "float": "a float scalar",
}


class MappingError(DataConfigError):
  """A dataset's features do not fit the mapping; the message names the dataset, split and feature."""


@dataclasses.dataclass(frozen=True)
class Field:
  path: str  # "captions/text": keys through nested feature dicts (a key may itself contain "/", e.g. "image/id")
  kind: str  # one of KINDS


@dataclasses.dataclass(frozen=True)
class MappedSample:
  """What a mapping makes of one example: frames uint8 [f, h, w, 3] and timestamps float32 [f] seconds."""

  id: str
  messages: list
  frames: np.ndarray
  timestamps: np.ndarray


@dataclasses.dataclass(frozen=True)
class Sampling:
  """The DataConfig fields a mapping needs (picklable, for the Grain workers)."""

  num_frames: int | None
  fps: float | None
  max_frames: int | None
  video_marker: str


def _leaf(features, path: str) -> tuple[Any, int, str | None]:
  """(leaf feature, number of Sequence levels around it, None) or (None, 0, what is missing)."""
  from tensorflow_datasets import features as tf_features

  feature, rank, rest = features, 0, path
  while True:
    while isinstance(feature, tf_features.Sequence):
      feature, rank = feature.feature, rank + 1
    if not rest:
      return feature, rank, None
    if not isinstance(feature, tf_features.FeaturesDict):
      return None, 0, f"{path!r} goes below a {type(feature).__name__}, which has no sub-features"
    keys = sorted(feature.keys(), key=len, reverse=True)  # longest first: "image/id" before "image"
    key = next((k for k in keys if rest == k or rest.startswith(k + "/")), None)
    if key is None:
      return None, 0, f"no feature {rest!r}" + (f" under {path[:-len(rest) - 1]!r}" if rest != path else "")
    feature, rest = feature[key], rest[len(key) + 1 :]


def describe(feature, rank: int) -> str:
  """A one-line description of a feature (the dtype by NumPy name: `FeatureConnector.dtype` needs TensorFlow)."""
  dtype = getattr(feature, "np_dtype", None)
  name = np.dtype(dtype).name if dtype is not None and not isinstance(dtype, dict) else "?"
  text = f"{type(feature).__name__}(shape={tuple(getattr(feature, 'shape', ()))}, dtype={name})"
  return "Sequence(" * rank + text + ")" * rank


def _fits(feature, rank: int, kind: str) -> bool:
  from tensorflow_datasets import features as tf_features

  dtype = getattr(feature, "np_dtype", None)
  if dtype is None or isinstance(dtype, dict):
    return False
  dtype, shape = np.dtype(dtype), tuple(getattr(feature, "shape", ()) or ())
  if kind in ("image", "frames"):
    sequence = int(kind == "frames")  # frames: one Sequence level around an Image, or one more Tensor axis
    if isinstance(feature, tf_features.Image):
      ok = rank == sequence and len(shape) == 3
    else:
      ok = isinstance(feature, tf_features.Tensor) and rank == 0 and len(shape) == 3 + sequence
    return ok and dtype == np.uint8 and shape[-1] in (1, 3, None)
  if kind == "class_label":
    return isinstance(feature, tf_features.ClassLabel) and rank == 0
  total_rank = rank + len(shape)
  if kind in ("string", "strings"):
    return dtype.kind in "OSU" and total_rank == (0 if kind == "string" else 1)
  if kind == "integer":
    return dtype.kind in "iu" and total_rank == 0
  if kind in ("float", "floats"):
    return dtype.kind == "f" and total_rank == (0 if kind == "float" else 1)
  raise ValueError(f"unknown field kind {kind!r}")


def get(example: dict, path: str) -> Any:
  """The value at `path` in a decoded example (keys may contain "/": longest key first, as `_leaf`)."""
  node, rest = example, path
  while rest:
    keys = sorted(node.keys(), key=len, reverse=True)
    key = next(k for k in keys if rest == k or rest.startswith(k + "/"))
    node, rest = node[key], rest[len(key) + 1 :]
  return node


def text(value, where: str, path: str) -> str:
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise RecordError(f"{where}: feature {path!r} is not UTF-8 text ({e})") from None
  if isinstance(value, str):
    return value
  raise RecordError(f"{where}: feature {path!r} holds {type(value).__name__}, expected a string")


def texts(value, where: str, path: str) -> list[str]:
  return [text(v, where, path) for v in np.asarray(value, dtype=object).reshape(-1)]


def decode_image(value, where: str) -> np.ndarray:
  """Encoded image bytes (any format PIL reads) or a uint8 array [h, w, c] -> uint8 [h, w, 3]."""
  if isinstance(value, np.ndarray) and value.dtype == np.uint8:
    if value.ndim != 3 or value.shape[-1] not in (1, 3):
      raise RecordError(f"{where}: image array of shape {value.shape}, expected [h, w, 1 or 3]")
    return np.repeat(value, 3, axis=-1) if value.shape[-1] == 1 else value
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value.item()
  if not isinstance(value, bytes):
    raise RecordError(f"{where}: expected encoded image bytes or a uint8 array, got {type(value).__name__}")
  from PIL import Image

  try:
    with Image.open(io.BytesIO(value)) as im:
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # noqa: BLE001  Pillow raises OSError, DecompressionBombError, SyntaxError, ... on bad bytes
    raise VideoError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None


def decode_frames(values, indices, where: str) -> np.ndarray:
  """The frames at `indices` of a video value (encoded bytes per frame, or uint8 [t, h, w, c]) -> [f, h, w, 3]."""
  frames = [decode_image(values[int(i)], f"{where}, frame {int(i)}") for i in indices]
  shapes = sorted({f.shape for f in frames})
  if len(shapes) > 1:
    raise VideoError(f"{where}: frames have different sizes {shapes}")
  return np.stack(frames)


def sample_video(values, fps: float, sampling: Sampling, where: str) -> tuple[np.ndarray, np.ndarray]:
  """Samples a video value as DataConfig says and decodes only those frames: (frames, timestamps)."""
  total = len(values)
  try:
    idx = sample_indices(
        total, fps, num_frames=sampling.num_frames, sample_fps=sampling.fps, max_frames=sampling.max_frames
    )
  except ValueError as e:
    raise VideoError(f"{where}: {e}") from None
  return decode_frames(values, idx, where), (idx / fps).astype(np.float32)


def label_words(name: str) -> str:
  """A class name as words: "ApplyEyeMakeup" -> "apply eye makeup", "horse_riding" -> "horse riding"."""
  spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
  return " ".join(spaced.replace("_", " ").split()).lower()


def _turns(sampling: Sampling, question: str, answer: str) -> list[dict]:
  return [{"role": "user", "content": f"{sampling.video_marker}{question}"}, {"role": "assistant", "content": answer}]


def _image_caption(ex: dict, ctx: "BoundMapping", index: int, where: str) -> MappedSample:
  captions = [c.strip() for c in texts(get(ex, "captions/text"), where, "captions/text") if c.strip()]
  if not captions:
    raise RecordError(f"{where}: feature 'captions/text' holds no caption")
  frame = decode_image(get(ex, "image"), f"{where}, feature 'image'")
  sample_id = str(get(ex, "image/id")) if ctx.has("image/id") else where
  return MappedSample(
      sample_id,
      _turns(ctx.sampling, "Describe the image briefly.", captions[index % len(captions)]),
      frame[None],
      np.zeros(1, np.float32),
  )


def _video_classification(ex: dict, ctx: "BoundMapping", index: int, where: str) -> MappedSample:
  label = int(get(ex, "label"))
  if not 0 <= label < len(ctx.label_names):
    raise RecordError(f"{where}: feature 'label' is {label}, not a class of the {len(ctx.label_names)} declared")
  frames, ts = sample_video(get(ex, "video"), ctx.mapping.fps, ctx.sampling, f"{where}, feature 'video'")
  return MappedSample(
      where,
      _turns(ctx.sampling, "What action is performed in the video?", label_words(ctx.label_names[label])),
      frames,
      ts,
  )


def _video_caption(ex: dict, ctx: "BoundMapping", index: int, where: str) -> MappedSample:
  caption = text(get(ex, "caption"), where, "caption").strip()
  if not caption:
    raise RecordError(f"{where}: feature 'caption' is empty")
  frames, ts = sample_video(get(ex, "video"), ctx.mapping.fps, ctx.sampling, f"{where}, feature 'video'")
  sample_id = text(get(ex, "id"), where, "id") if ctx.has("id") else where
  return MappedSample(sample_id, _turns(ctx.sampling, "Describe the video briefly.", caption), frames, ts)


def _optional_seconds(value) -> float | None:
  v = float(value)
  return v if math.isfinite(v) else None


def _kangaroo_video_qa(ex: dict, ctx: "BoundMapping", index: int, where: str) -> MappedSample:
  sample_id = text(get(ex, "id"), where, "id")
  where = f"{where} ({sample_id})"
  roles = texts(get(ex, "messages/role"), where, "messages/role")
  contents = texts(get(ex, "messages/content"), where, "messages/content")
  if len(roles) != len(contents):
    raise RecordError(f"{where}: {len(roles)} message roles for {len(contents)} contents")
  messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
  encoded = get(ex, "frames")
  path = text(get(ex, "video/path"), where, "video/path")
  if len(encoded):
    frames = decode_frames(encoded, range(len(encoded)), f"{where}, feature 'frames'")
    ts = np.asarray(get(ex, "timestamps"), np.float32).reshape(-1)
    if ts.shape != (len(frames),):
      raise RecordError(f"{where}: {ts.shape[0]} timestamps for {len(frames)} frames")
  elif path:
    s = ctx.sampling
    v = load_video(
        path,
        num_frames=s.num_frames,
        fps=s.fps,
        max_frames=s.max_frames,
        start=_optional_seconds(get(ex, "video/start")),
        end=_optional_seconds(get(ex, "video/end")),
    )
    frames, ts = v.frames, v.timestamps
  else:
    raise RecordError(f"{where}: neither 'frames' nor 'video/path' is set")
  return MappedSample(sample_id, messages, frames, ts)


@dataclasses.dataclass(frozen=True)
class Mapping:
  shape: str
  fields: tuple[Field, ...]  # required
  convert: Callable  # (example, BoundMapping, read index, where) -> MappedSample
  optional: tuple[Field, ...] = ()  # used when present (and then checked like the required ones)
  fps: float | None = None  # frame rate of the video feature (the catalog's extraction rate)

  def bind(self, features, where: str) -> "BoundMapping":
    """Checks `features` (a tfds FeaturesDict) against the fields; MappingError naming the first misfit."""
    present = []
    for field in self.fields + self.optional:
      feature, rank, missing = _leaf(features, field.path)
      if missing is not None:
        if field in self.optional:
          continue
        raise MappingError(
            f"{where}: feature {field.path!r} is missing ({missing}); mapping {self.shape!r} needs "
            f"{', '.join(f'{f.path} ({f.kind})' for f in self.fields)}; the dataset has "
            f"{', '.join(sorted(features.keys()))}"
        )
      if not _fits(feature, rank, field.kind):
        raise MappingError(
            f"{where}: feature {field.path!r} is {describe(feature, rank)}, mapping {self.shape!r} "
            f"expects {KINDS[field.kind]}"
        )
      present.append(field.path)
    labels = ()
    label = next((f for f in self.fields if f.kind == "class_label"), None)
    if label is not None:
      labels = tuple(_leaf(features, label.path)[0].names)
    encoded = tuple(p for p in present if _is_encoded(features, p))
    return BoundMapping(self, where, tuple(present), labels, encoded)


def _is_encoded(features, path: str) -> bool:
  """An Image (or a Sequence of them) under a top-level key: read encoded (TFDS takes decoders by key; nested
  ones are decoded by TFDS, into arrays, which the mappings take too)."""
  from tensorflow_datasets import features as tf_features

  return path in features.keys() and isinstance(_leaf(features, path)[0], tf_features.Image)


@dataclasses.dataclass(frozen=True)
class BoundMapping:
  """A mapping checked against one dataset split; picklable (sent to the Grain workers)."""

  mapping: Mapping
  where: str  # "tfds:NAME split 'SPLIT'", the prefix of every message
  present: tuple[str, ...]  # field paths the dataset has
  label_names: tuple[str, ...]  # the ClassLabel's names, for video_classification
  encoded: tuple[str, ...]  # Image / Video fields, read still encoded (top-level keys)
  sampling: Sampling | None = None

  def has(self, path: str) -> bool:
    return path in self.present

  def with_sampling(self, sampling: Sampling) -> "BoundMapping":
    return dataclasses.replace(self, sampling=sampling)

  def __call__(self, example: dict, index: int, record: int) -> MappedSample:
    """`index`: position in the read stream (varies the caption per epoch); `record`: index in the split."""
    return self.mapping.convert(example, self, index, f"{self.where} record {record}")


MAPPINGS = {
    "kangaroo_video_qa": Mapping(
        "kangaroo_video_qa",
        (
            Field("id", "string"),
            Field("messages/role", "strings"),
            Field("messages/content", "strings"),
            Field("frames", "frames"),
            Field("timestamps", "floats"),
            Field("video/path", "string"),
            Field("video/start", "float"),
            Field("video/end", "float"),
        ),
        _kangaroo_video_qa,
    ),
    "image_caption": Mapping(
        "image_caption",
        (Field("image", "image"), Field("captions/text", "strings")),
        _image_caption,
        optional=(Field("image/id", "integer"),),
    ),
    "video_classification": Mapping(
        "video_classification",
        (Field("video", "frames"), Field("label", "class_label")),
        _video_classification,
        fps=25.0,
    ),
    "video_caption": Mapping(
        "video_caption",
        (Field("video", "frames"), Field("caption", "string")),
        _video_caption,
        optional=(Field("id", "string"),),
        fps=30.0,
    ),
}

# TFDS catalog dataset name (without config / version) -> the shape of its features.
DATASET_SHAPES = {
    "kangaroo_video_qa": "kangaroo_video_qa",
    "coco_captions": "image_caption",
    "ucf101": "video_classification",
    "webvid": "video_caption",
}
