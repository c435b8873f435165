"""Multiple-choice video QA accuracy (MVBench / Video-MME style JSON), resumable.

    python -m kangaroo_jax.evaluate CKPT_DIR --benchmark FILE.json --video-root DIR [--output DIR]

Each answer is generated greedily, its chosen option extracted (kangaroo_jax.inference.mcq), and one
JSON line per item appended to OUTPUT/predictions.jsonl as soon as it is known. A rerun with the same
output folder skips the items already there, so an interrupted run continues where it stopped.
At the end OUTPUT/results.json holds overall and per-task accuracy, also printed as a table and as
one JSON line.

An item whose video is missing or cannot be decoded, or whose prompt is past --max-positions, is recorded
as failed (its line has "error": the reason) and the run goes on. Failed items count as wrong in
"accuracy" (over all items); "accuracy_answered" leaves them out. A rerun keeps them as failed, so a
broken video never makes every rerun stop or retry; `--retry-failed` runs them once more (e.g. after
fixing the videos). Ctrl-C stops after writing results.json for the items so far (exit status 130).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Callable

from kangaroo_jax import compile_cache
from kangaroo_jax.chat import HelpFormatter
from kangaroo_jax.data.video import VideoError
from kangaroo_jax.inference.chat import Chat, PromptTooLong
from kangaroo_jax.inference.loading import (EXIT_INTERRUPTED, INPUT_ERRORS, UsageError, add_loading_args,
                                            check_generation_args, load_from_args, report_input_error)
from kangaroo_jax.inference.mcq import (LETTERS, BenchmarkError, MCItem, extract_choice, format_prompt,
                                        load_benchmark, resolve_video)

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
RECORD_KEYS = ("id", "choice", "correct")


class OutputError(ValueError):
  """An output folder whose predictions.jsonl this tool cannot resume from (names the file and line)."""


def _item_errors() -> tuple[type[BaseException], ...]:
  """What makes one item fail without ending the run: its video (missing, unreadable) or its length."""
  errors: tuple[type[BaseException], ...] = (VideoError, OSError, PromptTooLong)
  try:
    import av
    errors += (av.error.FFmpegError,)  # a decoder error the video reader did not turn into a VideoError
  except ImportError:
    pass
  return errors


def read_predictions(path: str) -> dict[str, dict]:
  """Predictions already written, by id. A last line cut short by an interruption is ignored (and
  rewritten); any other line that is not a record of this tool raises OutputError, so a file that is not
  ours is never rewritten."""
  done: dict[str, dict] = {}
  if not os.path.exists(path):
    return done
  if not os.path.isfile(path):
    raise OutputError(f"{path}: is not a file; use another --output folder")
  with open(path) as f:
    lines = f.read().split("\n")
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      if i == last:
        continue
      rec = None
    if not (isinstance(rec, dict) and all(k in rec for k in RECORD_KEYS)):
      raise OutputError(f"{path}: line {i + 1} is not a prediction record of this tool (expected a JSON object "
                        f"with {', '.join(RECORD_KEYS)}); use another --output folder")
    done[str(rec["id"])] = rec
  return done


def prior_predictions(items: list[MCItem], pred_path: str) -> dict[str, dict]:
  """`read_predictions`, refusing a file that holds ids of another benchmark."""
  done = read_predictions(pred_path)
  stale = sorted(set(done) - {it.id for it in items})
  if stale:
    raise OutputError(f"{pred_path} holds predictions for ids not in this benchmark ({stale[:5]}"
                      f"{'...' if len(stale) > 5 else ''}); use another --output folder")
  return done


def _write_atomic(path: str, text: str) -> None:
  # Readers (and a crash) see the old file or the new one, never half of one.
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _rewrite_clean(path: str, done: dict[str, dict]) -> None:
  # Drops a truncated last line (and records being retried) so appended records start on a line of their own.
  _write_atomic(path, "".join(json.dumps(rec) + "\n" for rec in done.values()))


def summarize(items: list[MCItem], done: dict[str, dict]) -> dict:
  """Accuracy over the items that have predictions, overall and per task (sorted by task name).

  overall.accuracy counts failed items (video missing / undecodable, prompt too long) as wrong;
  overall.accuracy_answered is over the `answered` items only. `unanswered`: answers naming no option.
  """
  per = collections.defaultdict(lambda: [0, 0])
  failed_per_task: dict[str, int] = collections.Counter()
  unanswered = 0
  for it in items:
    rec = done.get(it.id)
    if rec is None:
      continue
    per[it.task][0] += int(bool(rec["correct"]))
    per[it.task][1] += 1
    if rec.get("error") is not None:
      failed_per_task[it.task] += 1
    else:
      unanswered += int(rec["choice"] is None)
  correct, total = sum(c for c, _ in per.values()), sum(t for _, t in per.values())
  failed = sum(failed_per_task.values())
  acc = lambda c, t: round(100.0 * c / t, 2) if t else None  # noqa: E731
  return {"overall": {"accuracy": acc(correct, total), "correct": correct, "total": total, "failed": failed,
                      "answered": total - failed, "accuracy_answered": acc(correct, total - failed)},
          "per_task": {k: {"accuracy": acc(c, t), "correct": c, "total": t} for k, (c, t) in sorted(per.items())},
          "failed_per_task": dict(sorted(failed_per_task.items())),
          "unanswered": unanswered, "items": len(items), "complete": total == len(items)}


def table(summary: dict) -> str:
  rows = [(k, v) for k, v in summary["per_task"].items()] + [("OVERALL", summary["overall"])]
  w = max(len(k) for k, _ in rows)
  lines = [f"{'task':<{w}}  {'acc %':>7}  {'correct':>7}  {'total':>5}"]
  for k, v in rows:
    a = "-" if v["accuracy"] is None else f"{v['accuracy']:.2f}"
    lines.append(f"{k:<{w}}  {a:>7}  {v['correct']:>7}  {v['total']:>5}")
  o = summary["overall"]
  if o["failed"]:
    a = "-" if o["accuracy_answered"] is None else f"{o['accuracy_answered']:.2f}%"
    lines.append(f"{o['failed']} failed items (counted as wrong; reasons in {PREDICTIONS}); "
                 f"accuracy over the {o['answered']} answered: {a}")
  return "\n".join(lines)


def evaluate(answer_fn: Callable[[MCItem, str, str], str], items: list[MCItem], video_root: str, output_dir: str,
             *, max_items: int | None = None, retry_failed: bool = False,
             log: Callable[[str], None] = lambda s: None) -> dict:
  """Runs `answer_fn(item, video_path, prompt) -> text` on every item without a stored prediction.

  An item whose video cannot be found or read, or whose prompt is too long, is stored as failed with the
  reason and the run goes on. Stored failures are kept on a rerun unless `retry_failed`.
  max_items: stop after this many new predictions (the rest is left for a later run).
  Returns the summary over everything predicted so far; results.json is written also when interrupted.
  """
  os.makedirs(output_dir, exist_ok=True)
  pred_path = os.path.join(output_dir, PREDICTIONS)
  done = prior_predictions(items, pred_path)
  retry = [k for k, rec in done.items() if rec.get("error") is not None] if retry_failed else []
  for k in retry:
    del done[k]
  if done or retry or os.path.exists(pred_path):
    _rewrite_clean(pred_path, done)
  if done:
    failed = sum(rec.get("error") is not None for rec in done.values())
    log(f"resuming: {len(done)} of {len(items)} items already predicted"
        + (f" ({failed} recorded as failed; --retry-failed runs them again)" if failed else ""))
  if retry:
    log(f"retrying {len(retry)} failed items")
  item_errors = _item_errors()
  new = 0
  try:
    with open(pred_path, "a") as out:
      for it in items:
        if it.id in done:
          continue
        if max_items is not None and new >= max_items:
          break
        rec = {"id": it.id, "task": it.task, "video": it.video, "answer": LETTERS[it.answer]}
        try:
          text = answer_fn(it, resolve_video(video_root, it.video), format_prompt(it))
        except item_errors as e:
          reason = " ".join(str(e).split()) or type(e).__name__
          rec.update(prediction=None, choice=None, correct=False, error=reason)
          outcome = f"failed: {reason}"
        else:
          choice = extract_choice(text, it.options)
          rec.update(prediction=text, choice=None if choice is None else LETTERS[choice], correct=choice == it.answer)
          outcome = f"{rec['choice']} (answer {rec['answer']})"
        out.write(json.dumps(rec) + "\n")
        out.flush()
        done[it.id] = rec
        new += 1
        log(f"[{len(done)}/{len(items)}] {it.id}: {outcome}")  # after the write: a logged item is saved
  finally:
    summary = summarize(items, done)
    _write_atomic(os.path.join(output_dir, RESULTS), json.dumps(summary, indent=2))
  return summary


def model_answer_fn(chat, *, num_frames: int, max_new_tokens: int) -> Callable[[MCItem, str, str], str]:
  """Greedy answers from a `kangaroo_jax.inference.chat.Chat`."""

  def answer(item: MCItem, video: str, prompt: str) -> str:
    text, _ = chat.chat(video, prompt, None, num_frames=num_frames, max_new_tokens=max_new_tokens, do_sample=False,
                        start=item.start, end=item.end)
    return text

  return answer


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m kangaroo_jax.evaluate", description=__doc__.split("\n\n")[0],
                              epilog=compile_cache.HELP_EPILOG,
                              formatter_class=HelpFormatter)
  p.add_argument("ckpt_dir", help="from_pretrained folder")
  p.add_argument("--benchmark", required=True, help="benchmark JSON (MVBench / Video-MME shapes)")
  p.add_argument("--video-root", required=True, help="folder the items' video paths are relative to")
  p.add_argument("--output", help="folder for predictions.jsonl and results.json (default: next to the "
                 "benchmark, <name>_predictions/)")
  p.add_argument("--num-frames", type=int, default=64, help="an even number of frames sampled uniformly "
                 "from each video")
  p.add_argument("--max-new-tokens", type=int, default=16, help="longest answer, in tokens (greedy decoding)")
  p.add_argument("--max-items", type=int, help="stop after this many new items and resume later (default: no limit)")
  p.add_argument("--retry-failed", action="store_true",
                 help="run the items a previous run recorded as failed again (default: keep them as failed)")
  add_loading_args(p)
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  output = args.output or os.path.splitext(args.benchmark)[0] + "_predictions"
  pred_path = os.path.join(output, PREDICTIONS)
  try:
    check_generation_args(args)
    if args.max_items is not None and args.max_items < 0:
      raise UsageError(f"--max-items must be >= 0, got {args.max_items}")
    if not os.path.isdir(args.video_root):
      raise UsageError(f"--video-root {args.video_root}: no such folder")
    if os.path.exists(output) and not os.path.isdir(output):
      raise UsageError(f"--output {output}: is a file; expected a folder")
    items = load_benchmark(args.benchmark)
    prior_predictions(items, pred_path)  # a foreign or mismatched file fails now, not after loading the model
    compile_cache.enable()  # before the first compile, which opens the cache
    model, tokenizer, scope = load_from_args(args)
    with scope:
      chat = Chat(model, tokenizer, prefill_chunk=args.prefill_chunk, max_positions=args.max_positions,
                  warn=lambda s: print(f"warning: {s}", file=sys.stderr, flush=True))
      summary = evaluate(model_answer_fn(chat, num_frames=args.num_frames, max_new_tokens=args.max_new_tokens),
                         items, args.video_root, output, max_items=args.max_items, retry_failed=args.retry_failed,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
  except INPUT_ERRORS + (BenchmarkError, OutputError) as e:
    return report_input_error(e)
  except KeyboardInterrupt:
    try:
      saved = len(read_predictions(pred_path))
    except OutputError:  # the run was stopped before it checked this file
      saved = 0
    print(f"\ninterrupted: {saved} items are saved in {pred_path}; run the same command again to resume",
          file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
  print(table(summary))
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
