"""tools.build_dataset never damages what is already there, no single row ends a build, and unreadable
shards reach the trainer's pipeline as one clear line (issue 14, items 3, 4 and 8)."""

import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

from data_helpers import frame_index_of, index_frame, tiny_tokenizer, write_records, write_video
from kangaroo_jax.config import tiny
from kangaroo_jax.data.config import DataConfig
from kangaroo_jax.data.pipeline import ShardError, make_train_iterator, readable_shards
from kangaroo_jax.data.video import ClipRangeError, load_video
from tools.build_dataset import BuildOptions, SkipRateExceeded, build, skip_rate_verdict
from tools.build_dataset.staging import OutputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONV = [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "A ball."}]
REF = BuildOptions(reference=True)  # rows store the video path: builds without decoding, in milliseconds


@pytest.fixture(scope="module")
def video(tmp_path_factory):
  return write_video(str(tmp_path_factory.mktemp("v") / "clip.mp4"), 30, fps=10, h=32, w=48)  # 3 s


def _row(i, video, **extra):
  return json.dumps({"id": f"r{i}", "video": video, "conversations": CONV, **extra})


def _manifest(path, video, good: int, missing: int = 0) -> str:
  rows = [_row(i, video) for i in range(good)] + [_row(good + i, video + ".gone") for i in range(missing)]
  path.write_text("\n".join(rows) + "\n")
  return str(path)


def _count(shard: str) -> int:
  r = ArrayRecordReader(shard)
  try:
    return r.num_records()
  finally:
    r.close()


def _cli(*args, extra_code: str = ""):
  """Runs the CLI in a fresh process; `extra_code` runs first (to inject a fault into the module)."""
  code = f"import sys, tools.build_dataset as b\n{extra_code}\nsys.exit(b.main({list(args)!r}))"
  return subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO),
  )


def _summary(folder) -> dict:
  with open(os.path.join(folder, "summary.json")) as f:
    return json.load(f)


def _leftovers(out) -> list[str]:
  parent, base = os.path.split(str(out))
  return sorted(n for n in os.listdir(parent) if n.startswith(f".{base}."))


# ---- item 3: the output folder -------------------------------------------------------------------------------


def test_interrupted_rebuild_keeps_the_previous_dataset_and_the_next_run_cleans_up(
    tmp_path, video, monkeypatch, caplog
):
  """Was: the rebuild rewrote the shard in place, so after the failure it held 1 record while the old
  summary.json still said 20."""
  import tools.build_dataset as b

  out = tmp_path / "ds"
  build(_manifest(tmp_path / "m20.jsonl", video, 20), str(out), REF, progress=False)
  shard = str(out / "data-00000-of-00001.array_record")
  before = open(shard, "rb").read()
  real, calls = b._convert, []

  def interrupted_after_one(args):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(args)

  monkeypatch.setattr(b, "_convert", interrupted_after_one)
  with pytest.raises(KeyboardInterrupt):
    build(_manifest(tmp_path / "m5.jsonl", video, 5), str(out), REF, progress=False, overwrite=True)
  assert open(shard, "rb").read() == before and _count(shard) == 20 and _summary(out)["written"] == 20
  [left] = _leftovers(out)
  assert _summary(tmp_path / left)["status"] == "interrupted" and os.listdir(tmp_path / left) == ["summary.json"]
  monkeypatch.setattr(b, "_convert", real)
  with caplog.at_level(logging.WARNING, "build_dataset"):
    s = build(str(tmp_path / "m5.jsonl"), str(out), REF, progress=False, overwrite=True)
  assert s["written"] == 5 and _count(shard) == 5 and _summary(out)["status"] == "complete"
  assert _leftovers(out) == [] and f"removed the leftover folder {os.path.realpath(tmp_path / left)}" in caplog.text


