"""TFDS as a data source: tools.build_dataset --tfds output opened with tfds.data_source and trained from (with
exact resume), and tiny local TFDS datasets shaped like the catalog's coco_captions (stage 1) and ucf101 (stage 2)
trained through their declared mappings. The tiny datasets are written by TFDS's own GeneratorBasedBuilder
(ArrayRecord, nothing downloaded); their feature names and dtypes are the catalog's, except that ucf101's
`Video` feature (whose constructor imports TensorFlow) is the `Sequence(Image)` it is stored as.
"""

import importlib
import io
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kangaroo_jax.config import ConfigError
from kangaroo_jax.data.config import DataConfig, DataConfigError
from kangaroo_jax.data.pipeline import make_train_iterator
from kangaroo_jax.data.tfds_builder import SourceFileCodePath
from kangaroo_jax.data.tfds_mappings import MappingError, label_words
from tests.data_helpers import CHAT_TEXTS, index_frame, write_video
from tests.train_helpers import BatchRecorder, tiny_config
from train.config import from_configdict
from train.loop import train

UCF_LABELS = ["ApplyEyeMakeup", "BabyCrawling", "HorseRiding", "YoYo"]


def _jpeg(frame: np.ndarray) -> bytes:
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


with tfds.core.registered.skip_registration():  # the catalog's own classes keep their names

  class _Tiny(SourceFileCodePath, tfds.core.GeneratorBasedBuilder):
    """Writes the examples it is given: {split: [example, ...]}; `FEATURES` builds the declared features."""

    FEATURES = None

    def __init__(self, *, examples=None, **kwargs):
      self._examples = examples
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(type(self).FEATURES()))

    def _split_generators(self, dl_manager):
      return {name: self._generate_examples(examples) for name, examples in self._examples.items()}

    def _generate_examples(self, examples):
      yield from enumerate(examples)

  class CocoCaptions(_Tiny):
    """coco_captions/2014 (object_detection/coco_captions.py): coco's features plus captions."""

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014", version=tfds.core.Version("1.1.0"))]

    @staticmethod
    def FEATURES():  # noqa: N802
      f = tfds.features
      return {
          "image": f.Image(encoding_format="jpeg"),
          "image/filename": f.Text(),
          "image/id": np.int64,
          "objects": f.Sequence(
              {
                  "id": np.int64,
                  "area": np.int64,
                  "bbox": f.BBoxFeature(),
                  "label": f.ClassLabel(num_classes=80),
                  "is_crowd": np.bool_,
              }
          ),
          "captions": f.Sequence({"text": np.str_, "id": np.int64}),
      }

  class Ucf101(_Tiny):
    """ucf101/ucf101_1_256 (video/ucf101.py): a jpeg Video (stored as a Sequence of Images) and a ClassLabel."""

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="ucf101_1_256", version=tfds.core.Version("2.0.0"))]

    @staticmethod
    def FEATURES():  # noqa: N802
      f = tfds.features
      return {
          "video": f.Sequence(f.Image(shape=(32, 32, 3), encoding_format="jpeg")),
          "label": f.ClassLabel(names=UCF_LABELS),
      }

  class Webvid(_Tiny):
    """webvid (datasets/webvid): a jpeg Video with its caption."""

    VERSION = tfds.core.Version("1.0.0")

    @staticmethod
    def FEATURES():  # noqa: N802
      f = tfds.features
      return {
          "video": f.Sequence(f.Image(shape=(32, 32, 3), encoding_format="jpeg")),
          "id": f.Text(),
          "caption": f.Text(),
          "url": f.Text(),
      }


def _write(cls, data_dir, examples, **kwargs) -> str:
  b = cls(data_dir=str(data_dir), file_format="array_record", examples=examples, **kwargs)
  b.download_and_prepare(
      download_dir=str(data_dir / "downloads"), download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )
  return str(data_dir)


def _coco(i: int, captions=("A red ball rolls across the table.",), image=None) -> dict:
  captions = list(captions)
  return {
      "image": image if image is not None else _jpeg(index_frame(i, 40, 52)),
      "image/filename": f"{i}.jpg",
      "image/id": 1000 + i,
      "objects": {
          "id": [i],
          "area": [9],
          "bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)],
          "label": [i % 80],
          "is_crowd": [False],
      },
      "captions": {"text": captions, "id": [100 * i + k for k in range(len(captions))]},
  }


