"""Can the `make demo` model learn where a shape is / where it moves? A fast, in-memory probe.

Trains the demo-sized Kangaroo (configs/demo.py shapes, from scratch) on clips rendered in memory by
train/demo_data.py, with the LM loss on one answer token chosen among 4 (the direction's index), and
prints one JSON line every `--eval-every` steps with the mean training loss and accuracy on 300
held-out clips (another random stream). No tokenizer, no files: the prompt is BOS, the visual
placeholders and 30 fixed question tokens.

  --task direction  moving clips; answer = direction of motion (needs frame order)
  --task still      the first frame of the same clips repeated; the answer (the direction index) is
                    then a function of where the shape starts: a pure "where is it" question
  --tpe             the projector's TPE (configs/demo.py uses none; see the comment there)

Run: python benchmarks/demo_probe.py --task still --tpe sinusoidal --steps 200
Numbers from the 2-core VM (batch 8, lr 2e-3), accuracy at steps 100, 200: still / sinusoidal 25%,
50%; still / none 25%, 25%. An earlier version of this probe (other clips) gave the opposite order
(sinusoidal 25%, 25%; none 25%, 43%) and direction / none 25%, 25%, 33%, 58% at 100..400 steps: the
model sits at chance (loss ln 4) for a few hundred steps and then takes off, at a step that varies
more between data draws than between these settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from configs.demo import get_config  # noqa: E402
from kangaroo_jax.config import KangarooConfig  # noqa: E402
from kangaroo_jax.data.video import normalize_frames  # noqa: E402
from kangaroo_jax.models import Kangaroo  # noqa: E402
from train import demo_data  # noqa: E402
from train.config import model_config  # noqa: E402

SIZE, FRAMES, FPS = 112, 8, 4
QUESTION_TOKENS = 30
ANSWER_IDS = np.arange(100, 104)  # the 4 answer tokens; the loss is over these logits only


def demo_model_config(tpe: str) -> KangarooConfig:
  """The `make demo` model (configs/demo.py) with the given TPE."""
  return model_config(get_config(f"frame_size={SIZE},tpe={tpe}").model.to_dict())


def clips(n: int, seed: int, task: str) -> tuple[np.ndarray, np.ndarray]:
  """-> normalised frames [n, FRAMES, SIZE, SIZE, 3], direction index [n]."""
  chosen = [c for c in demo_data.sample(n * 3, seed=seed, size=SIZE, frames=FRAMES) if c["task"] == "direction"][:n]
  frames = np.stack([demo_data.render(c["kind"], FRAMES) for c in chosen])
  if task == "still":
    frames[:] = frames[:, :1]
  labels = np.array([list(demo_data.DIRECTIONS).index(c["kind"]["direction"]) for c in chosen])
  return normalize_frames(frames), labels


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--task", choices=("direction", "still"), default="direction")
  ap.add_argument("--tpe", choices=("none", "sinusoidal", "learned"), default="none")
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--eval-every", type=int, default=100)
  ap.add_argument("--lr", type=float, default=2e-3)
  ap.add_argument("--batch", type=int, default=8)
  args = ap.parse_args()
  if args.steps < 2:
    ap.error(f"--steps must be at least 2 (warm-up plus decay), got {args.steps}")

  cfg = demo_model_config(args.tpe)
  model = Kangaroo(cfg, rngs=nnx.Rngs(0))
  x_train, y_train = clips(2000, 0, args.task)
  x_test, y_test = clips(300, 12345, args.task)
  n_vis = model.num_visual_tokens(FRAMES, SIZE, SIZE)
  ids = np.concatenate([[cfg.llm.bos_token_id], np.full(n_vis, cfg.visual_token_id),
                        np.arange(10, 10 + QUESTION_TOKENS), [5]]).astype(np.int32)
  timestamps = np.arange(FRAMES, dtype=np.float32) / FPS

  def answer_logits(m, x):
    b = x.shape[0]
    logits = m(jnp.broadcast_to(ids, (b, len(ids))), x, jnp.broadcast_to(timestamps, (b, FRAMES)))
    return logits[:, -1, ANSWER_IDS]

  def loss_fn(m, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(answer_logits(m, x), y).mean()

  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10), args.steps, args.lr * 0.05)
  opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95,
                                                                                     weight_decay=0.0)),
                      wrt=nnx.Param)

  @nnx.jit
  def step(m, o, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(m, x, y)
    o.update(m, grads)
    return loss

  predict = nnx.jit(lambda m, x: answer_logits(m, x).argmax(-1))

  def accuracy(x, y):
    return float(np.mean(np.concatenate([np.asarray(predict(model, x[i:i + 50])) for i in range(0, len(y), 50)]) == y))

  rng = np.random.default_rng(0)
  losses, t0 = [], time.perf_counter()
  for i in range(args.steps):
    idx = rng.integers(0, len(y_train), args.batch)
    losses.append(float(step(model, opt, x_train[idx], y_train[idx])))
    if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
      print(json.dumps(dict(benchmark="demo_probe", task=args.task, tpe=args.tpe, step=i + 1,
                            loss=round(float(np.mean(losses[-50:])), 3), test_accuracy=round(accuracy(x_test, y_test), 3),
                            train_accuracy=round(accuracy(x_train[:300], y_train[:300]), 3),
                            seconds=round(time.perf_counter() - t0))), flush=True)


if __name__ == "__main__":
  main()