def test_a_killed_build_leaves_the_old_dataset_intact(tmp_path, video):
  """A real crash (no finally blocks run): the old dataset is untouched, the next run removes the leftover."""
  out = tmp_path / "ds"
  build(_manifest(tmp_path / "m20.jsonl", video, 20), str(out), REF, progress=False)
  kill = (
      "real = b._convert\nn = []\ndef crash(a):\n  n.append(1)\n  if len(n) == 3:\n    import os; os._exit(9)\n"
      "  return real(a)\nb._convert = crash"
  )
  r = _cli(_manifest(tmp_path / "m5.jsonl", video, 5), str(out), "--reference", "--overwrite", extra_code=kill)
  assert r.returncode == 9
  assert _count(str(out / "data-00000-of-00001.array_record")) == 20 and _summary(out)["written"] == 20
  [left] = _leftovers(out)
  assert _summary(tmp_path / left)["status"] == "building"
  r = _cli(str(tmp_path / "m5.jsonl"), str(out), "--reference", "--overwrite")
  assert r.returncode == 0, r.stderr
  assert "removed the leftover folder" in r.stderr and _leftovers(out) == []
  assert _count(str(out / "data-00000-of-00001.array_record")) == 5


def test_rebuild_with_fewer_shards_leaves_no_stale_shard(tmp_path, video):
  """Was: data-00000..00001-of-00002 stayed beside the new data-00000-of-00001, and the trainer read all three."""
  out = tmp_path / "ds"
  build(_manifest(tmp_path / "m20.jsonl", video, 20), str(out), REF, num_shards=2, progress=False)
  build(_manifest(tmp_path / "m2.jsonl", video, 2), str(out), REF, num_shards=1, progress=False, overwrite=True)
  assert sorted(os.listdir(out)) == ["data-00000-of-00001.array_record", "summary.json"]
  files, bad = readable_shards(DataConfig(dataset=str(out)))
  assert sum(_count(f) for f in files) == 2 and bad == []


def test_the_pipeline_ignores_stale_shards_an_old_build_left(tmp_path, caplog):
  """A folder built before this fix: 2 stale shards beside the 1 its summary lists (22 records read, 2 written)."""
  out = tmp_path / "old"
  write_records(str(out), 20, shards=2)
  write_records(str(out), 2, shards=1)
  (out / "summary.json").write_text(
      json.dumps(
          {
              "manifest": "m",
              "rows": 2,
              "written": 2,
              "skipped": {},
              "shards": ["data-00000-of-00001.array_record"],
              "options": {},
          }
      )
  )
  with caplog.at_level(logging.WARNING, "kangaroo_jax.data"):
    files, _ = readable_shards(DataConfig(dataset=str(out)))
  assert [os.path.basename(f) for f in files] == ["data-00000-of-00001.array_record"]
  assert "data-00000-of-00002.array_record" in caplog.text and "does not list" in caplog.text


def test_a_folder_the_builder_did_not_write_is_refused_even_with_overwrite(tmp_path, video):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  m = _manifest(tmp_path / "m.jsonl", video, 2)
  for flags in ([], ["--overwrite"]):
    r = _cli(m, str(out), "--reference", *flags)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert str(out) in r.stderr and "not a dataset written by tools.build_dataset" in r.stderr
  assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
  assert _leftovers(out) == []


def test_a_previous_build_is_replaced_only_with_overwrite_and_only_if_all_its_files_are_ours(tmp_path, video):
  out = tmp_path / "ds"
  m = _manifest(tmp_path / "m.jsonl", video, 3)
  build(m, str(out), REF, progress=False)
  with pytest.raises(OutputError, match="holds a previous build.*--overwrite"):
    build(m, str(out), REF, progress=False)
  (out / "README.md").write_text("my notes")
  with pytest.raises(OutputError, match=r"files tools.build_dataset did not write \(README.md\)"):
    build(m, str(out), REF, progress=False, overwrite=True)
  assert (out / "README.md").read_text() == "my notes" and _count(str(out / "data-00000-of-00001.array_record")) == 3
  os.remove(out / "README.md")
  assert build(m, str(out), REF, progress=False, overwrite=True, num_shards=3)["written"] == 3
  assert sorted(os.listdir(out)) == [f"data-0000{i}-of-00003.array_record" for i in range(3)] + ["summary.json"]
  # An empty folder (e.g. made by the user in advance) is simply used.
  (tmp_path / "empty").mkdir()
  assert build(m, str(tmp_path / "empty"), REF, progress=False)["written"] == 3


