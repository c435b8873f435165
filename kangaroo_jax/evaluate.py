"""Multiple-choice video QA accuracy (MVBench / Video-MME style JSON), resumable.

    python -m kangaroo_jax.evaluate CKPT_DIR --benchmark FILE.json --video-root DIR [--output DIR]

Each answer is generated greedily, its chosen option extracted (kangaroo_jax.inference.mcq), and one
JSON line per item appended to OUTPUT/predictions.jsonl as soon as it is known. A rerun with the same
output folder skips the items already there, so an interrupted run continues where it stopped.
At the end OUTPUT/results.json holds overall and per-task accuracy, also printed as a table and as
one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Callable

from kangaroo_jax.inference.loading import add_loading_args, load_from_args
from kangaroo_jax.inference.mcq import LETTERS, MCItem, extract_choice, format_prompt, load_benchmark, resolve_video

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"


def read_predictions(path: str) -> dict[str, dict]:
  """Predictions already written (a line cut short by an interruption is ignored and rewritten)."""
  done: dict[str, dict] = {}
  if not os.path.exists(path):
    return done
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict) and "id" in rec:
        done[str(rec["id"])] = rec
  return done


def _rewrite_clean(path: str, done: dict[str, dict]) -> None:
  # Drop a truncated last line so appended records start on a line of their own.
  with open(path + ".tmp", "w") as f:
    for rec in done.values():
      f.write(json.dumps(rec) + "\n")
  os.replace(path + ".tmp", path)


def summarize(items: list[MCItem], done: dict[str, dict]) -> dict:
  """Accuracy over the items that have predictions, overall and per task (sorted by task name)."""
  per = collections.defaultdict(lambda: [0, 0])
  unanswered = 0
  for it in items:
    rec = done.get(it.id)
    if rec is None:
      continue
    per[it.task][0] += int(bool(rec["correct"]))
    per[it.task][1] += 1
    unanswered += int(rec["choice"] is None)
  correct, total = sum(c for c, _ in per.values()), sum(t for _, t in per.values())
  acc = lambda c, t: round(100.0 * c / t, 2) if t else None  # noqa: E731
  return {"overall": {"accuracy": acc(correct, total), "correct": correct, "total": total},
          "per_task": {k: {"accuracy": acc(c, t), "correct": c, "total": t} for k, (c, t) in sorted(per.items())},
          "unanswered": unanswered, "items": len(items), "complete": total == len(items)}


def table(summary: dict) -> str:
  rows = [(k, v) for k, v in summary["per_task"].items()] + [("OVERALL", summary["overall"])]
  w = max(len(k) for k, _ in rows)
  lines = [f"{'task':<{w}}  {'acc %':>7}  {'correct':>7}  {'total':>5}"]
  for k, v in rows:
    a = "-" if v["accuracy"] is None else f"{v['accuracy']:.2f}"
    lines.append(f"{k:<{w}}  {a:>7}  {v['correct']:>7}  {v['total']:>5}")
  return "\n".join(lines)


def evaluate(answer_fn: Callable[[MCItem, str, str], str], items: list[MCItem], video_root: str, output_dir: str,
             *, max_items: int | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
  """Runs `answer_fn(item, video_path, prompt) -> text` on every item without a stored prediction.

  max_items: stop after this many new predictions (the rest is left for a later run).
  Returns the summary over everything predicted so far.
  """
  os.makedirs(output_dir, exist_ok=True)
  pred_path = os.path.join(output_dir, PREDICTIONS)
  done = read_predictions(pred_path)
  known = {it.id for it in items}
  stale = sorted(set(done) - known)
  if stale:
    raise ValueError(f"{pred_path} holds predictions for ids not in this benchmark ({stale[:5]}...); "
                     "use another --output folder")
  if done:
    _rewrite_clean(pred_path, done)
    log(f"resuming: {len(done)} of {len(items)} items already predicted")
  new = 0
  with open(pred_path, "a") as out:
    for it in items:
      if it.id in done:
        continue
      if max_items is not None and new >= max_items:
        break
      text = answer_fn(it, resolve_video(video_root, it.video), format_prompt(it))
      choice = extract_choice(text, it.options)
      rec = {"id": it.id, "task": it.task, "video": it.video, "prediction": text,
             "choice": None if choice is None else LETTERS[choice], "answer": LETTERS[it.answer],
             "correct": choice == it.answer}
      out.write(json.dumps(rec) + "\n")
      out.flush()
      done[it.id] = rec
      new += 1
      log(f"[{len(done)}/{len(items)}] {it.id}: {rec['choice']} (answer {rec['answer']})")
  summary = summarize(items, done)
  with open(os.path.join(output_dir, RESULTS), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def model_answer_fn(chat, *, num_frames: int, max_new_tokens: int) -> Callable[[MCItem, str, str], str]:
  """Greedy answers from a `kangaroo_jax.inference.chat.Chat`."""

  def answer(item: MCItem, video: str, prompt: str) -> str:
    text, _ = chat.chat(video, prompt, None, num_frames=num_frames, max_new_tokens=max_new_tokens, do_sample=False,
                        start=item.start, end=item.end)
    return text

  return answer


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m kangaroo_jax.evaluate", description=__doc__.split("\n\n")[0])
  p.add_argument("ckpt_dir", help="from_pretrained folder")
  p.add_argument("--benchmark", required=True, help="benchmark JSON (MVBench / Video-MME shapes)")
  p.add_argument("--video-root", required=True, help="folder the items' video paths are relative to")
  p.add_argument("--output", help="folder for predictions.jsonl and results.json (default: next to the "
                 "benchmark, <name>_predictions/)")
  p.add_argument("--num-frames", type=int, default=64)
  p.add_argument("--max-new-tokens", type=int, default=16)
  p.add_argument("--max-items", type=int, help="stop after this many new items (resume later)")
  add_loading_args(p)
  args = p.parse_args(argv)

  from kangaroo_jax.inference.chat import Chat

  items = load_benchmark(args.benchmark)
  output = args.output or os.path.splitext(args.benchmark)[0] + "_predictions"
  loaded = load_from_args(args)
  if loaded is None:
    return 2
  model, tokenizer, scope = loaded
  with scope:
    chat = Chat(model, tokenizer, prefill_chunk=args.prefill_chunk)
    summary = evaluate(model_answer_fn(chat, num_frames=args.num_frames, max_new_tokens=args.max_new_tokens), items,
                       args.video_root, output, max_items=args.max_items,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
  print(table(summary))
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
