"""Synthetic video QA: coloured shapes that move or appear one after another, written as MP4 with PyAV.

Four question types, each multiple choice (the prompt is exactly the one `kangaroo_jax.evaluate` asks):
  direction  where the shape moves (left/right/up/down): needs the order of the frames   chance 1/4
  color      the shape's colour                                                           chance 1/4
  shape      circle / square / triangle                                                   chance 1/3
  order      which of two shapes (other colour, other shape) appears first, named by its colour (both
             stay visible): needs the order of events                                     chance 1/2
The training reply is the chosen option's text, one word, followed by <|eot_id|>: the first supervised
token is the decision itself, so the loss cannot be driven down by copying the prompt, and no reply
needs two decisions to agree (an order reply "the red circle" came out as "the red square", naming
neither option). `extract_choice` reads the option text back at evaluation.
Answers are balanced: every answer value and every answer letter occurs equally often per question
type (up to one), and the options are shuffled.
Outputs: videos/*.mp4, a training manifest (kangaroo_jax.data.manifest format) and a held-out
benchmark JSON in MVBench shape ({task: [items]}) for `python -m kangaroo_jax.evaluate`; the held-out
videos come from another random stream (their own seed) than the training ones.
"""

from __future__ import annotations

import json
import os

import av
import numpy as np

from kangaroo_jax.inference.mcq import MCItem, format_prompt