def test_a_build_running_into_the_same_folder_is_not_disturbed(tmp_path, video):
  out = tmp_path / "ds"
  running = tmp_path / f".ds.building-{os.getppid()}"  # the pid of a live process (pytest's parent)
  running.mkdir()
  (running / "summary.json").write_text(
      json.dumps({"tool": "tools.build_dataset", "status": "building", "host": socket.gethostname(), "shards": []})
  )
  with pytest.raises(OutputError, match=f"another build into this folder is running \\(pid {os.getppid()}"):
    build(_manifest(tmp_path / "m.jsonl", video, 2), str(out), REF, progress=False)
  assert os.listdir(running) == ["summary.json"] and not out.exists()


# ---- item 4: no row ends the build -----------------------------------------------------------------------------


def _png_claiming(path, width: int, height: int) -> str:
  """A valid 4x4 PNG whose header (with a correct CRC) claims width x height pixels."""
  buf = io.BytesIO()
  Image.new("RGB", (4, 4)).save(buf, "PNG")
  data = bytearray(buf.getvalue())
  data[16:24] = struct.pack(">II", width, height)  # IHDR data follows the 8-byte signature and 8-byte chunk head
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  path.write_bytes(bytes(data))
  return str(path)


def test_rows_that_used_to_abort_the_build_are_skipped_with_a_reason(tmp_path, video):
  """Each of these rows used to end the build (exit 1, partial shards, no summary)."""
  bomb = _png_claiming(tmp_path / "bomb.png", 30000, 30000)
  rows = [
      _row(0, video),
      json.dumps({"id": "bomb", "image": bomb, "conversations": CONV}),
      '{"id": "sur-text", "video": "%s", "conversations": [{"role": "user", "content": "<video>\\ud800"}, '
      '{"role": "assistant", "content": "x"}]}' % video,
      '{"id": "\\ud800", "video": "%s", "conversations": %s}' % (video, json.dumps(CONV)),
      '{"id": "inf", "video": "%s", "start": Infinity, "conversations": %s}' % (video, json.dumps(CONV)),
      _row("huge", video, start=1e308),
      _row("late", video, start=5.0),  # the video is 3 s long
      "[" * 100_000 + "]" * 100_000,
  ]
  m = tmp_path / "m.jsonl"
  m.write_bytes("\n".join(rows).encode() + b'\n{"id": "latin-1 \xe9", "video": "v.mp4"}\n')  # not UTF-8
  out = tmp_path / "out"
  s = build(
      str(m), str(out), BuildOptions(size=28, num_frames=2, frame_format="raw"), max_skip_rate=1.0, progress=False
  )
  assert s["written"] == 1 and s["processed"] == s["rows"] == 9
  assert s["skipped"] == {"bad_video": 1, "malformed_row": 5, "start_past_end": 2}
  ex = s["skip_examples"]
  assert any("too large" in e and "bomb.png" in e for e in ex["bad_video"])
  assert sum("lone surrogate" in e for e in ex["malformed_row"]) == 2
  assert any("finite" in e for e in ex["malformed_row"]) and any("nested too deeply" in e for e in ex["malformed_row"])
  assert any("not UTF-8" in e for e in ex["malformed_row"])
  assert all("past the end of the video" in e for e in ex["start_past_end"])
  assert _summary(out)["skipped"] == s["skipped"] and _summary(out)["status"] == "complete"


