"""`make demo` / `python -m train.demo [--workdir DIR] [--steps N]`: the whole job on a CPU in about 10 minutes.

  1. synthetic video QA (moving / appearing coloured shapes at 84 px, train/demo_data.py): train manifest +
     held-out benchmark JSON (other random seed) + a benchmark over training clips (train accuracy);
  2. a small chat sentencepiece tokenizer and ArrayRecord shards (tools.build_dataset);
  3. trains a small model with `configs/demo.py` (the same trainer as `python -m train`), checkpoints,
     exports WORKDIR/run/export;
  4. evaluates held-out and training videos with `kangaroo_jax.evaluate` and prints accuracy per question
     type next to chance, a majority-answer baseline and its target (TARGETS);
  5. asks one question about one video through the chat API.
Exits non-zero only on errors; a low accuracy is reported, not raised.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)  # configs/ is loaded as a package

from train.demo_data import FRAME_SIZE, FRAMES  # noqa: E402

STEPS = 1500
# Held-out accuracy (%) the default recipe is meant to reach on every seed (README, configs/demo.py).
TARGETS = {"direction": 80, "order": 75, "shape": 80, "color": 95}


def _baselines(train_items, test_items, task: str) -> float:
  """Test accuracy of the best constant answer learnt from the training answers (answer text or letter)."""
  tr = [it for it in train_items if it.task == task]
  te = [it for it in test_items if it.task == task]
  if not te:
    return float("nan")
  best = 0.0
  for key in (lambda it: it.options[it.answer], lambda it: it.answer):
    counts = collections.Counter(key(it) for it in tr)
    if counts:
      guess = counts.most_common(1)[0][0]
      best = max(best, sum(key(it) == guess for it in te) / len(te))
  return best


def main(argv=None) -> int:
  from kangaroo_jax.cli_help import HelpFormatter

  p = argparse.ArgumentParser(
      prog="python -m train.demo", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
  )
  p.add_argument(
      "--workdir",
      default=os.path.join(_ROOT, ".cache", "demo"),
      help="where the videos, tokenizer, shards, run (checkpoints, TensorBoard, export) and reports go",
  )
  p.add_argument("--steps", type=int, default=STEPS, help="training steps")
  p.add_argument("--train-videos", type=int, default=3000, help="training clips to generate")
  p.add_argument("--test-videos", type=int, default=400, help="held-out clips to generate (the accuracy table)")
  p.add_argument(
      "--seed",
      type=int,
      default=0,
      help="draws the clips, the model init and the batch order (default 0; held-out clips: seed + 1000003)",
  )
  p.add_argument("--fresh", action="store_true", help="delete WORKDIR first (default: resume what is there)")
  p.add_argument(
      "--tpe",
      choices=("none", "sinusoidal", "learned"),
      help="the projector's temporal position embedding (default and why: configs/demo.py)",
  )
  args = p.parse_args(argv)

  import jax
  import ml_collections  # noqa: F401

  from kangaroo_jax.data import build_chat_sentencepiece
  from train import demo_data

  t0 = time.perf_counter()
  times = {}
  if args.fresh and os.path.exists(args.workdir):
    shutil.rmtree(args.workdir)
  seed_file = os.path.join(args.workdir, "seed.txt")
  if os.path.exists(seed_file):
    with open(seed_file) as f:
      old_seed = f.read().strip()
    if old_seed != str(args.seed):
      print(
          f"error: {args.workdir} holds a seed-{old_seed} demo, not seed {args.seed}: add --fresh to start over "
          "or pick another --workdir",
          file=sys.stderr,
      )
      return 2
  os.makedirs(args.workdir, exist_ok=True)
  with open(seed_file, "w") as f:
    f.write(f"{args.seed}\n")
  print(
      f"[demo] seed {args.seed}; {os.cpu_count()} CPU(s), {len(os.sched_getaffinity(0))} usable; "
      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
      flush=True,
  )
  data_dir, tok_dir = os.path.join(args.workdir, "data"), os.path.join(args.workdir, "tokenizer")
  ds_dir, run_dir = os.path.join(args.workdir, "records"), os.path.join(args.workdir, "run")
  print(
      f"[demo] 1/5 generating {args.train_videos} + {args.test_videos} videos ({FRAME_SIZE} px, {FRAMES} "
      f"frames) in {data_dir}",
      flush=True,
  )
  paths = demo_data.generate(
      data_dir, num_train=args.train_videos, num_test=args.test_videos, size=FRAME_SIZE, frames=FRAMES, seed=args.seed
  )
  times["data"] = time.perf_counter() - t0
  print("[demo] 2/5 tokenizer + ArrayRecord shards", flush=True)
  # 512 pieces: every option word is one token, so a sample is ~150 tokens instead of ~250 with 320.
  build_chat_sentencepiece(paths["texts"] + ["<video><vi_start><vi_end><eof><eov>"], tok_dir, vocab_size=512)
  if not os.path.exists(os.path.join(ds_dir, "summary.json")):
    from tools.build_dataset import main as build

    rc = build([paths["manifest"], ds_dir, "--size", str(FRAME_SIZE), "--num-frames", str(FRAMES)])
    if rc:
      raise SystemExit(f"tools.build_dataset failed with {rc}")
  times["records"] = time.perf_counter() - t0 - times["data"]

  print(
      f"[demo] 3/5 training the demo model for {args.steps} steps on {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s)",
      flush=True,
  )
  from configs.demo import get_config
  from train.config import from_configdict
  from train.loop import train

  # The frame size and count are the config's defaults: demo_data.FRAME_SIZE / FRAMES, as the videos above.
  arg = f"data={ds_dir},tokenizer={tok_dir},steps={args.steps},seed={args.seed}"
  cfg = from_configdict(get_config(arg + (f",tpe={args.tpe}" if args.tpe else "")))
  t_train = time.perf_counter()
  result = train(cfg, run_dir)
  times["train"] = time.perf_counter() - t_train
  hist = result.history
  if hist:
    first, last = hist[0]["loss"], sum(h["loss"] for h in hist[-20:]) / len(hist[-20:])
    print(
        f"[demo] training loss {first:.3f} -> {last:.3f} (mean of the last 20 steps; ln 4 = 1.386 would be "
        f"a guess among 4 options)",
        flush=True,
    )
  print(
      f"[demo] trained {len(hist)} steps in {times['train']:.0f} s: {len(hist) / times['train']:.2f} steps/s "
      "(compilation included)",
      flush=True,
  )

  print("[demo] 4/5 evaluating on held-out videos (and as many training videos, for train accuracy)", flush=True)
  t_eval = time.perf_counter()
  from kangaroo_jax import from_pretrained
  from kangaroo_jax.evaluate import evaluate, model_answer_fn
  from kangaroo_jax.inference.chat import Chat
  from kangaroo_jax.inference.mcq import load_benchmark

  model, tokenizer = from_pretrained(os.path.join(run_dir, "export"))
  chat = Chat(model, tokenizer)
  answer_fn = model_answer_fn(chat, num_frames=FRAMES, max_new_tokens=8)
  items, train_items = load_benchmark(paths["benchmark"]), load_benchmark(paths["train_benchmark"])
  summaries = {}
  for split, its in (("test", items), ("train", train_items)):
    out = os.path.join(args.workdir, f"eval_{split}")
    shutil.rmtree(out, ignore_errors=True)  # the model may have changed since a previous run
    summaries[split] = evaluate(answer_fn, its, paths["videos"], out)
  times["eval"] = time.perf_counter() - t_eval
  test, train_acc = summaries["test"]["per_task"], summaries["train"]["per_task"]
  print(
      f"[demo] accuracy per question type: {len(items)} held-out videos (test), {len(train_items)} training "
      "videos (train); majority = always giving the most common training answer"
  )
  print(f"  {'type':<10} {'test':>6} {'train':>6} {'chance':>7} {'majority':>8} {'n test':>6}")
  for task in demo_data.TYPES:
    r, tr = test.get(task), train_acc.get(task)
    if r is None:
      continue
    tr_s = f"{tr['accuracy']:5.1f}%" if tr else "    -"
    print(
        f"  {task:<10} {r['accuracy']:5.1f}% {tr_s:>6} {100 * demo_data.CHANCE[task]:6.1f}% "
        f"{100 * _baselines(train_items, items, task):7.1f}% {r['total']:>6}"
    )
  print(
      f"  {'overall':<10} {summaries['test']['overall']['accuracy']:5.1f}% "
      f"{summaries['train']['overall']['accuracy']:5.1f}%"
  )
  missed = [
      f"{t} {test[t]['accuracy']:.1f}% < {bar}%"
      for t, bar in TARGETS.items()
      if t in test and test[t]["accuracy"] < bar
  ]
  bars = ", ".join(f"{t} >= {bar}%" for t, bar in TARGETS.items())
  print(
      f"[demo] targets ({bars} held out): " + ("all met" if not missed else "NOT MET: " + "; ".join(missed)), flush=True
  )

  print("[demo] 5/5 chat", flush=True)
  item = next(it for it in items if it.task == "direction")
  from kangaroo_jax.inference.mcq import format_prompt

  question = format_prompt(item)
  answer, _ = chat.chat(
      os.path.join(paths["videos"], item.video), question, None, num_frames=FRAMES, max_new_tokens=8, do_sample=False
  )
  print(
      f"  video: {item.video}\n  user: {question}\n  assistant: {answer}\n  (correct: " f"{item.options[item.answer]})"
  )
  total = time.perf_counter() - t0
  print(
      f"[demo] done in {total:.0f} s wall (seed {args.seed}; data {times['data']:.0f} s, records "
      f"{times['records']:.0f} s, train "
      f"{times['train']:.0f} s, eval {times['eval']:.0f} s); checkpoint: {run_dir}/checkpoints, "
      f"export: {run_dir}/export, TensorBoard: {run_dir}/tb"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
