"""load_video's sampled decoding returns exactly the frames of a front-to-back decode and of decord (the
release's decoder), for several GOP structures and sampling patterns; short and truncated videos are guarded."""

import numpy as np
import pytest

import kangaroo_jax.data.video as video
from kangaroo_jax.data.video import DecodedVideo, VideoError, load_video, sample_indices

H, W, FPS = 64, 96, 25

# libx264 option sets: name -> (frames, options). Textured, moving content, so B-frames and references matter.
GOPS = {
    "bframes_pyramid": (120, {"g": "24", "keyint_min": "24", "bf": "3", "b_strategy": "0", "sc_threshold": "0"}),
    "p_only": (90, {"g": "10", "keyint_min": "10", "bf": "0", "sc_threshold": "0"}),
    "open_gop": (120, {"g": "20", "keyint_min": "20", "bf": "3", "sc_threshold": "0", "x264-params": "open-gop=1"}),
    "one_long_gop": (150, {"g": "1000", "keyint_min": "1000", "bf": "2", "sc_threshold": "0"}),
    "intra_only": (40, {"g": "1", "bf": "0"}),
}


def _texture_frames(n: int):
  rng = np.random.default_rng(7)
  big = rng.integers(0, 256, (H + 40, W + 40, 3), dtype=np.uint8)
  for i in range(n):
    dy, dx = abs(i % 40 - 20), (2 * i) % 40
    yield np.ascontiguousarray(big[dy : dy + H, dx : dx + W])


def _write(path: str, n: int, options: dict, container_options: dict | None = None) -> str:
  import av

  with av.open(path, "w", options=container_options or {}) as out:
    s = out.add_stream("libx264", rate=FPS)
    s.width, s.height, s.pix_fmt = W, H, "yuv420p"
    s.options = {"crf": "23", **options}
    for rgb in _texture_frames(n):
      for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
        out.mux(p)
    for p in s.encode():
      out.mux(p)
  return path


def _front_to_back(path: str) -> np.ndarray:
  """Every decodable frame, no seeking, damaged packets skipped: uint8 [n, h, w, 3]."""
  import av

  frames = []
  with av.open(path) as c:
    s = c.streams.video[0]
    packets = c.demux(s)
    while True:
      try:
        packet = next(packets)
      except StopIteration:
        break
      except av.error.FFmpegError:
        break
      try:
        frames.extend(f.to_ndarray(format="rgb24") for f in s.codec_context.decode(packet if packet.size else None))
      except av.error.FFmpegError:
        continue
  return np.stack(frames)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  d = tmp_path_factory.mktemp("gops")
  return {
      name: (_write(str(d / f"{name}.mp4"), n, opts), _front_to_back(str(d / f"{name}.mp4")))
      for name, (n, opts) in GOPS.items()
  }


def _keyframes(path: str) -> list[int]:
  import av

  with av.open(path) as c:
    return [k for k, e in enumerate(c.streams.video[0].index_entries) if e.is_keyframe]


def test_clips_have_the_gop_structure_they_claim(clips):
  import av

  path, full = clips["bframes_pyramid"]
  assert _keyframes(path) == [0, 24, 48, 72, 96]
  with av.open(path) as c:  # B-frames: decode order differs from display order
    pts = [p.pts for p in c.demux(video=0) if p.size]
  assert pts != sorted(pts)
  assert len(_keyframes(clips["one_long_gop"][0])) == 1 and len(_keyframes(clips["intra_only"][0])) == 40
  assert not _leading_pictures(path) and len(_leading_pictures(clips["open_gop"][0])) >= 3
  import av

  with av.open(path) as c:  # the threads=3 runs below really split: three runs, the later two after a seek
    runs = video._split_targets(c.streams.video[0], list(range(1, 120, 2)), 3)
  assert [seek for seek, _ in runs] == [None, 47, 95] and sum(len(t) for _, t in runs) == 60
  assert full.shape == (120, H, W, 3)