def test_a_clip_starting_past_the_end_is_an_error_not_repeated_last_frames(video):
  with pytest.raises(ClipRangeError, match=r"clip\.mp4: clip start 5s is at or past the end .*= 3s"):
    load_video(video, num_frames=4, start=5.0)
  with pytest.raises(ClipRangeError):
    load_video(video, num_frames=4, start=1e308)
  v = load_video(video, num_frames=2, start=2.5, end=100.0)  # an end past the video is clamped
  assert list(v.indices) == [26, 28] and [frame_index_of(f) for f in v.frames] == [26, 28]


def test_skip_rate_stops_the_build_early_and_the_default_is_five_percent(tmp_path, video):
  """Was: --max-skip-rate defaulted to 1.0 and was only checked after every row was converted."""
  m = _manifest(tmp_path / "m.jsonl", video, 0, missing=300)
  out = tmp_path / "out"
  with pytest.raises(SkipRateExceeded, match=r"after 16 \(5.3% of all rows > --max-skip-rate 5.0%\)") as e:
    build(m, str(out), REF, progress=False)
  assert not out.exists() and "is unchanged" in str(e.value)
  [left] = _leftovers(out)
  s = _summary(tmp_path / left)
  assert s["status"] == "skip_rate_exceeded" and s["processed"] == 16 and s["skipped"] == {"missing_video": 16}
  assert str(tmp_path / left / "summary.json") in str(e.value)
  # The CLI's default is the trainer's 5%: 1 bad row of 10 stops it; one line on stderr, exit 1.
  r = _cli(_manifest(tmp_path / "m10.jsonl", video, 9, missing=1), str(tmp_path / "o"), "--reference")
  assert r.returncode == 1 and "--max-skip-rate 5.0%" in r.stderr and "summary.json" in r.stderr
  assert [ln for ln in r.stderr.splitlines() if ln.startswith("build_dataset: error")] == r.stderr.splitlines()[-1:]


def test_skip_rate_verdict_is_certain_or_clear():
  assert skip_rate_verdict(6, 10, 100, 0.05, 100) is not None  # 6 > 5% of all 100 rows: certain
  assert skip_rate_verdict(5, 10, 100, 0.05, 100) is None
  # After the minimum, only a rate over 5% by more than 3 standard errors (11.5% at 100 rows) stops early.
  assert skip_rate_verdict(11, 100, 10_000, 0.05, 100) is None
  assert "clearly above" in skip_rate_verdict(12, 100, 10_000, 0.05, 100)
  assert skip_rate_verdict(12, 99, 10_000, 0.05, 100) is None
  assert skip_rate_verdict(999, 1000, 1000, 1.0, 100) is None


def test_every_stop_writes_a_summary_with_its_reason(tmp_path, video, monkeypatch):
  from array_record.python import array_record_module

  class FullDisk:

    def __init__(self, *a):
      self.n = 0

    def write(self, rec):
      self.n += 1
      if self.n == 2:
        raise OSError(28, "No space left on device")

    def close(self):
      pass

  monkeypatch.setattr(array_record_module, "ArrayRecordWriter", FullDisk)
  out = tmp_path / "out"
  with pytest.raises(RuntimeError, match="No space left on device.*is unchanged; see .*summary.json"):
    build(_manifest(tmp_path / "m.jsonl", video, 5), str(out), REF, progress=False)
  [left] = _leftovers(out)
  s = _summary(tmp_path / left)
  assert s["status"] == "error" and "No space left" in s["reason"] and s["processed"] == 2
  monkeypatch.undo()
  done = build(str(tmp_path / "m.jsonl"), str(out), REF, progress=False)
  assert done["status"] == "complete" and "5 rows" in _summary(out)["reason"]