def _clip(i: int, frames: int) -> list[bytes]:
  return [_jpeg(index_frame(10 * i + k, 32, 32)) for k in range(frames)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  from kangaroo_jax.data.tiny_tokenizer import build_chat_sentencepiece

  root = tmp_path_factory.mktemp("tfds")
  tok = os.path.dirname(build_chat_sentencepiece(CHAT_TEXTS, str(root / "tok"), 400))
  return root, tok


def _row(i, video, answer="A red ball rolls across the table."):
  return json.dumps(
      {
          "id": f"r{i}",
          "video": video,
          "conversations": [
              {"from": "human", "value": "<video>What happens in the video?"},
              {"from": "gpt", "value": answer},
          ],
      }
  )


@pytest.fixture(scope="module")
def built(env):
  """tools.build_dataset --tfds (through its CLI) of a train manifest with a malformed row and a too-long answer,
  plus a validation split; and the same train manifest built as shards, to compare with."""
  from tools.build_dataset import main

  root, _ = env
  videos = root / "videos"
  videos.mkdir()
  good = [write_video(str(videos / f"v{i}.mp4"), 6 + 2 * i, h=48, w=64) for i in range(5)]
  rows = [_row(i, v) for i, v in enumerate(good[:4])]
  rows.append(_row(9, good[0], " ".join(["The quick brown fox jumps over the lazy dog."] * 30)))  # too long to train
  (root / "train.jsonl").write_text("\n".join(rows + ['{"id": "x", "conversations": []}']))
  (root / "val.jsonl").write_text(_row(20, good[4]))
  out = root / "ds"
  argv = [str(root / "train.jsonl"), str(out), "--size", "56", "--num-frames", "4", "--max-skip-rate", "0.5"]
  assert main(argv + ["--tfds", "--add-split", f"validation={root / 'val.jsonl'}"]) == 0
  assert main(argv[:1] + [str(root / "shards")] + argv[2:]) == 0
  return out, root / "shards"


def test_build_dataset_tfds_output_opens_with_tfds_data_source(built, capsys):
  out, shards = built
  sources = tfds.data_source("kangaroo_video_qa", data_dir=str(out))
  assert {k: len(v) for k, v in sources.items()} == {"train": 5, "validation": 1}
  info = tfds.builder("kangaroo_video_qa", data_dir=str(out)).info
  assert set(info.features.keys()) == {"id", "messages", "frames", "timestamps", "video"}
  assert info.splits["train"].num_examples == 5 and info.version == "1.0.0"

  # The same rows as the shard build, frame for frame (the JPEG bytes are stored as they were encoded).
  from array_record.python.array_record_module import ArrayRecordReader
  from kangaroo_jax.data.records import decode_frames, unpack_record

  reader = ArrayRecordReader(str(shards / "data-00000-of-00001.array_record"))
  want = {r["id"]: r for r in map(unpack_record, reader.read_all())}
  reader.close()
  got = {sources["train"][i]["id"].decode(): sources["train"][i] for i in range(5)}
  assert got.keys() == want.keys()
  for key, ex in got.items():
    assert np.array_equal(np.stack(ex["frames"]), decode_frames(want[key]["frames"])), key
    assert np.allclose(ex["timestamps"], want[key]["timestamps"])
    assert [m.decode() for m in ex["messages"]["content"]] == [m["content"] for m in want[key]["messages"]]
    assert ex["video"]["path"] == b"" and np.isnan(ex["video"]["start"])

  # OUT_DIR holds the summary and TFDS's files only; nothing is left beside it.
  summary = json.loads((out / "summary.json").read_text())
  assert summary["status"] == "complete" and summary["skipped"] == {"malformed_row": 1}
  assert summary["tfds"]["splits"]["train"]["written"] == 5 and summary["tfds"]["splits"]["validation"]["written"] == 1
  files = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs)
  assert files == sorted(["summary.json"] + summary["shards"])
  assert not [n for n in os.listdir(out.parent) if n.startswith(".ds.")]
  assert [p.split("/")[-1] for p in summary["shards"]][:2] == ["dataset_info.json", "features.json"]

  # A rebuild replaces it only with --overwrite, and never when a file it did not write lies in its tree.
  from tools.build_dataset import main

  argv = [str(out.parent / "val.jsonl"), str(out), "--size", "56", "--num-frames", "4", "--tfds"]
  assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
  stray = out / "kangaroo_video_qa" / "notes.txt"
  stray.write_text("mine")
  assert main(argv + ["--overwrite"]) == 2
  assert "kangaroo_video_qa/notes.txt" in capsys.readouterr().err and stray.exists()
  stray.unlink()