COLORS = {"red": (240, 30, 30), "green": (30, 220, 50), "blue": (40, 80, 255), "yellow": (250, 230, 30)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TYPES = ("direction", "color", "shape", "order")
# The demo's clips: 84 px square (a 6x6 grid of 14 px ViT patches), 8 frames. `make demo`, its config
# (configs/demo.py) and the probes read these.
FRAME_SIZE, FRAMES = 84, 8
CHANCE = {"direction": 1 / 4, "color": 1 / 4, "shape": 1 / 3, "order": 1 / 2}
# The CLIP mean colour: it normalises to 0, so the (random-init) ViT sees nothing but the shapes. On a dark
# background every background patch embeds to the same large vector and the shapes were a ~1% perturbation
# of it, too small for the model to learn from in a few hundred steps.
BACKGROUND = (123, 117, 104)
# Direction (the question the demo is about) and shape (the slowest to learn) get the largest shares; colour
# and order (one-word colour answers) are learnt from fewer clips (benchmarks/demo_probe.py numbers: README).
TYPE_WEIGHTS = {"direction": 0.35, "color": 0.15, "shape": 0.35, "order": 0.15}
# A moving shape's radius, as a fraction of the frame size: 3-3.4 ViT patches across at 84 px. With (0.2, 0.25)
# and a square of half-side 0.85 r, the demo ViT read by attention pooling told 112 px shapes apart in 75.3% of
# held-out frames after 150 steps; with these sizes and the outlines below, 97.2% (benchmarks/demo_vit_pooling.py).
RADIUS = (0.24, 0.28)
# An order clip's two shapes, smaller: centred 0.42-0.5 of the frame apart, they never overlap.
ORDER_RADIUS = (0.17, 0.2)


def _mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
  """The shape's pixels: the circle of radius r, and the square and (apex up) triangle of the same 2r width and
  height, so the three differ at the corners by whole ViT patches."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  dx, dy = xx - cx, yy - cy
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return (np.abs(dx) <= r) & (np.abs(dy) <= r)
  return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.5)  # triangle, apex up


def trajectory(kind: dict, frames: int) -> np.ndarray:
  """[frames, 2] centre (x, y) in pixels of a "move" clip: linear from `start` to `end`."""
  a = np.linspace(0.0, 1.0, frames)[:, None]
  return np.asarray(kind["start"]) * (1 - a) + np.asarray(kind["end"]) * a


def render(kind: dict, frames: int) -> np.ndarray:
  """uint8 [frames, size, size, 3] on a plain background."""
  size = kind["size"]
  out = np.empty((frames, size, size, 3), np.uint8)
  out[...] = BACKGROUND
  if kind["type"] == "order":
    for obj in (kind["first"], kind["second"]):
      m = _mask(obj["shape"], size, *obj["center"], obj["radius"])
      out[obj["appears"] :, m] = COLORS[obj["color"]]
    return out
  for t, (cx, cy) in enumerate(trajectory(kind, frames)):
    out[t][_mask(kind["shape"], size, cx, cy, kind["radius"])] = COLORS[kind["color"]]
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


class _Balanced:
  """Draws from range(n) so that each value occurs equally often (up to one) over any prefix of n*k draws."""

  def __init__(self, n: int, rng):
    self.n, self.rng, self.queue = n, rng, []

  def __call__(self) -> int:
    if not self.queue:
      self.queue = list(self.rng.permutation(self.n))
    return int(self.queue.pop())


def _move(rng, size: int, direction: str, shape: str, color: str) -> dict:
  r = size * rng.uniform(*RADIUS)
  # The shape crosses at least ~40% of the frame, so the motion spans several ViT patches per frame pair.
  near, far = rng.uniform(r + 1, 0.3 * size), size - rng.uniform(r + 1, 0.3 * size)
  side = rng.uniform(r + 1, size - r - 1)
  dx, dy = DIRECTIONS[direction]
  a, b = (near, far) if dx + dy > 0 else (far, near)
  start, end = ((a, side), (b, side)) if dx else ((side, a), (side, b))
  return {
      "type": "move",
      "size": size,
      "shape": shape,
      "color": color,
      "direction": direction,
      "radius": float(r),
      "start": [float(v) for v in start],
      "end": [float(v) for v in end],
  }


def _order(rng, size: int, frames: int, first_color: str) -> dict:
  # Different colour and shape; both stay once they appear, so the last frames alone cannot tell which came
  # first.
  colors = [first_color, str(rng.choice([c for c in COLORS if c != first_color]))]
  shapes = rng.permutation(list(SHAPES))[:2]
  r = size * rng.uniform(*ORDER_RADIUS)
  xs = [size * 0.27, size * 0.73]
  if rng.random() < 0.5:
    xs.reverse()
  t1 = int(rng.integers(0, frames // 4 + 1))
  t2 = int(rng.integers(t1 + 2, frames - 1))
  objs = []
  for i, t in enumerate((t1, t2)):
    cy = rng.uniform(r + 1, size - r - 1)
    objs.append(
        {
            "shape": str(shapes[i]),
            "color": str(colors[i]),
            "radius": float(r),
            "center": [float(xs[i] + rng.uniform(-0.02, 0.02) * size), float(cy)],
            "appears": t,
        }
    )
  return {"type": "order", "size": size, "first": objs[0], "second": objs[1]}


def sample(n: int, *, seed: int, size: int = FRAME_SIZE, frames: int = FRAMES) -> list[dict]:
  """n clips with their question: [{"kind": render spec, "task", "question", "options", "answer": index}]."""
  rng = np.random.default_rng(seed)
  counts = {t: int(round(w * n)) for t, w in TYPE_WEIGHTS.items()}
  counts["direction"] += n - sum(counts.values())
  tasks = [t for t, c in counts.items() for _ in range(c)]
  tasks = [tasks[i] for i in rng.permutation(n)]
  n_opts = {"direction": len(DIRECTIONS), "color": len(COLORS), "shape": len(SHAPES), "order": 2}
  n_values = dict(n_opts, order=len(COLORS))  # order's answer: the colour that appears first
  value = {t: _Balanced(k, rng) for t, k in n_values.items()}  # which answer (e.g. "left")
  letter = {t: _Balanced(k, rng) for t, k in n_opts.items()}  # where it sits among the options
  out = []
  for task in tasks:
    v, pos = value[task](), letter[task]()
    if task == "order":
      kind = _order(rng, size, frames, list(COLORS)[v])
      pair = [kind["first"]["color"], kind["second"]["color"]]
      answer_text, options, question = pair[0], pair, "Which colour appears first?"
    else:
      shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
      direction = str(rng.choice(list(DIRECTIONS)))
      if task == "direction":
        direction = list(DIRECTIONS)[v]
        options, question = list(DIRECTIONS), f"In which direction does the {shape} move?"
      elif task == "color":
        color = list(COLORS)[v]
        options, question = list(COLORS), f"What colour is the {shape}?"
      else:
        shape = SHAPES[v]
        options, question = list(SHAPES), "What shape is moving?"
      kind = _move(rng, size, direction, shape, color)
      answer_text = options[v]
    rest = [o for o in options if o != answer_text]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    options = rest[:pos] + [answer_text] + rest[pos:]
    out.append({"kind": kind, "task": task, "question": question, "options": options, "answer": pos})
  return out


def generate(
    out_dir: str, *, num_train: int, num_test: int, size: int = FRAME_SIZE, frames: int = FRAMES, seed: int = 0
) -> dict:
  """Writes the dataset; returns paths {"manifest", "benchmark", "train_benchmark", "videos", "texts"}.

  train_benchmark: the first `num_test` training clips in benchmark form (train-set accuracy);
  texts: for the tokenizer.
  """
  videos = os.path.join(out_dir, "videos")
  os.makedirs(videos, exist_ok=True)
  train = sample(num_train, seed=seed, size=size, frames=frames)
  test = sample(num_test, seed=seed + 1_000_003, size=size, frames=frames)  # another stream: held out
  manifest, bench, train_bench, texts = [], {}, {}, []
  for split, clips in (("train", train), ("test", test)):
    for i, c in enumerate(clips):
      name = f"{split}_{i:05d}.mp4"
      write_mp4(os.path.join(videos, name), render(c["kind"], frames))
      item = MCItem(
          id=f"{split}-{i}",
          task=c["task"],
          video=name,
          question=c["question"],
          options=tuple(c["options"]),
          answer=c["answer"],
      )
      prompt, reply = format_prompt(item), c["options"][c["answer"]]
      texts += [prompt, reply]
      entry = {
          "question_id": item.id,
          "video": name,
          "question": item.question,
          "candidates": c["options"],
          "answer": reply,
      }
      if split == "train":
        manifest.append(
            {
                "id": item.id,
                "video": f"videos/{name}",
                "conversations": [
                    {"role": "user", "content": "<video>" + prompt},
                    {"role": "assistant", "content": reply},
                ],
            }
        )
        if i < num_test:
          train_bench.setdefault(c["task"], []).append(entry)
      else:
        bench.setdefault(c["task"], []).append(entry)
  paths = {
      "manifest": os.path.join(out_dir, "train.jsonl"),
      "benchmark": os.path.join(out_dir, "test.json"),
      "train_benchmark": os.path.join(out_dir, "train_subset.json"),
      "videos": videos,
  }
  with open(paths["manifest"], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in manifest)
  for key, b in (("benchmark", bench), ("train_benchmark", train_bench)):
    with open(paths[key], "w") as f:
      json.dump(b, f, indent=1)
  with open(os.path.join(out_dir, "specs.json"), "w") as f:  # render specs: for checking held-out overlap
    json.dump({"train": [c["kind"] for c in train], "test": [c["kind"] for c in test]}, f)
  paths["texts"] = texts
  return paths