def _rotated_video(path, degrees, h=32, w=48, n=4) -> str:
  """A video whose display matrix rotates it `degrees` counter-clockwise; its coded frames carry a bright
  square at the top-left corner."""
  import av

  with av.open(path, "w") as out:
    s = out.add_stream("libx264", rate=10)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    if degrees is not None:
      s.set_display_rotation(degrees)
    frame = index_frame(0, h, w)
    frame[:8, :8] = 255
    for _ in range(n):
      for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        out.mux(p)
    for p in s.encode():
      out.mux(p)
  return path


@pytest.mark.parametrize(
    "degrees,shape,corner",
    [(None, (32, 48), (0, 0)), (90, (48, 32), (1, 0)), (-90, (48, 32), (0, 1)), (180, (32, 48), (1, 1))],
)
def test_rotated_videos_are_decoded_upright(tmp_path, degrees, shape, corner):
  """90 degrees counter-clockwise moves the coded top-left corner to the bottom-left, and so on."""
  v = load_video(_rotated_video(str(tmp_path / "r.mp4"), degrees), num_frames=2)
  assert v.frames.shape[1:3] == shape
  h, w = shape
  rows = slice(h - 8, h) if corner[0] else slice(0, 8)
  cols = slice(w - 8, w) if corner[1] else slice(0, 8)
  for f in v.frames:
    assert f[rows, cols].mean() > 200 and f.mean() < 150


def test_images_are_turned_upright_by_their_exif_orientation(tmp_path):
  img = np.zeros((20, 30, 3), np.uint8)
  img[:5, :5] = 255
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  Image.fromarray(img).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
  v = load_video(str(tmp_path / "o.jpg"))
  assert v.frames.shape == (2, 30, 20, 3)
  assert v.frames[0][:5, -5:].mean() > 200 and v.frames[0][:5, :5].mean() < 50  # top-left went to top-right


# ---- item 8: unreadable shards in the trainer's pipeline -------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _pipe_cfg(data, **kw):
  return DataConfig(
      dataset=data,
      seq_len=160,
      batch_size=1,
      frame_size=56,
      max_frames=8,
      packing_bins=1,
      num_epochs=1,
      shuffle=False,
      **kw,
  )


def test_truncated_and_empty_shards_are_skipped_counted_and_named(tmp_path, tok, caplog):
  """Was: `RuntimeError` with an empty message (truncated) or "ArrayRecord file should be at least 64KB big"."""
  d = tmp_path / "data"
  good = write_records(str(d), 6, shards=2)
  cut = open(good[1], "rb").read()
  (d / "data-00001-of-00002.array_record").write_bytes(cut[: len(cut) // 2])
  (d / "zero.array_record").write_bytes(b"")
  with caplog.at_level(logging.WARNING, "kangaroo_jax.data"):
    it = make_train_iterator(_pipe_cfg(str(d)), tiny(), tok)
    rows = list(it)
  assert sum(int(r["segment_ids"].max()) for r in rows) == 3  # the 3 records of the good shard
  assert len(it.bad_shards) == 2
  assert any("data-00001-of-00002.array_record: not a complete ArrayRecord file" in b for b in it.bad_shards)
  assert any("zero.array_record: empty file (0 bytes)" in b for b in it.bad_shards)
  assert "skipping shard" in caplog.text and "2 of 3 shard files skipped" in caplog.text


def test_a_dataset_of_only_bad_shards_fails_with_one_line_naming_them(tmp_path, tok):
  d = tmp_path / "bad"
  d.mkdir()
  (d / "a.array_record").write_bytes(b"")
  (d / "b.array_record").write_bytes(os.urandom(70_000))
  with pytest.raises(ShardError) as e:
    make_train_iterator(_pipe_cfg(str(d)), tiny(), tok)
  msg = str(e.value)
  assert "\n" not in msg and "none of its 2 shard file(s) can be read" in msg
  assert "a.array_record: empty file" in msg and "b.array_record: not a complete ArrayRecord file" in msg