def _leading_pictures(path: str) -> list[int]:
  """Frames shown before their GOP's keyframe (an open GOP's leading B-frames, which reference the previous
  GOP): display indices."""
  import av

  with av.open(path) as c:
    s = c.streams.video[0]
    step = int(round(1 / (FPS * float(s.time_base))))
    key_pts, leading = None, []
    for p in c.demux(s):
      if p.size and p.is_keyframe:
        key_pts = p.pts
      elif p.size and key_pts is not None and p.pts < key_pts:
        leading.append(p.pts // step)
  return sorted(leading)


def _patterns(path: str, n: int) -> dict[str, dict]:
  late_in_gop = sorted({min(k + 17, n - 1) for k in _keyframes(path)})  # one late target per GOP: seek-heavy
  patterns = {
      "uniform_6": dict(num_frames=6),
      "uniform_dense": dict(num_frames=min(n, 48) - 1),
      "every_frame": dict(),
      "odd_frames": dict(indices=list(range(1, n, 2))),
      "fps_clip": dict(fps=3.0, start=0.9, end=3.7),
      "late_in_gop": dict(indices=late_in_gop),
      "first_and_last": dict(indices=[0, n - 1]),
  }
  leading = _leading_pictures(path)
  if leading:  # only the leading pictures: the GOP before each is otherwise never needed
    patterns["leading_only"] = dict(indices=leading)
  return patterns


def _expected_indices(pattern: dict, n: int) -> np.ndarray:
  """The sampled frame indices, computed apart from the decoder (which reports the frames it returned)."""
  if "indices" in pattern:
    return np.asarray(pattern["indices"], np.int64)
  idx = sample_indices(
      n,
      float(FPS),
      num_frames=pattern.get("num_frames"),
      sample_fps=pattern.get("fps"),
      start=pattern.get("start"),
      end=pattern.get("end"),
  )
  return np.append(idx, idx[-1]) if len(idx) % 2 else idx


def _load(path, pattern, threads):
  if "indices" in pattern:  # a hand-made target list goes through the decoder directly
    import av

    idx = np.asarray(pattern["indices"], np.int64)
    with av.open(path) as c:
      frames, source = video._decode_indices(path, c, c.streams.video[0], idx, float(FPS), threads)
    return frames, source
  v = load_video(path, threads=threads, **pattern)
  assert v.num_unique == len(np.unique(v.indices))
  return v.frames, v.indices


@pytest.mark.parametrize("gop", list(GOPS))
def test_sampled_frames_equal_a_front_to_back_decode_and_decord(clips, gop):
  path, full = clips[gop]
  decord = pytest.importorskip("decord")
  for name, pattern in _patterns(path, len(full)).items():
    idx = _expected_indices(pattern, len(full))
    one_pass, idx_one = _load(path, pattern, threads=1)  # one forward pass, no seeks
    split, idx_split = _load(path, pattern, threads=3)  # runs of GOPs on three decoders, each after a seek
    np.testing.assert_array_equal(idx_one, idx)
    np.testing.assert_array_equal(idx_split, idx)
    assert np.array_equal(one_pass, full[idx]), (gop, name)
    assert np.array_equal(split, full[idx]), (gop, name)
    if gop != "open_gop":  # decord seeks into an open GOP without its references: corrupt frames, not a reference
      reader = decord.VideoReader(path, ctx=decord.cpu(0))
      assert np.array_equal(reader.get_batch([int(i) for i in idx]).asnumpy(), one_pass), (gop, name)


def test_only_the_needed_reference_chain_is_decoded(clips, monkeypatch):
  path, full = clips["bframes_pyramid"]
  sent = {"keep": 0, "drop": 0}
  real_send = video._SampledDecode._send

  def counting_send(self, packet, *, keep):
    sent["keep" if keep else "drop"] += 1
    return real_send(self, packet, keep=keep)

  monkeypatch.setattr(video._SampledDecode, "_send", counting_send)
  v = load_video(path, num_frames=2, threads=1)  # frames 30 and 90: GOPs 24-47 and 72-95 only
  np.testing.assert_array_equal(v.indices, [30, 90])
  np.testing.assert_array_equal(v.frames, full[[30, 90]])
  # Two targets need the packets from their keyframes up to them (about 7 + 19); the three GOPs without a
  # target, and everything after frame 90, are never sent.
  assert sent["keep"] == 2 and sent["drop"] < 30, sent


def test_a_video_shorter_than_the_request_repeats_frames_visibly(tmp_path):
  path = _write(str(tmp_path / "ten.mp4"), 10, {"g": "4", "bf": "2"})
  full = _front_to_back(path)
  v = load_video(path, num_frames=16)
  np.testing.assert_array_equal(v.indices, sample_indices(10, FPS, num_frames=16))
  assert v.frames.shape[0] == 16 and v.num_unique == 10
  np.testing.assert_array_equal(v.frames, full[v.indices])


def _faststart_clip(tmp_path) -> tuple[str, bytes]:
  """A 120-frame clip with its index (moov) before the data, as players stream them: cut short, it still opens
  and still reports 120 frames."""
  path = _write(str(tmp_path / "fast.mp4"), 120, GOPS["bframes_pyramid"][1], {"movflags": "faststart"})
  return path, open(path, "rb").read()


def test_a_truncated_file_returns_what_decodes_and_says_so(tmp_path):
  import av

  path, data = _faststart_clip(tmp_path)
  cut = tmp_path / "cut.mp4"
  cut.write_bytes(data[: int(len(data) * 0.55)])
  with av.open(str(cut)) as c:
    assert c.streams.video[0].frames == 120  # the header still claims every frame
  decodable = _front_to_back(str(cut))
  assert 20 < len(decodable) < 100
  for threads in (1, 3):
    v = load_video(str(cut), num_frames=8, threads=threads)
    assert v.frames.shape[0] == 8
    assert v.indices.max() == len(decodable) - 1  # the targets past the cut get the last decodable frame
    assert v.num_unique == len(np.unique(v.indices)) < 8
    np.testing.assert_array_equal(v.frames, decodable[v.indices])
    np.testing.assert_allclose(v.timestamps, v.indices / FPS, rtol=1e-6)


def test_a_file_cut_before_any_frame_is_a_video_error(tmp_path):
  path, data = _faststart_clip(tmp_path)
  with open(path, "rb") as f:
    import av

    with av.open(f) as c:
      first_data = min(e.pos for e in c.streams.video[0].index_entries)
  cut = tmp_path / "headeronly.mp4"
  cut.write_bytes(data[: first_data + 10])
  with pytest.raises(VideoError, match="no frame could be decoded") as e:
    load_video(str(cut), num_frames=4)
  assert str(cut) in str(e.value)


def test_num_unique_defaults_to_the_distinct_indices():
  frames = np.zeros((4, 2, 2, 3), np.uint8)
  v = DecodedVideo(frames, np.zeros(4, np.float32), 1.0, np.asarray([0, 3, 3, 3]))
  assert v.num_unique == 2
  assert DecodedVideo(frames, np.zeros(4, np.float32), 1.0, np.arange(4), num_unique=3).num_unique == 3


def test_threads_must_be_positive(clips):
  with pytest.raises(ValueError, match="threads"):
    load_video(clips["p_only"][0], num_frames=2, threads=0)
