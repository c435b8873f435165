"""Synthetic video QA: coloured shapes that move or appear one after another, written as MP4 with PyAV.

Four question types, each multiple choice (the prompt is exactly the one `kangaroo_jax.evaluate` asks):
  direction  where the shape moves (left/right/up/down): needs the order of the frames   chance 1/4
  color      the shape's colour                                                           chance 1/4
  shape      circle / square / triangle                                                   chance 1/3
  order      which of two shapes appears first: needs the order of events                 chance 1/2
Outputs: videos/*.mp4, a training manifest (kangaroo_jax.data.manifest format) and a held-out
benchmark JSON in MVBench shape ({task: [items]}) for `python -m kangaroo_jax.evaluate`.
"""

from __future__ import annotations

import json
import os

import av
import numpy as np

from kangaroo_jax.inference.mcq import LETTERS, MCItem, format_prompt

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
CHANCE = {"direction": 1 / 4, "color": 1 / 4, "shape": 1 / 3, "order": 1 / 2}


def _mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  dx, dy = xx - cx, yy - cy
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
  return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)  # triangle, apex up


def render(kind: dict, size: int, frames: int) -> np.ndarray:
  """uint8 [frames, size, size, 3] on a grey background."""
  out = np.full((frames, size, size, 3), 90, np.uint8)
  r = size * 0.17
  if kind["type"] == "order":
    for t in range(frames):
      first = t < frames // 2
      obj = kind["first"] if first else kind["second"]
      out[t][_mask(obj["shape"], size, size / 2, size / 2, r)] = COLORS[obj["color"]]
    return out
  dx, dy = DIRECTIONS[kind["direction"]]
  lo, hi = r + 1, size - r - 1
  for t in range(frames):
    a = t / (frames - 1)
    cx = size / 2 if dx == 0 else (lo + (hi - lo) * a if dx > 0 else hi - (hi - lo) * a)
    cy = size / 2 if dy == 0 else (lo + (hi - lo) * a if dy > 0 else hi - (hi - lo) * a)
    out[t][_mask(kind["shape"], size, cx, cy, r)] = COLORS[kind["color"]]
  return out


def write_mp4(path: str, frames: np.ndarray, fps: int = 4) -> None:
  with av.open(path, "w") as container:
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.options = {"qscale": "2"}
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _question(kind: dict, qtype: str, rng) -> tuple[str, list[str], int]:
  if qtype == "order":
    a, b = kind["first"], kind["second"]
    opts = [f"the {a['color']} {a['shape']}", f"the {b['color']} {b['shape']}"]
    perm = rng.permutation(2)
    return "Which shape appears first?", [opts[i] for i in perm], int(np.argmin(perm))
  if qtype == "direction":
    opts, answer, q = list(DIRECTIONS), kind["direction"], f"In which direction does the {kind['shape']} move?"
  elif qtype == "color":
    opts, answer, q = list(COLORS), kind["color"], f"What colour is the {kind['shape']}?"
  else:
    opts, answer, q = list(SHAPES), kind["shape"], "What shape is moving?"
  opts = [opts[i] for i in rng.permutation(len(opts))]
  return q, opts, opts.index(answer)


def _sample(rng) -> tuple[dict, str]:
  qtype = rng.choice(["direction", "direction", "color", "shape", "order"])  # direction is the hard one
  if qtype == "order":
    objs = []
    while len(objs) < 2:
      o = {"shape": str(rng.choice(SHAPES)), "color": str(rng.choice(list(COLORS)))}
      if not objs or o != objs[0]:
        objs.append(o)
    return {"type": "order", "first": objs[0], "second": objs[1]}, qtype
  return {"type": "move", "shape": str(rng.choice(SHAPES)), "color": str(rng.choice(list(COLORS))),
          "direction": str(rng.choice(list(DIRECTIONS)))}, qtype


def generate(out_dir: str, *, num_train: int, num_test: int, size: int = 56, frames: int = 8,
             seed: int = 0) -> dict:
  """Writes the dataset; returns paths {"manifest", "benchmark", "videos", "texts"} (texts: for the tokenizer)."""
  rng = np.random.default_rng(seed)
  videos = os.path.join(out_dir, "videos")
  os.makedirs(videos, exist_ok=True)
  manifest, bench, texts = [], {}, []
  for i in range(num_train + num_test):
    kind, qtype = _sample(rng)
    name = f"clip_{i:05d}.mp4"
    write_mp4(os.path.join(videos, name), render(kind, size, frames))
    question, options, answer = _question(kind, qtype, rng)
    item = MCItem(id=f"{qtype}/{i}", task=qtype, video=name, question=question, options=tuple(options),
                  answer=answer)
    prompt = format_prompt(item)
    reply = f"({LETTERS[answer]}) {options[answer]}"
    texts += [prompt, reply]
    if i < num_train:
      manifest.append({"id": f"train-{i}", "video": f"videos/{name}", "conversations": [
          {"role": "user", "content": "<video>" + prompt}, {"role": "assistant", "content": reply}]})
    else:
      bench.setdefault(qtype, []).append({"question_id": f"test-{i}", "video": name, "question": question,
                                          "candidates": options, "answer": options[answer]})
  paths = {"manifest": os.path.join(out_dir, "train.jsonl"), "benchmark": os.path.join(out_dir, "test.json"),
           "videos": videos}
  with open(paths["manifest"], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in manifest)
  with open(paths["benchmark"], "w") as f:
    json.dump(bench, f, indent=1)
  paths["texts"] = texts
  return paths
