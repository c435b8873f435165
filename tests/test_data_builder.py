"""tools.build_dataset: manifest -> ArrayRecord shards; bad rows are skipped and counted by reason."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from data_helpers import write_video
from kangaroo_jax.data.records import decode_frames, unpack_record
from kangaroo_jax.data.video import load_video, preprocess_frames
from tools.build_dataset import BuildOptions, build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONV = [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "A ball."}]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
  d = tmp_path_factory.mktemp("m")
  good = write_video(str(d / "good.mp4"), 30, fps=10)
  write_video(str(d / "good2.mp4"), 20, fps=10, h=32, w=96)
  data = open(good, "rb").read()
  (d / "truncated.mp4").write_bytes(data[: len(data) // 3])
  (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
  (d / "empty.mp4").write_bytes(b"")
  rows = [
      json.dumps({"id": "a", "video": "good.mp4", "conversations": CONV}),
      json.dumps(
          {
              "id": "b",
              "video": "good2.mp4",
              "start": 0.5,
              "end": 1.5,
              "conversations": [{"from": "human", "value": "<video>Hm?"}, {"from": "gpt", "value": "Yes."}],
          }
      ),
      json.dumps({"id": "c", "video": "missing.mp4", "conversations": CONV}),
      json.dumps({"id": "d", "video": "truncated.mp4", "conversations": CONV}),
      json.dumps({"id": "e", "video": "corrupt.mp4", "conversations": CONV}),
      json.dumps({"id": "f", "video": "empty.mp4", "conversations": CONV}),
      "{not json",
      json.dumps({"id": "h", "video": "good.mp4", "conversations": [{"role": "user", "content": "no answer"}]}),
      json.dumps({"id": "i", "video": "good.mp4", "image": "x.png", "conversations": CONV}),
      json.dumps({"id": "j", "video": "good.mp4", "start": 3, "end": 1, "conversations": CONV}),
  ]
  (d / "m.jsonl").write_text("\n".join(rows) + "\n")
  return d


def _read_all(paths):
  out = []
  for p in paths:
    r = ArrayRecordReader(p)
    out += [unpack_record(b) for b in r.read_all()]
    r.close()
  return out


def test_build_skips_and_counts_every_bad_kind(manifest, tmp_path):
  opt = BuildOptions(size=56, num_frames=4, frame_format="raw")
  s = build(str(manifest / "m.jsonl"), str(tmp_path / "out"), opt, num_shards=2, progress=False, max_skip_rate=1.0)
  assert s["rows"] == 10 and s["written"] == 2
  assert s["skipped"] == {"missing_video": 1, "bad_video": 3, "malformed_row": 4}
  assert json.load(open(tmp_path / "out" / "summary.json"))["skipped"] == s["skipped"]
  recs = sorted(_read_all([str(tmp_path / "out" / p) for p in s["shards"]]), key=lambda r: r["id"])
  assert [r["id"] for r in recs] == ["a", "b"]
  # The stored frames are exactly the released transform of the sampled frames.
  v = load_video(str(manifest / "good.mp4"), num_frames=4)
  np.testing.assert_array_equal(decode_frames(recs[0]["frames"]), preprocess_frames(v.frames, 56))
  np.testing.assert_allclose(recs[0]["timestamps"], v.timestamps)
  assert recs[1]["messages"][0] == {"role": "user", "content": "<video>Hm?"}
  assert all(0.5 <= t < 1.5 for t in recs[1]["timestamps"])


def test_cli_jpeg_progress_and_max_skip_rate(manifest, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  cmd = [
      sys.executable,
      "-m",
      "tools.build_dataset",
      str(manifest / "m.jsonl"),
      str(tmp_path / "o"),
      "--size",
      "56",
      "--fps",
      "4",
      "--max-frames",
      "6",
      "--shards",
      "1",
      "--max-skip-rate",
      "1",
  ]
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1])["written"] == 2
  assert "build_dataset" in r.stderr and "100%" in r.stderr  # tqdm progress bar
  recs = _read_all([str(tmp_path / "o" / "data-00000-of-00001.array_record")])
  frames = decode_frames(recs[0]["frames"])
  assert recs[0]["frames"]["format"] == "jpeg" and frames.shape == (6, 56, 56, 3)
  r = subprocess.run(cmd[:-1] + ["0.5", "--overwrite"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert r.returncode == 1 and "max-skip-rate" in r.stderr and "summary.json" in r.stderr
