"""Training on the real Grain pipeline: ArrayRecord shards from tools.build_dataset over generated videos.

One dataset serves both tests: stored-frame records of good videos plus `--reference` records whose
videos are broken after the build (deleted, overwritten) or whose answer is longer than a row, so the
run meets skips of three reasons while it trains, checkpoints and resumes.
"""

import glob
import json
import os
import shutil
import struct

import numpy as np
import pytest

from tests.data_helpers import CHAT_TEXTS, write_video
from tests.train_helpers import BatchRecorder, tiny_config
from train.loop import train

SKIPPED = {"missing_video": 1, "bad_video": 1, "too_long": 1}  # records per epoch, by reason


def _row(i: int, video: str, answer: str) -> str:
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
def dataset(tmp_path_factory):
  from kangaroo_jax.data.tiny_tokenizer import build_chat_sentencepiece
  from tools.build_dataset import BuildOptions, build

  root = tmp_path_factory.mktemp("grain")
  videos = root / "videos"
  videos.mkdir()
  good = [write_video(str(videos / f"v{i}.mp4"), 6 + 2 * i, h=48, w=64) for i in range(5)]
  gone = write_video(str(videos / "gone.mp4"), 8)
  broken = write_video(str(videos / "broken.mp4"), 8)
  (root / "stored.jsonl").write_text(
      "\n".join(_row(i, v, " ".join(["A red ball rolls across the table."] * (i % 2 + 1))) for i, v in enumerate(good))
  )
  (root / "ref.jsonl").write_text(
      "\n".join(
          [
              _row(10, gone, "A red ball."),
              _row(11, broken, "A red ball."),
              _row(12, good[0], " ".join(["The quick brown fox jumps over the lazy dog."] * 30)),
          ]
      )
  )
  build(
      str(root / "stored.jsonl"),
      str(root / "ds" / "stored"),
      BuildOptions(size=56, num_frames=4),
      num_shards=2,
      progress=False,
  )
  build(str(root / "ref.jsonl"), str(root / "ds" / "ref"), BuildOptions(reference=True), progress=False)
  os.remove(gone)  # the video disappeared after the dataset was built ...
  with open(broken, "r+b") as f:  # ... and this one was damaged
    f.write(os.urandom(4096))
  tok = os.path.dirname(build_chat_sentencepiece(CHAT_TEXTS, str(root / "tok"), 400))
  return dict(data=str(root / "ds" / "*" / "*.array_record"), tokenizer=tok)


def _config(dataset, **changes):
  return tiny_config(
      **{
          "data.source": "grain",
          "data.dataset": dataset["data"],
          "data.tokenizer": dataset["tokenizer"],
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


def _tb_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Scalars from the TensorBoard event files (TFRecord framing: length, crc, payload, crc)."""
  from tensorboardX.proto import event_pb2

  out: dict = {}
  for path in glob.glob(os.path.join(workdir, "tb", "events.*")):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos : pos + 8])
      ev = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
      pos += 12 + n + 4
      for v in ev.summary.value:
        out.setdefault(v.tag, []).append((ev.step, v.simple_value))
  return out


def test_grain_training_reports_skips_and_resumes_exactly(dataset, tmp_path, capsys):
  cfg = _config(dataset)
  full_it = _grain(cfg)
  full = train(cfg, str(tmp_path / "full"), iterator=full_it)
  assert full.status == "done" and [h["step"] for h in full.history] == [1, 2, 3]
  assert all(np.isfinite(h["loss"]) for h in full.history)

  # Nothing is dropped silently: every sample read was either packed into a row or counted as skipped.
  data = full.summary["data"]
  packed = sum(len(np.unique(row[row > 0])) for b in full_it.batches for row in b["segment_ids"])
  assert data["data/seen"] == packed + data["data/skipped_total"]
  for reason in ("bad_record", "missing_video", "bad_video", "bad_conversation", "too_long", "too_many_frames"):
    got = data[f"data/skipped/{reason}"]
    assert (got > 0) if reason in SKIPPED else (got == 0), (reason, data)
  # The bad records come once per pass over the 8 records, so the three reasons are (almost) equally common.
  counts = [data[f"data/skipped/{r}"] for r in SKIPPED]
  assert max(counts) - min(counts) <= 1, data
  assert data == {k: v for k, v in _totals(full_it).items()}

  # ... and it says so: the console, TensorBoard and WORKDIR/summary.json.
  out = capsys.readouterr().out
  assert "step 3/3 | loss" in out and "samples skipped (bad_video" in out, out
  assert json.load(open(tmp_path / "full" / "summary.json"))["data"] == data
  tb = _tb_scalars(str(tmp_path / "full"))
  assert tb["data/skipped/too_long"][-1] == (3, data["data/skipped/too_long"])
  assert tb["data/seen"][-1] == (3, data["data/seen"])

  # Resume from the step-2 checkpoint (as if the job died after step 2): the same third batch and loss.
  shutil.copytree(tmp_path / "full", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")
  resumed_it = _grain(cfg)
  resumed = train(cfg, str(tmp_path / "resumed"), iterator=resumed_it)
  assert [h["step"] for h in resumed.history] == [3]
  assert resumed.history[0]["loss"] == full.history[2]["loss"]
  assert len(resumed_it.batches) == 1
  for k, v in full_it.batches[2].items():
    assert np.array_equal(resumed_it.batches[0][k], v), k
  assert resumed.summary["data"] == data  # the skip counters are part of the checkpointed iterator state


def _totals(it) -> dict:
  from train.metrics import data_totals

  return data_totals(it.metrics(), 0)
