"""Does a `make demo` recipe learn every question type? A fast, in-memory stand-in for `python -m train.demo`.

The same clips (train/demo_data.py), prompt, reply, tokenizer kind, packing, config (configs/demo.py) and
trainer (train.loop.train, so the same LM loss over the reply tokens) as the demo; only the ArrayRecord
shards and the MP4 files are skipped (frames are rendered in memory; `--via-mp4` round-trips them through
the demo's encoder and decoder instead). After training, accuracy per question type on `--test` held-out
clips (another random stream) and as many training clips is the teacher-forced exact match of the reply:
the model's greedy next token equals the reply's at every reply position, i.e. greedy decoding writes the
reply exactly (stricter than the demo's evaluation, which accepts any text naming the option).
Prints one JSON line: {"arg", "seed", "steps", "weights", "radius", "test": {type: accuracy}, "train": {...},
"loss_curve": {step: mean loss of the 50 steps before}, "steps_per_s", ...}.

Run (one core each, two side by side):
  taskset -c 0 env XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python benchmarks/demo_probe.py --seed 1 \
    --steps 1000 --arg patchify=avg --keep
Seeds change the clips, the model init and the batch order together, as `python -m train.demo --seed`.

Numbers (2-core AMD EPYC VM, one core each, shared with other jobs; held-out exact match, 400 clips):
  recipe (1,000 steps, lr 2e-3 unless said; replies one word; radius 0.2-0.25)   dir   col  shape order
  avg patchify,    mix d.40 o.25 s.20 c.15, seed 0                               76.9  100  36.2  100
  same, lr 4e-3,                           seed 0                               37.5  100  37.5  97.0
  avg patchify,    mix d.40 o.15 s.30 c.15, seed 1                               40.0  76.7 40.0  93.3
  conv3d patchify, mix d.40 o.15 s.30 c.15, seed 1                               99.4  100  42.5  100
The parameter-free mean over a frame pair is the knife edge: direction at 77% or 40% by seed, 38% at a
higher lr; with conv3d (configs/demo.py) direction learns by step ~400 (loss 0.38 vs 0.52). Shape stays near
chance (1/3) in all of them. The old "the red circle" order replies came out naming neither option.

Shape, tried later (same VM, loaded by other jobs; one run each; the questions then did not name the shape,
a change since reverted with the rest):
  three questions per training clip (direction, colour and shape of every move clip; seq_len 288), seed 2,
    1,500 steps: direction 25.0, colour 100, shape 33.6, order 100 (the one-question demo: 61.4 direction)
  700 steps, seed 0: spatial_patch=2: direction 25.0, colour 48.3, shape 32.9, order 78.3;
    spatial_patch=1 (64 tokens per frame pair, seq_len 352): 46.4, 100, 31.4, 100
  shape questions only (--weights direction=0,color=0,shape=1,order=0), 700-step schedule, seed 0: the loss
    stayed at chance (0.548; ln 3 / 2 = 0.549 per reply token) through step 500 with vision_lr 1 and 3 alike
  the tower alone (benchmarks/demo_vit_pooling.py: the demo ViT, a linear head, 150 steps of 32 frames, seed 0):
    mean pooling 71.3%, learned attention pooling 75.3%, max pooling 100% (loss 0.002); after the demo's
    2x2 average merge (--merge): attention 72.8%, max 62.5%
The shape evidence sits in a few patches (corners, slanted edges): the tower finds it within 150 steps when
read by a maximum, and averaging (the 2x2 patchify merge, a near-uniform LLM attention) dilutes it; through the
2-layer LLM shape stays at chance within the demo's budget, whatever share of the clips asks it, while the
2x2 merge is in the way. Without it (spatial_patch=1, seq_len 352: 64 tokens per frame pair), 1,500 steps, one core
each (1.25 steps/s), the demo's question mix:
  seed 0: direction 100, colour 100, shape 64.3, order 98.3   (train: 100, 100, 67.4, 100)
  seed 2: direction 91.4, colour 100, shape 65.0, order 100   (train: 95.0, 100, 61.6, 100)
Direction is then robust and shape learnt (loss still falling at step 1,500), not yet at 80%; not the demo's
default yet: it needs the 3-seed `make demo` measurement, and its step cost (about 0.8 s on one core) may not
fit 1,500 steps into 10 minutes on 2 cores. Measured: the full demo with it (`train.demo` with the config's
spatial_patch=1,seq_len=352; seed 0, one run, quiet 2 cores): direction 82.9, colour 98.3, shape 59.3, order 96.7,
1,500 steps trained in 699 s (0.44 s a step), 767 s wall.

Then the shapes were redrawn (train/demo_data.py: radius 0.24-0.28 of the frame instead of 0.2-0.25, the square
and triangle the full 2r wide, order clips' shapes smaller so they never overlap): the tower alone with attention
pooling went from 75.3% to 97.2% (95.0% after the 2x2 merge; benchmarks/demo_vit_pooling.py, 150 steps, seed 0).
Through the whole model, 1,500 steps, one core each, one run each:
  spatial_patch=2 (the default), seed 2:                     direction 81.4, colour 100, shape 77.1, order 95.0
  spatial_patch=1, seq_len 352, seed 2:                      direction 97.1, colour 100, shape 80.7, order 100
  spatial_patch=1, seq_len 352, ViT width 64 / MLP 160, seed 2: 95.7, 100, 80.7, 100 (0.73 s a step vs 0.78)
                                                     seed 0: 59.3, 100, 67.9, 100
So the redrawn shapes lift shape from chance to 68-81% under either merge, and seed 2, the weakest direction seed of
the old recipe, reaches 81% direction at spatial_patch=2; whether a recipe clears every bar is still a matter of
seed (the narrower tower: direction 59% on seed 0).
The full demo (`train.demo`, MP4 round trip, the demo's lenient scoring) with the redrawn shapes at 1,800 steps,
seeds 0 / 1 side by side one core each, seed 2 alone on 2 quiet cores (direction, colour, shape, order):
  seed 0: 82.9, 100, 75.0, 96.7    seed 1: 84.3, 100, 87.9, 98.3 (every bar met)    seed 2: 38.6, 98.3, 62.9, 100
Seed 2 trained for 629 s (0.35 s a step), over the 10-minute budget, so the default stayed at 1,500 steps; and seed 2
shows direction is still a knife edge at spatial_patch=2 (81.4% in this probe, 38.6% through the MP4 files).
At 1,500 steps (seeds 0 / 1 side by side): seed 0 direction 25.0, shape 33.6 (never left chance), seed 1 75.0, 72.9.
The default now (configs/demo.py): 84 px frames, spatial_patch=1 (36 tokens per frame pair, seq_len 240), 1,500
steps; a step costs what the 112 px merged one did (0.55 s on one core), the ViT being most of it. Full demo,
seeds 0 / 1 side by side one core each: direction 97.1 / 96.4, colour 100 / 100, shape 86.4 / 85.7, order
100 / 96.7 (every bar met; the loss leaves the plateau near steps 700-900); seed 2 alone on 2 cores: README.
Seed 2 stays on the plateau: 72.9 / 36.4 direction / shape at 1,500 steps (README), 40.0 / 45.0 at 1,800 (one core):
more steps do not get it off. A lower peak lr does (full `train.demo`, 1,500 steps, one core each, one run each;
direction / shape held out, colour 100 and order 96.7-100 in all):
  lr 1e-3:  seed 0 100 / 87.9, seed 1 100 / 92.9, seed 2 80.0 / 87.9, seed 3 100 / 92.1
  lr 7e-4 (the default now): seed 0 100 / 92.1, seed 1 100 / 98.6, seed 2 100 / 97.1, seed 3 100 / 92.9,
    seed 4 100 / 96.4
  lr 2e-3 with vision_lr=3 (the ViT and projector at 6e-3), seed 2: 77.1 / 70.0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

FPS = 4


class ArrayIterator:
  """Packed rows (dict of [n, ...] arrays) as shuffled batches, reshuffled each epoch; resumable by step."""

  def __init__(self, rows: dict, batch: int, seed: int):
    self.rows, self.batch, self.seed, self.step = rows, batch, seed, 0
    self.n = len(rows["input_ids"])

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    per_epoch = self.n // self.batch
    epoch, k = divmod(self.step, per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    idx = order[k * self.batch : (k + 1) * self.batch]
    self.step += 1
    return {key: v[idx] for key, v in self.rows.items()}


def _frames(clips: list[dict], frames: int, via_mp4: bool, tmp: str) -> list[np.ndarray]:
  from train import demo_data

  out = []
  for i, c in enumerate(clips):
    f = demo_data.render(c["kind"], frames)
    if via_mp4:
      from kangaroo_jax.data.video import load_video

      path = os.path.join(tmp, f"clip_{i}.mp4")
      demo_data.write_mp4(path, f)
      f = load_video(path, num_frames=frames).frames
      os.remove(path)
    out.append(f)
  return out


def build_rows(clips, frames_list, prepare, cfg) -> dict:
  """Clips -> packed rows (one sample per row, as the demo's packer gives at 8 frames per row)."""
  from kangaroo_jax.data.packing import make_row
  from kangaroo_jax.inference.mcq import MCItem, format_prompt

  rows = []
  ts = np.arange(cfg.data.max_frames, dtype=np.float32) / FPS
  for c, f in zip(clips, frames_list):
    item = MCItem(
        id="x", task=c["task"], video="x", question=c["question"], options=tuple(c["options"]), answer=c["answer"]
    )
    messages = [
        {"role": "user", "content": "<video>" + format_prompt(item)},
        {"role": "assistant", "content": c["options"][c["answer"]]},
    ]
    s = prepare.finish("probe", messages, f, ts[: len(f)])
    if "skip" in s:
      raise SystemExit(f"probe sample skipped (reason {int(s['skip'])}): raise seq_len in configs/demo.py")
    rows.append(make_row([s], cfg.data.seq_len, cfg.data.max_frames, (cfg.data.frame_size, cfg.data.frame_size)))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def exact_match(model, rows: dict, batch: int = 50) -> np.ndarray:
  """bool [n]: greedy next-token prediction equals the target at every loss position of the row."""
  import jax.numpy as jnp
  from flax import nnx

  from kangaroo_jax.data.video import normalize_frames

  @nnx.jit
  def predict(m, ids, frames, ts, pos, seg):
    # uint8 frames, normalised as the train step does (train/program.py)
    return m(ids, normalize_frames(frames), ts, positions=pos, segment_ids=seg).argmax(-1)

  out = []
  for i in range(0, len(rows["input_ids"]), batch):
    sl = {k: v[i : i + batch] for k, v in rows.items()}
    pred = np.asarray(
        predict(model, *(jnp.asarray(sl[k]) for k in ("input_ids", "frames", "timestamps", "positions", "segment_ids")))
    )
    mask = sl["loss_mask"] > 0
    out.append(((pred == sl["targets"]) | ~mask).all(-1))
  return np.concatenate(out)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python benchmarks/demo_probe.py", description=__doc__.split("\n\n")[0])
  ap.add_argument("--seed", type=int, default=0, help="clips, model init and batch order (default 0)")
  ap.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
  ap.add_argument("--arg", default="", help="extra configs/demo.py arg, e.g. lr=3e-3,batch=16 (default none)")
  ap.add_argument("--train", type=int, default=3000, help="training clips (default 3000, as the demo)")
  ap.add_argument("--test", type=int, default=400, help="held-out clips (default 400, as the demo)")
  ap.add_argument(
      "--weights",
      default="",
      help="question mix, e.g. direction=0.4,order=0.2,shape=0.25,color=0.15 "
      "(default: train/demo_data.py TYPE_WEIGHTS)",
  )
  ap.add_argument(
      "--radius",
      default="",
      help="the moving shape's radius range as frame fractions, e.g. 0.2,0.25 (default: train/demo_data.py RADIUS; "
      "order clips keep ORDER_RADIUS)",
  )
  ap.add_argument("--eval-only", default="", help="a kept probe folder (--keep): evaluate its export, no training")
  ap.add_argument("--keep", action="store_true", help="keep the probe folder (tokenizer, export); it is printed")
  ap.add_argument("--via-mp4", action="store_true", help="round-trip frames through MP4 like the demo's files")
  args = ap.parse_args(argv)

  from configs.demo import get_config
  from kangaroo_jax.data import build_chat_sentencepiece
  from kangaroo_jax.data.config import DataConfig
  from kangaroo_jax.data.pipeline import PrepareSample
  from kangaroo_jax.inference.mcq import MCItem, format_prompt
  from kangaroo_jax.tokenizer import load_tokenizer
  from train import demo_data
  from train.config import from_configdict
  from train.loop import train

  if args.weights:
    demo_data.TYPE_WEIGHTS = {k: float(v) for k, v in (kv.split("=") for kv in args.weights.split(","))}
  if args.radius:
    demo_data.RADIUS = tuple(float(v) for v in args.radius.split(","))
  t0 = time.perf_counter()
  tmp = args.eval_only or tempfile.mkdtemp(prefix="demo_probe_")
  base_cfg = get_config(",".join(filter(None, [f"steps={args.steps}", f"seed={args.seed}", args.arg])))
  size, frames = base_cfg.data.frame_size, base_cfg.data.max_frames
  train_clips = demo_data.sample(args.train, seed=args.seed, size=size, frames=frames)
  test_clips = demo_data.sample(args.test, seed=args.seed + 1_000_003, size=size, frames=frames)
  texts = []
  for c in train_clips + test_clips:
    item = MCItem(
        id="x", task=c["task"], video="x", question=c["question"], options=tuple(c["options"]), answer=c["answer"]
    )
    texts += [format_prompt(item), c["options"][c["answer"]]]
  tok_dir = os.path.join(tmp, "tokenizer")
  if not args.eval_only:
    build_chat_sentencepiece(texts + ["<video><vi_start><vi_end><eof><eov>"], tok_dir, vocab_size=512)
  base_cfg.data.update(source="synthetic", tokenizer=tok_dir)  # the rows come from here, not from shards
  cfg = from_configdict(base_cfg)
  dcfg = DataConfig(
      dataset=tmp,
      seq_len=cfg.data.seq_len,
      batch_size=cfg.data.batch_size,
      frame_size=(size, size),
      max_frames=frames,
      num_frames=frames,
  )
  prepare = PrepareSample(dcfg, cfg.model, load_tokenizer(tok_dir))
  train_rows = build_rows(train_clips, _frames(train_clips, frames, args.via_mp4, tmp), prepare, cfg)
  test_rows = build_rows(test_clips, _frames(test_clips, frames, args.via_mp4, tmp), prepare, cfg)
  t_data = time.perf_counter() - t0

  t1 = time.perf_counter()
  history = []
  if not args.eval_only:
    result = train(cfg, os.path.join(tmp, "run"), iterator=ArrayIterator(train_rows, cfg.data.batch_size, args.seed))
    history = result.history
  t_train = time.perf_counter() - t1

  from kangaroo_jax import from_pretrained

  model, _ = from_pretrained(os.path.join(tmp, "run", "export"))
  n_sub = min(args.test, args.train)
  report = {}
  for split, rows, clips in (
      ("test", test_rows, test_clips),
      ("train", {k: v[:n_sub] for k, v in train_rows.items()}, train_clips[:n_sub]),
  ):
    ok = exact_match(model, rows)
    tasks = np.array([c["task"] for c in clips])
    report[split] = {t: round(float(ok[tasks == t].mean()), 3) for t in demo_data.TYPES if (tasks == t).any()}
  hist = history
  losses = [h["loss"] for h in hist]
  curve = {str(s): round(float(np.mean(losses[max(0, s - 50) : s])), 3) for s in range(100, len(losses) + 1, 100)}
  print(
      json.dumps(
          dict(
              benchmark="demo_probe",
              arg=args.arg,
              seed=args.seed,
              steps=args.steps,
              weights=demo_data.TYPE_WEIGHTS,
              radius=demo_data.RADIUS,
              via_mp4=args.via_mp4,
              test=report["test"],
              train=report["train"],
              loss_curve=curve,
              steps_per_s=round((len(hist) - 1) / max(t_train, 1e-9), 2),
              data_s=round(t_data),
              train_s=round(t_train),
              xla_flags=os.environ.get("XLA_FLAGS", ""),
          )
      ),
      flush=True,
  )
  if args.keep or args.eval_only:
    print(f"kept: {tmp}", flush=True)
  else:
    shutil.rmtree(tmp, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
