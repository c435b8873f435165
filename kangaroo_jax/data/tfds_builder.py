"""`kangaroo_video_qa`: our video-QA records as a TFDS dataset (written by `tools.build_dataset --tfds`).

    data_dir/kangaroo_video_qa/1.0.0/
      dataset_info.json, features.json                       (TFDS's description: features, splits, sizes)
      kangaroo_video_qa-SPLIT.array_record-0000i-of-0000n    (tf.train.Example records, random access)

`tfds.data_source("kangaroo_video_qa", data_dir=...)` and `tfds.builder(...).info` open it from its files,
without this module. Features (one layout for every build, so the declared features never depend on the
build options):

    id          Text                      the manifest row's id
    messages    Sequence({role, content}) the conversation (role: system | user | assistant)
    frames      Sequence(Image uint8)     sampled, resized frames, JPEG bytes (--frame-format jpeg) or PNG
                                          (raw: lossless); empty for --reference records
    timestamps  Tensor float32 [f]        seconds of each frame in its video
    video       {path: Text, start: float64, end: float64}   --reference records: decoded at training time;
                                          "" / NaN when unset

Frames are handed to TFDS already encoded (bytes), so writing needs no TensorFlow (TFDS encodes arrays with
tf.image). Version 1.0.0 holds what record format 1 (kangaroo_jax.data.records) holds.
"""

from __future__ import annotations

import inspect
import io
import math
from typing import Iterable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from kangaroo_jax.data.records import decode_frames

NAME = "kangaroo_video_qa"
VERSION_STR = "1.0.0"


def features() -> tfds.features.FeaturesDict:
  f = tfds.features
  return f.FeaturesDict(
      {
          "id": f.Text(doc="manifest row id"),
          "messages": f.Sequence({"role": f.Text(), "content": f.Text()}, doc="the conversation, in order"),
          "frames": f.Sequence(f.Image(shape=(None, None, 3)), doc="sampled frames: JPEG, or PNG for raw builds"),
          "timestamps": f.Tensor(shape=(None,), dtype=np.float32, doc="seconds of each frame"),
          "video": f.FeaturesDict(
              {"path": f.Text(), "start": f.Scalar(np.float64), "end": f.Scalar(np.float64)},
              doc="the video of a --reference record (path empty otherwise); NaN: unset",
          ),
      }
  )


def _png(frame: np.ndarray) -> bytes:
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format="PNG")
  return buf.getvalue()


def _seconds(value) -> float:
  return math.nan if value is None else float(value)


def example_from_record(rec: dict) -> dict:
  """A record as kangaroo_jax.data.records lays it out (unpacked) -> this dataset's example."""
  frames = rec.get("frames")
  if not frames:
    encoded = []
  elif frames["format"] == "jpeg":
    encoded = list(frames["data"])
  else:  # raw uint8: PNG keeps it bit exact
    encoded = [_png(f) for f in decode_frames(frames, f"record {rec.get('id')!r}")]
  video = rec.get("video") or {}
  return {
      "id": rec["id"],
      "messages": {"role": [m["role"] for m in rec["messages"]], "content": [m["content"] for m in rec["messages"]]},
      "frames": encoded,
      "timestamps": np.asarray(rec.get("timestamps", ()), np.float32).reshape(-1),
      "video": {
          "path": video.get("path") or "",
          "start": _seconds(video.get("start")),
          "end": _seconds(video.get("end")),
      },
  }


class SourceFileCodePath:
  """Mixin for builders defined in a package: TFDS looks their source up through `importlib_resources`, which
  it installs only below Python 3.9 (AttributeError / ModuleNotFoundError above); this is TFDS's own fallback,
  the file that defines the class."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))


class KangarooVideoQa(SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
  """Writes the examples it is given per split; `tools.build_dataset` feeds it converted manifest rows."""

  VERSION = tfds.core.Version(VERSION_STR)
  RELEASE_NOTES = {VERSION_STR: "Record format 1 of kangaroo_jax.data.records."}

  def __init__(self, *, splits: dict[str, Iterable[tuple[int, dict]]] | None = None, description: str = "", **kwargs):
    """`splits`: split name -> (unique key, example) pairs; only needed to write (`download_and_prepare`)."""
    self._examples = splits
    self._description = description
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=features(),
        description=self._description or "Video question-answer records of kangaroo-jax (tools.build_dataset).",
    )

  def _split_generators(self, dl_manager):
    if self._examples is None:
      raise RuntimeError(
          f"{NAME} is written by `python -m tools.build_dataset MANIFEST OUT_DIR --tfds`; "
          "read it with tfds.data_source / tfds.builder and data_dir=OUT_DIR"
      )
    return {name: self._generate_examples(examples) for name, examples in self._examples.items()}

  def _generate_examples(self, examples):
    yield from examples