def _leftovers(out) -> list[str]:
  return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}."))


def test_a_stopped_or_killed_tfds_build_leaves_the_previous_one_and_is_cleaned_up(built, env, tmp_path, caplog):
  from tools.build_dataset import BuildOptions, SkipRateExceeded, build

  video = str(built[0].parent / "videos" / "v0.mp4")
  rows = lambda n, path=video: "\n".join(_row(i, path) for i in range(n))  # noqa: E731
  (tmp_path / "m20.jsonl").write_text(rows(20))
  (tmp_path / "m5.jsonl").write_text(rows(5))
  (tmp_path / "gone.jsonl").write_text(rows(3, video + ".gone"))
  out, ref = tmp_path / "ds", BuildOptions(reference=True)
  build(str(tmp_path / "m20.jsonl"), str(out), ref, progress=False, tfds=True)

  def train_len():
    return len(tfds.data_source("kangaroo_video_qa", data_dir=str(out), split="train"))

  # Killed inside TFDS's writer (no finally block runs): OUT_DIR unchanged, TFDS's scratch left beside it ...
  kill = (
      "real = b._convert\nn = []\ndef crash(a):\n  n.append(1)\n  if len(n) == 4:\n    import os; os._exit(9)\n"
      "  return real(a)\nb._convert = crash"
  )
  argv = [str(tmp_path / "m5.jsonl"), str(out), "--reference", "--tfds", "--overwrite"]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = f"import sys, tools.build_dataset as b\n{kill}\nsys.exit(b.main({argv!r}))"
  r = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      cwd=repo,
      timeout=120,
      env=dict(os.environ, PYTHONPATH=repo),
  )
  assert r.returncode == 9, r.stderr
  [killed] = _leftovers(out)
  assert json.loads((tmp_path / killed / "summary.json").read_text())["status"] == "building"
  assert os.listdir(tmp_path / killed / ".tfds-work" / "kangaroo_video_qa") and train_len() == 20

  # ... which the next build removes. Stopped by the skip rate, and by a split left without a usable row:
  # OUT_DIR unchanged, only the stopped build's summary is left.
  with caplog.at_level("WARNING", "build_dataset"), pytest.raises(SkipRateExceeded, match="skipped"):
    build(str(tmp_path / "gone.jsonl"), str(out), ref, progress=False, tfds=True, overwrite=True)
  assert f"removed the leftover folder {tmp_path / killed}" in caplog.text
  with pytest.raises(SkipRateExceeded, match="split 'validation': none of the 3 rows"):
    build(
        str(tmp_path / "m5.jsonl"),
        str(out),
        ref,
        progress=False,
        tfds=True,
        overwrite=True,
        max_skip_rate=1.0,
        more_splits={"validation": str(tmp_path / "gone.jsonl")},
    )
  [left] = _leftovers(out)
  assert os.listdir(tmp_path / left) == ["summary.json"] and train_len() == 20
  doomed = shutil.copy(video, tmp_path / "doomed.mp4")
  (tmp_path / "m5.jsonl").write_text(rows(4) + "\n" + _row(4, str(doomed)))
  build(str(tmp_path / "m5.jsonl"), str(out), ref, progress=False, tfds=True, overwrite=True)
  assert _leftovers(out) == [] and train_len() == 5

  # --reference records are decoded when read; a video gone since the build is skipped and counted.
  os.remove(doomed)
  from kangaroo_jax.config import tiny
  from kangaroo_jax.tokenizer import load_tokenizer

  it = make_train_iterator(
      DataConfig(
          dataset="tfds:kangaroo_video_qa",
          tfds_data_dir=str(out),
          seq_len=160,
          batch_size=1,
          frame_size=56,
          max_frames=4,
          num_frames=4,
          num_epochs=2,
          max_skip_rate=1.0,
      ),
      tiny(),
      load_tokenizer(env[1]),
  )
  batches = list(it)
  assert it.skipped == {"missing_video": 2} and it.metrics()["data/seen"] == 10 and len(batches) == 8
  assert all((b["num_frames"] == 4).all() for b in batches)


