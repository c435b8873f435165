"""`make demo` / `python -m train.demo [--workdir DIR] [--steps N]`: the whole job on a CPU in a few minutes.

  1. synthetic video QA (moving / appearing coloured shapes, train/demo_data.py): train manifest + held-out
     benchmark JSON;
  2. a tiny chat sentencepiece tokenizer and ArrayRecord shards (tools.build_dataset);
  3. trains the `tiny` model with `configs/demo.py` (the same trainer as `python -m train`), checkpoints,
     exports WORKDIR/run/export;
  4. evaluates the held-out videos with `kangaroo_jax.evaluate` and prints accuracy per question type next
     to chance;
  5. asks one question about one video through the chat API.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default=os.path.join(_ROOT, ".cache", "demo"))
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--train-videos", type=int, default=1500)
  p.add_argument("--test-videos", type=int, default=200)
  p.add_argument("--fresh", action="store_true", help="delete WORKDIR first (default: resume what is there)")
  args = p.parse_args(argv)
  if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # configs/ is loaded as a package

  import jax
  import ml_collections  # noqa: F401

  from kangaroo_jax.data import build_chat_sentencepiece
  from train import demo_data

  t0 = time.perf_counter()
  if args.fresh and os.path.exists(args.workdir):
    shutil.rmtree(args.workdir)
  data_dir, tok_dir = os.path.join(args.workdir, "data"), os.path.join(args.workdir, "tokenizer")
  ds_dir, run_dir = os.path.join(args.workdir, "records"), os.path.join(args.workdir, "run")
  print(f"[demo] 1/5 generating {args.train_videos} + {args.test_videos} videos in {data_dir}", flush=True)
  paths = demo_data.generate(data_dir, num_train=args.train_videos, num_test=args.test_videos)
  print("[demo] 2/5 tokenizer + ArrayRecord shards", flush=True)
  build_chat_sentencepiece(paths["texts"] + ["<video><vi_start><vi_end><eof><eov>"], tok_dir, vocab_size=320)
  if not os.path.exists(os.path.join(ds_dir, "summary.json")):
    from tools.build_dataset import main as build
    rc = build([paths["manifest"], ds_dir, "--size", "56", "--num-frames", "8"])
    if rc:
      raise SystemExit(f"tools.build_dataset failed with {rc}")

  print(f"[demo] 3/5 training the tiny model for {args.steps} steps on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)", flush=True)
  from configs.demo import get_config
  from train.config import from_configdict
  from train.loop import train
  cfg = from_configdict(get_config(f"data={ds_dir},tokenizer={tok_dir},steps={args.steps}"))
  t_train = time.perf_counter()
  result = train(cfg, run_dir)
  t_train = time.perf_counter() - t_train
  hist = result.history
  if hist:
    first, last = hist[0]["loss"], sum(h["loss"] for h in hist[-20:]) / len(hist[-20:])
    print(f"[demo] training loss {first:.3f} -> {last:.3f} (mean of the last 20 steps), {t_train:.0f} s", flush=True)

  print("[demo] 4/5 evaluating on held-out videos", flush=True)
  from kangaroo_jax import from_pretrained
  from kangaroo_jax.evaluate import evaluate, model_answer_fn
  from kangaroo_jax.inference.chat import Chat
  from kangaroo_jax.inference.mcq import load_benchmark
  model, tokenizer = from_pretrained(os.path.join(run_dir, "export"))
  chat = Chat(model, tokenizer)
  items = load_benchmark(paths["benchmark"])
  out = os.path.join(args.workdir, "eval")
  shutil.rmtree(out, ignore_errors=True)  # the model may have changed since a previous run
  summary = evaluate(model_answer_fn(chat, num_frames=8, max_new_tokens=12), items, paths["videos"], out)
  print(f"[demo] held-out accuracy ({len(items)} videos):")
  print(f"  {'question type':<12} {'accuracy':>9} {'chance':>8} {'n':>5}")
  for task, r in summary["per_task"].items():
    print(f"  {task:<12} {r['accuracy']:>8.1f}% {100 * demo_data.CHANCE[task]:>7.1f}% {r['total']:>5}")
  print(f"  {'overall':<12} {summary['overall']['accuracy']:>8.1f}%")

  print("[demo] 5/5 chat", flush=True)
  item = next(it for it in items if it.task == "direction")
  from kangaroo_jax.inference.mcq import format_prompt
  question = format_prompt(item)
  answer, _ = chat.chat(os.path.join(paths["videos"], item.video), question, None, num_frames=8,
                        max_new_tokens=12, do_sample=False)
  print(f"  video: {item.video}\n  user: {question}\n  assistant: {answer}\n  (correct: "
        f"{item.options[item.answer]})")
  print(f"[demo] done in {time.perf_counter() - t0:.0f} s; checkpoint: {run_dir}/checkpoints, "
        f"export: {run_dir}/export, TensorBoard: {run_dir}/tb")
  return 0


if __name__ == "__main__":
  sys.exit(main())