def _grain_config(env, dataset, data_dir, **changes):
  _, tok = env
  return tiny_config(
      **{
          "data.source": "grain",
          "data.dataset": dataset,
          "data.tfds_data_dir": str(data_dir),
          "data.tokenizer": tok,
          "data.seq_len": 128,
          "data.batch_size": 8,
          "data.max_frames": 8,
          "data.num_frames": 4,
          "data.max_skip_rate": 1.0,
          "total_steps": 3,
          "ckpt.every": 2,
          **changes,
      }
  )


def _grain(cfg):
  from train.data import grain_iterator

  return BatchRecorder(grain_iterator(cfg, 0, 1))


def test_training_from_our_tfds_build_counts_skips_and_resumes_exactly(built, env, tmp_path):
  out, _ = built
  cfg = _grain_config(env, "tfds:kangaroo_video_qa:train", out)
  full_it = _grain(cfg)
  full = train(cfg, str(tmp_path / "full"), iterator=full_it)
  assert full.status == "done" and [h["step"] for h in full.history] == [1, 2, 3]
  assert all(np.isfinite(h["loss"]) for h in full.history)
  data = full.summary["data"]
  packed = sum(len(np.unique(row[row > 0])) for b in full_it.batches for row in b["segment_ids"])
  assert data["data/seen"] == packed + data["data/skipped_total"]
  assert data["data/skipped/too_long"] > 0 and data["data/skipped_total"] == data["data/skipped/too_long"]

  shutil.copytree(tmp_path / "full", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")
  resumed_it = _grain(cfg)
  resumed = train(cfg, str(tmp_path / "resumed"), iterator=resumed_it)
  assert [h["step"] for h in resumed.history] == [3]
  assert resumed.history[0]["loss"] == full.history[2]["loss"]
  for k, v in full_it.batches[2].items():
    assert np.array_equal(resumed_it.batches[0][k], v), k
  assert resumed.summary["data"] == data


def _stage_config(name: str, env, dataset: str, data_dir: str, steps: int = 2):
  _, tok = env
  c = importlib.import_module(f"configs.{name}").get_config(f"mode=cpu,steps={steps},data={dataset},tokenizer={tok}")
  c.data.update(source="grain", tfds_data_dir=data_dir, max_skip_rate=1.0)
  c.export = False
  return from_configdict(ml_collections.ConfigDict(c.to_dict()))


def test_coco_captions_shaped_dataset_trains_stage1_through_its_mapping(env, tmp_path):
  examples = [_coco(i, [f"A red ball rolls across the table {i}.", f"Apples and bananas {i}."]) for i in range(5)]
  examples.append(_coco(5, image=b"\xff\xd8 not a jpeg"))  # stored as given; skipped (bad_video) when read
  data_dir = _write(CocoCaptions, tmp_path / "coco", {"train": examples})
  assert os.path.isdir(os.path.join(data_dir, "coco_captions", "2014", "1.1.0"))
  cfg = _stage_config("stage1_image_pretrain", env, "tfds:coco_captions", data_dir)
  assert (cfg.data.frame_size, cfg.data.max_frames) == (28, 2)

  # The mapping: one frame (padded to the 2 of a frame pair), the caption as the answer, a new caption each read.
  it = _grain(cfg)
  batch = next(it)
  from kangaroo_jax.data.tfds_mappings import MAPPINGS, Sampling
  from kangaroo_jax.data.tfds_source import KeepEncoded

  src = tfds.data_source(
      "coco_captions/2014:1.1.0",
      data_dir=data_dir,
      split="train",  # a version: from files
      decoders={"image": KeepEncoded()},
  )  # decoding the corrupt image would raise here
  bound = (
      MAPPINGS["image_caption"]
      .bind(src.dataset_info.features, "coco")
      .with_sampling(Sampling(2, None, None, "<video>"))
  )
  good = next(src[i] for i in range(len(src)) if src[i]["image/id"] != 1005)
  first, second = (bound(good, i, 0) for i in (0, 1))
  assert first.messages[1]["content"] != second.messages[1]["content"]
  assert first.frames.shape == (1, 40, 52, 3) and first.id.startswith("100")
  assert (batch["num_frames"] % 2 == 0).all() and batch["num_frames"].max() == 2
  it.close()

  result = train(cfg, str(tmp_path / "run"), iterator=_grain(cfg))
  assert result.status == "done" and all(np.isfinite(h["loss"]) for h in result.history)
  assert result.summary["data"]["data/skipped/bad_video"] > 0  # the corrupt image, counted, not fatal


def test_ucf101_shaped_dataset_trains_stage2_through_its_mapping(env, tmp_path):
  examples = [{"video": _clip(i, 20 + 5 * i), "label": i % len(UCF_LABELS)} for i in range(4)]
  data_dir = _write(Ucf101, tmp_path / "ucf", {"train": examples, "test": examples[:1]})
  cfg = _stage_config("stage2_video_pretrain", env, "tfds:ucf101/ucf101_1_256:train", data_dir)
  assert cfg.data.num_frames == 8

  from kangaroo_jax.data.tfds_mappings import MAPPINGS, Sampling

  src = tfds.data_source("ucf101/ucf101_1_256:2.0.0", data_dir=data_dir, split="train")
  bound = (
      MAPPINGS["video_classification"]
      .bind(src.dataset_info.features, "ucf")
      .with_sampling(Sampling(8, None, None, "<video>"))
  )
  ex = src[0]
  sample = bound(ex, 0, 0)
  assert sample.frames.shape == (8, 32, 32, 3)
  n = len(ex["video"])  # uniform segments over the clip, timestamps at the catalog's 25 fps
  assert np.allclose(sample.timestamps, np.floor((np.arange(8) + 0.5) * n / 8) / 25.0)
  assert sample.messages[1]["content"] == label_words(UCF_LABELS[ex["label"]])
  assert [label_words(x) for x in UCF_LABELS] == ["apply eye makeup", "baby crawling", "horse riding", "yo yo"]

  result = train(cfg, str(tmp_path / "run"))
  assert result.status == "done" and all(np.isfinite(h["loss"]) for h in result.history)
  assert result.summary["data"]["data/skipped_total"] == 0


def test_webvid_shaped_dataset_maps_to_video_captions(env, tmp_path):
  from kangaroo_jax.tokenizer import load_tokenizer
  from kangaroo_jax.config import tiny

  data_dir = _write(
      Webvid,
      tmp_path / "webvid",
      {
          "train": [
              {"video": _clip(i, 12), "id": f"w{i}", "caption": "A red ball rolls across the table.", "url": ""}
              for i in range(4)
          ]
      },
  )
  cfg = DataConfig(
      dataset="tfds:webvid",
      tfds_data_dir=data_dir,
      seq_len=160,
      batch_size=2,
      frame_size=28,
      max_frames=4,
      num_frames=4,
      num_epochs=1,
      max_skip_rate=0.0,
  )
  it = make_train_iterator(cfg, tiny(), load_tokenizer(env[1]))
  batches = list(it)  # one 4-frame clip per row
  assert len(batches) == 2 and it.metrics()["data/seen"] == 4 and it.skipped == {}
  assert all((b["num_frames"] == 4).all() for b in batches)


def _misfit(tmp_path, cls, examples, features):
  """A copy of a tiny builder with other features, written to its own data_dir."""
  with tfds.core.registered.skip_registration():
    variant = type(cls.__name__, (cls,), {"FEATURES": staticmethod(features), "__module__": __name__})
  return _write(variant, tmp_path / cls.__name__, {"train": examples})


def test_mapping_misfits_name_the_dataset_split_and_feature(env, tmp_path, caplog):
  from kangaroo_jax.tokenizer import load_tokenizer
  from kangaroo_jax.config import tiny

  tok = load_tokenizer(env[1])
  f = tfds.features

  def open_(data, data_dir, **kw):
    cfg = DataConfig(dataset=data, tfds_data_dir=data_dir, seq_len=160, batch_size=2, frame_size=28, **kw)
    with pytest.raises(DataConfigError) as e:
      make_train_iterator(cfg, tiny(), tok)
    assert "\n" not in str(e.value)
    return e

  # A missing feature: coco without captions.
  no_captions = _misfit(
      tmp_path / "a",
      CocoCaptions,
      [{"image": _jpeg(index_frame(0, 8, 8)), "image/id": 1}],
      lambda: {"image": f.Image(encoding_format="jpeg"), "image/id": np.int64},
  )
  e = open_("tfds:coco_captions:train", no_captions)
  assert e.type is MappingError
  assert "tfds:coco_captions/2014/1.1.0 split 'train'" in str(e.value) and "'captions/text' is missing" in str(e.value)
  # A wrong dtype: float32 images.
  floats = _misfit(
      tmp_path / "b",
      CocoCaptions,
      [{"image": np.zeros((4, 4, 3), np.float32), "captions": {"text": ["a"]}}],
      lambda: {"image": f.Tensor(shape=(4, 4, 3), dtype=np.float32), "captions": f.Sequence({"text": np.str_})},
  )
  e = open_("tfds:coco_captions/2014:train", floats)
  assert "feature 'image' is Tensor(shape=(4, 4, 3), dtype=float32)" in str(e.value)
  assert "uint8" in str(e.value)
  # A wrong kind: a text label where ucf101 has a ClassLabel.
  text_label = _misfit(
      tmp_path / "c",
      Ucf101,
      [{"video": _clip(0, 4), "label": "YoYo"}],
      lambda: {"video": f.Sequence(f.Image(shape=(32, 32, 3))), "label": f.Text()},
  )
  e = open_("tfds:ucf101", text_label)
  assert "split 'train'" in str(e.value) and "feature 'label' is Text" in str(e.value) and "ClassLabel" in str(e.value)
  # No such split; no such dataset; a dataset without a declared mapping.
  assert "no split 'validation'; the dataset has train" in str(open_("tfds:ucf101:validation", text_label).value)
  assert "no prepared dataset 'nope'" in str(open_("tfds:nope", str(tmp_path)).value)
  with tfds.core.registered.skip_registration():
    clips = type("MyClips", (Webvid,), {"__module__": __name__})
  unmapped = _write(clips, tmp_path / "d", {"train": [{"video": _clip(0, 2), "id": "", "caption": "", "url": ""}]})
  e = open_("tfds:my_clips", unmapped)
  assert "no mapping is declared for dataset 'my_clips'" in str(e.value) and "DataConfig.tfds_mapping" in str(e.value)
  it = make_train_iterator(
      DataConfig(
          dataset="tfds:my_clips",
          tfds_data_dir=unmapped,
          tfds_mapping="video_caption",
          seq_len=160,
          batch_size=1,
          frame_size=28,
          num_epochs=1,
      ),
      tiny(),
      tok,
  )
  with caplog.at_level("WARNING", logger="kangaroo_jax.data"):
    assert list(it) == []  # mapped, then skipped: its caption is empty
  assert "tfds:my_clips/1.0.0 split 'train' record 0: feature 'caption' is empty" in caplog.text
  # The trainer's config names the field, in one line.
  with pytest.raises(ConfigError, match=r"^data\.dataset='tfds:' ?: expected tfds:NAME"):
    _grain_config(env, "tfds:", tmp_path)
  with pytest.raises(ConfigError, match=r"^data\.tfds_mapping: got 'x'"):
    _grain_config(env, "tfds:ucf101", tmp_path, **{"data.tfds_mapping": "x"})
  cfg = _grain_config(env, "tfds:ucf101", text_label)
  with pytest.raises(ConfigError, match=r"^data\.dataset: tfds:ucf101/ucf101_1_256/2\.0\.0 split 'train': feature"):
    _grain(cfg)
