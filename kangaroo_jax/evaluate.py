"""Multiple-choice video QA accuracy (MVBench / Video-MME style JSON), resumable.

    python -m kangaroo_jax.evaluate CKPT_DIR --benchmark FILE.json --video-root DIR [--recipe NAME] [--output DIR]

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

--recipe NAME (kangaroo_jax.inference.recipes: mvbench, videomme, videomme_subtitles, egoschema, longvideobench,
mlvu) fixes the frame count, prompt template and answer length of that benchmark (videomme_subtitles adds the
lines of --subtitle-root/<video name>.srt shown at the sampled frames); --num-frames / --max-new-tokens still
override it, and the override is recorded. Without a recipe the prompt is mcq.format_prompt with 64 frames
and 16 new tokens. OUTPUT/run.json, results.json ("run") and every prediction line record the settings,
the project's git commit (or the package version outside a git checkout) and the checkpoint's content hash
(sha256 streamed over its config, state/ and tokenizer files; reused from run.json while every file's size
and mtime are unchanged). A rerun refuses to continue predictions made with other settings or another
checkpoint; --force-new-output sets the old files aside (renamed with a UTC time stamp) and starts over.

A video with fewer distinct frames than requested (a short clip, an image) repeats frames under uniform
sampling; its line records frames_unique and frames_requested, results.json counts such items
("short_videos") and the run ends with a one-line warning.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Callable

import numpy as np

from kangaroo_jax import compile_cache
from kangaroo_jax.cli_help import HelpFormatter
from kangaroo_jax.data.video import VideoError
from kangaroo_jax.inference.chat import Chat, PromptTooLong
from kangaroo_jax.inference.loading import (
    EXIT_INTERRUPTED,
    INPUT_ERRORS,
    UsageError,
    add_loading_args,
    check_generation_args,
    load_from_args,
    report_input_error,
)
from kangaroo_jax.pretrained import load_config
from kangaroo_jax.inference.mcq import (
    LETTERS,
    BenchmarkError,
    MCItem,
    SubtitleError,
    extract_choice,
    format_prompt,
    load_benchmark,
    read_srt,
    resolve_video,
    subtitles_at,
)
from kangaroo_jax.inference.recipes import DEFAULT, RECIPES, Recipe, RecipeError, get_recipe

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
RUN = "run.json"
TOOL = "kangaroo_jax.evaluate"
RECORD_KEYS = ("id", "choice", "correct")
# Per prediction line: what the resume check compares (besides run.json's full settings).
RUN_LINE_KEYS = ("recipe", "num_frames", "max_new_tokens", "checkpoint_sha256")
HASH_CHUNK = 8 << 20


class OutputError(ValueError):
  """An output folder whose predictions.jsonl this tool cannot resume from (names the file and line)."""


def _item_errors() -> tuple[type[BaseException], ...]:
  """What makes one item fail without ending the run: its video (missing, unreadable) or its length."""
  errors: tuple[type[BaseException], ...] = (VideoError, OSError, PromptTooLong, SubtitleError)
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
      raise OutputError(
          f"{path}: line {i + 1} is not a prediction record of this tool (expected a JSON object "
          f"with {', '.join(RECORD_KEYS)}); use another --output folder"
      )
    done[str(rec["id"])] = rec
  return done


def prior_predictions(items: list[MCItem], pred_path: str) -> dict[str, dict]:
  """`read_predictions`, refusing a file that holds ids of another benchmark."""
  done = read_predictions(pred_path)
  stale = sorted(set(done) - {it.id for it in items})
  if stale:
    raise OutputError(
        f"{pred_path} holds predictions for ids not in this benchmark ({stale[:5]}"
        f"{'...' if len(stale) > 5 else ''}); use another --output folder"
    )
  return done


def _write_atomic(path: str, text: str) -> None:
  # Readers (and a crash) see the old file or the new one, never half of one.
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _rewrite_clean(path: str, done: dict[str, dict]) -> None:
  # Drops a truncated last line (and records being retried) so appended records start on a line of their own.
  _write_atomic(path, "".join(json.dumps(rec) + "\n" for rec in done.values()))


# ---- provenance: which code, checkpoint and settings produced a predictions file


def code_version() -> dict:
  """{"commit": HEAD of the git checkout this package runs from, "dirty": uncommitted changes to tracked files,
  "version": the package version}. commit / dirty are None outside a checkout of this project (installed
  package, no git binary, git failing): provenance never fails a run."""
  import kangaroo_jax

  root = os.path.dirname(os.path.dirname(os.path.abspath(kangaroo_jax.__file__)))
  info = {"commit": None, "dirty": None, "version": kangaroo_jax.__version__}
  try:
    head = subprocess.run(
        ["git", "-C", root, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True, timeout=20
    )
    lines = head.stdout.splitlines()
    # A package installed inside some other repository's tree must not report that repository's commit.
    if head.returncode != 0 or len(lines) != 2 or os.path.realpath(lines[0]) != os.path.realpath(root):
      return info
    info["commit"] = lines[1].strip()
    status = subprocess.run(
        ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=20
    )
    if status.returncode == 0:
      info["dirty"] = bool(status.stdout.strip())
  except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
    pass
  return info


def checkpoint_files(ckpt_dir: str) -> list[str]:
  """Relative paths (sorted, '/'-separated) of the files that decide a checkpoint's answers.

  A from_pretrained folder: kangaroo_config.json, every file under state/, and the tokenizer files.
  Any other layout (e.g. a released Hugging Face folder): every file, hidden names left out.
  """
  from kangaroo_jax.pretrained import CONFIG_FILE, STATE_DIR
  from kangaroo_jax.tokenizer import TOKENIZER_FILES

  def walk(sub: str) -> list[str]:
    found = []
    for here, dirs, names in os.walk(os.path.join(ckpt_dir, sub)):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      rel = os.path.relpath(here, ckpt_dir)
      found += [os.path.normpath(os.path.join(rel, n)).replace(os.sep, "/") for n in names if not n.startswith(".")]
    return found

  if os.path.isfile(os.path.join(ckpt_dir, CONFIG_FILE)):
    tokenizer = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(ckpt_dir, n))]
    files = [CONFIG_FILE] + walk(STATE_DIR) + tokenizer
  else:
    files = walk("")
  return sorted(set(files))


def _stat_digest(ckpt_dir: str, files: list[str]) -> tuple[str, int]:
  """sha256 over each file's name, size and mtime (what the hash cache trusts), and the total bytes."""
  h, total = hashlib.sha256(), 0
  for rel in files:
    st = os.stat(os.path.join(ckpt_dir, rel))
    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    total += st.st_size
  return h.hexdigest(), total


def checkpoint_hash(ckpt_dir: str, cached: dict | None = None) -> dict:
  """The checkpoint's content hash: sha256 streamed over every file of `checkpoint_files`, in order, as
  (relative path, size, bytes), so a renamed, resized or edited file changes it.

  Reading a 16 GB checkpoint takes tens of seconds, so `cached` (a previous result, e.g. from run.json) is
  returned as is when the folder, file list and every file's size and mtime still match it.
  Returns {"path", "sha256", "files", "bytes", "stat_sha256"}; OSError when a file cannot be read.
  """
  path = os.path.abspath(ckpt_dir)
  files = checkpoint_files(ckpt_dir)
  stat_sha, total = _stat_digest(ckpt_dir, files)
  if (
      isinstance(cached, dict)
      and cached.get("path") == path
      and cached.get("stat_sha256") == stat_sha
      and isinstance(cached.get("sha256"), str)
  ):
    return dict(cached)
  h = hashlib.sha256()
  for rel in files:
    h.update(f"{rel}\0{os.path.getsize(os.path.join(ckpt_dir, rel))}\0".encode())
    with open(os.path.join(ckpt_dir, rel), "rb") as f:
      while chunk := f.read(HASH_CHUNK):
        h.update(chunk)
  return {"path": path, "sha256": h.hexdigest(), "files": len(files), "bytes": total, "stat_sha256": stat_sha}


def read_run(output_dir: str) -> dict | None:
  """OUTPUT/run.json as this tool wrote it, or None when absent; OutputError for a file that is not ours."""
  path = os.path.join(output_dir, RUN)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      run = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError):
    run = None
  if not (isinstance(run, dict) and run.get("tool") == TOOL):
    raise OutputError(f"{path}: not a run record of {TOOL}; use another --output folder")
  return run


def run_record(recipe: Recipe | None, settings: Recipe, overrides: dict, checkpoint: dict) -> dict:
  """What run.json and results.json["run"] hold: the recipe as named (None without --recipe), the settings
  actually used (the recipe with overrides applied), the overrides ({field: {"recipe", "used"}}), the code
  version and the checkpoint hash."""
  return {
      "tool": TOOL,
      "recipe": None if recipe is None else recipe.to_dict(),
      "settings": settings.to_dict(),
      "overrides": overrides,
      "code": code_version(),
      "checkpoint": checkpoint,
  }


def _line_fields(run: dict) -> dict:
  # Cheap per-line copies, so a predictions file says what made each line even without run.json.
  return {
      "recipe": run["recipe"] and run["recipe"]["name"],
      "num_frames": run["settings"]["num_frames"],
      "max_new_tokens": run["settings"]["max_new_tokens"],
      "checkpoint_sha256": run["checkpoint"]["sha256"],
      "commit": run["code"]["commit"],
  }


def _describe(fields: dict) -> str:
  return (
      f"recipe {fields['recipe'] or 'none'}, {fields['num_frames']} frames, "
      f"{fields['max_new_tokens']} new tokens, checkpoint sha256 {str(fields['checkpoint_sha256'])[:12]}"
  )


def check_resumable(done: dict[str, dict], prior_run: dict | None, run: dict, pred_path: str) -> None:
  """OutputError (one line) when the stored predictions were made with other settings or another checkpoint.

  Lines written before these fields existed carry none and are not compared.
  """
  if not done:
    return
  want = _line_fields(run)
  hint = "; use another --output folder, or --force-new-output to set the old files aside and start over"
  for rec in done.values():
    got = {k: rec[k] for k in RUN_LINE_KEYS if k in rec}
    if any(got[k] != want[k] for k in got):
      raise OutputError(
          f"{pred_path} holds predictions made with {_describe({**want, **got})}; this run uses "
          f"{_describe(want)}{hint}"
      )
  if prior_run is not None and prior_run.get("settings") != run["settings"]:
    changed = sorted(
        k
        for k in set(run["settings"]) | set(prior_run.get("settings") or {})
        if (prior_run.get("settings") or {}).get(k) != run["settings"].get(k)
    )
    raise OutputError(
        f"{pred_path} was made with other settings ({', '.join(changed)} differ from "
        f"{os.path.join(os.path.dirname(pred_path), RUN)}){hint}"
    )


def set_aside(output_dir: str) -> list[str]:
  """Renames this tool's files in `output_dir` to NAME.<UTC time>.EXT (kept, never deleted); returns the new paths."""
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  moved = []
  for name in (PREDICTIONS, RESULTS, RUN):
    src = os.path.join(output_dir, name)
    if os.path.isfile(src):
      base, ext = os.path.splitext(name)
      dst = os.path.join(output_dir, f"{base}.{stamp}{ext}")
      n = 1
      while os.path.exists(dst):
        dst = os.path.join(output_dir, f"{base}.{stamp}-{n}{ext}")
        n += 1
      os.replace(src, dst)
      moved.append(dst)
  return moved


def summarize(items: list[MCItem], done: dict[str, dict]) -> dict:
  """Accuracy over the items that have predictions, overall and per task (sorted by task name).

  overall.accuracy counts failed items (video missing / undecodable, prompt too long) as wrong;
  overall.accuracy_answered is over the `answered` items only. `unanswered`: answers naming no option.
  `short_videos`: items whose video gave fewer distinct frames than requested (frames repeated).
  """
  per = collections.defaultdict(lambda: [0, 0])
  failed_per_task: dict[str, int] = collections.Counter()
  unanswered = short = 0
  for it in items:
    rec = done.get(it.id)
    if rec is None:
      continue
    short += int("frames_unique" in rec)
    per[it.task][0] += int(bool(rec["correct"]))
    per[it.task][1] += 1
    if rec.get("error") is not None:
      failed_per_task[it.task] += 1
    else:
      unanswered += int(rec["choice"] is None)
  correct, total = sum(c for c, _ in per.values()), sum(t for _, t in per.values())
  failed = sum(failed_per_task.values())
  acc = lambda c, t: round(100.0 * c / t, 2) if t else None  # noqa: E731
  return {
      "overall": {
          "accuracy": acc(correct, total),
          "correct": correct,
          "total": total,
          "failed": failed,
          "answered": total - failed,
          "accuracy_answered": acc(correct, total - failed),
      },
      "per_task": {k: {"accuracy": acc(c, t), "correct": c, "total": t} for k, (c, t) in sorted(per.items())},
      "failed_per_task": dict(sorted(failed_per_task.items())),
      "unanswered": unanswered,
      "short_videos": short,
      "items": len(items),
      "complete": total == len(items),
  }


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
    lines.append(
        f"{o['failed']} failed items (counted as wrong; reasons in {PREDICTIONS}); "
        f"accuracy over the {o['answered']} answered: {a}"
    )
  return "\n".join(lines)


def prepare_output(
    items: list[MCItem],
    output_dir: str,
    run: dict | None,
    *,
    force_new: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, dict]:
  """The predictions to continue from, after checking the folder holds only this tool's files made with the
  same settings and checkpoint as `run` (OutputError otherwise). force_new: set the old files aside first."""
  pred_path = os.path.join(output_dir, PREDICTIONS)
  done = prior_predictions(items, pred_path)
  prior_run = read_run(output_dir) if os.path.isdir(output_dir) else None
  if force_new:
    moved = set_aside(output_dir) if os.path.isdir(output_dir) else []
    if moved:
      log(f"--force-new-output: set aside {', '.join(moved)}")
    return {}
  if run is not None:
    check_resumable(done, prior_run, run, pred_path)
  return done


def evaluate(
    answer_fn: Callable[[MCItem, str, str], object],
    items: list[MCItem],
    video_root: str,
    output_dir: str,
    *,
    max_items: int | None = None,
    retry_failed: bool = False,
    log: Callable[[str], None] = lambda s: None,
    run: dict | None = None,
    prompt_fn: Callable[[MCItem], str] = format_prompt,
    force_new: bool = False,
) -> dict:
  """Runs `answer_fn(item, video_path, prompt)` on every item without a stored prediction.

  answer_fn returns the answer text, or (text, extra fields for the item's line), e.g. the frame counts of
  a short video ({"frames_requested", "frames_unique"}). prompt_fn: the item's prompt (a recipe's
  format_prompt; default mcq.format_prompt).
  An item whose video cannot be found or read, or whose prompt is too long, is stored as failed with the
  reason and the run goes on. Stored failures are kept on a rerun unless `retry_failed`.
  max_items: stop after this many new predictions (the rest is left for a later run).
  run: a `run_record`; it is written to run.json and results.json["run"], its recipe / frames / tokens /
    checkpoint hash / commit to every new line, and predictions made under another one are refused.
  force_new: set the folder's old files aside and start over (see `prepare_output`).
  Returns the summary over everything predicted so far; results.json is written also when interrupted.
  """
  done = prepare_output(items, output_dir, run, force_new=force_new, log=log)
  os.makedirs(output_dir, exist_ok=True)
  pred_path = os.path.join(output_dir, PREDICTIONS)
  if run is not None:
    _write_atomic(os.path.join(output_dir, RUN), json.dumps(run, indent=2))
  line_fields = {} if run is None else _line_fields(run)
  retry = [k for k, rec in done.items() if rec.get("error") is not None] if retry_failed else []
  for k in retry:
    del done[k]
  if done or retry or os.path.exists(pred_path):
    _rewrite_clean(pred_path, done)
  if done:
    failed = sum(rec.get("error") is not None for rec in done.values())
    log(
        f"resuming: {len(done)} of {len(items)} items already predicted"
        + (f" ({failed} recorded as failed; --retry-failed runs them again)" if failed else "")
    )
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
          answer = answer_fn(it, resolve_video(video_root, it.video), prompt_fn(it))
        except item_errors as e:
          reason = " ".join(str(e).split()) or type(e).__name__
          rec.update(prediction=None, choice=None, correct=False, error=reason)
          outcome = f"failed: {reason}"
        else:
          text, extra = answer if isinstance(answer, tuple) else (answer, {})
          choice = extract_choice(text, it.options)
          rec.update(prediction=text, choice=None if choice is None else LETTERS[choice], correct=choice == it.answer)
          rec.update(extra)
          outcome = f"{rec['choice']} (answer {rec['answer']})"
          if "frames_unique" in extra:
            outcome += f" [{extra['frames_unique']} distinct of {extra['frames_requested']} frames]"
        rec.update(line_fields)
        out.write(json.dumps(rec) + "\n")
        out.flush()
        done[it.id] = rec
        new += 1
        log(f"[{len(done)}/{len(items)}] {it.id}: {outcome}")  # after the write: a logged item is saved
  finally:
    summary = summarize(items, done)
    if run is not None:
      commits = sorted({str(rec["commit"]) for rec in done.values() if rec.get("commit") is not None})
      summary["run"] = {**run, "commits_in_predictions": commits}
    _write_atomic(os.path.join(output_dir, RESULTS), json.dumps(summary, indent=2))
  return summary


def short_video_warning(summary: dict, frames: int) -> str | None:
  """One line counting the items whose video gave fewer distinct frames than requested, or None."""
  n = summary.get("short_videos", 0)
  if not n:
    return None
  return (
      f"warning: {n} of {summary['overall']['total']} items had fewer distinct frames than the {frames} "
      f"requested (frames repeated by uniform sampling); see frames_unique in {PREDICTIONS}"
  )


def distinct_frames(timestamps) -> int:
  """Distinct sampled frames, from their timestamps [.., f] (index / fps, so equal only for a repeated index)."""
  return int(np.unique(np.asarray(timestamps).ravel()).size)


def model_answer_fn(
    chat,
    *,
    num_frames: int,
    max_new_tokens: int,
    prompt_for: Callable[[MCItem, np.ndarray], tuple[str, dict]] | None = None,
) -> Callable[[MCItem, str, str], tuple]:
  """Greedy answers from a `kangaroo_jax.inference.chat.Chat`: (text, {"frames_requested", "frames_unique"}
  when the video gave fewer distinct frames than `num_frames`, else {}).

  prompt_for(item, timestamps [f] seconds) -> (prompt, extra line fields): a prompt that depends on the
  sampled frames (subtitles at their times); it replaces the prompt evaluate passes.
  """

  def answer(item: MCItem, video: str, prompt: str) -> tuple[str, dict]:
    # Decodes the video; chat() below reuses it (Chat keeps the last video), so nothing is decoded twice.
    _, _, timestamps = chat.load_visual(video, num_frames, item.start, item.end)
    extra = {}
    if prompt_for is not None:
      prompt, extra = prompt_for(item, np.asarray(timestamps).ravel())
    text, _ = chat.chat(
        video,
        prompt,
        None,
        num_frames=num_frames,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        start=item.start,
        end=item.end,
    )
    unique = distinct_frames(timestamps)
    if unique < num_frames:
      extra = {**extra, "frames_requested": num_frames, "frames_unique": unique}
    return text, extra

  return answer


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m kangaroo_jax.evaluate",
      description=__doc__.split("\n\n")[0],
      epilog=compile_cache.HELP_EPILOG,
      formatter_class=HelpFormatter,
  )
  p.add_argument("ckpt_dir", help="from_pretrained folder")
  p.add_argument("--benchmark", required=True, help="benchmark JSON (MVBench / Video-MME shapes)")
  p.add_argument("--video-root", required=True, help="folder the items' video paths are relative to")
  p.add_argument(
      "--output",
      help="folder for predictions.jsonl and results.json (default: next to the " "benchmark, <name>_predictions/)",
  )
  p.add_argument(
      "--recipe",
      metavar="NAME",
      help=f"a benchmark recipe ({', '.join(RECIPES)}): its frames, prompt "
      "template and answer length (default: the mcq prompt, 64 frames, 16 new tokens)",
  )
  p.add_argument(
      "--subtitle-root",
      metavar="DIR",
      help="folder of <video name>.srt subtitle files, for a recipe " "with subtitles (videomme_subtitles)",
  )
  p.add_argument(
      "--num-frames",
      type=int,
      help="an even number of frames sampled uniformly from each video "
      "(default: the recipe's, else 64; overriding a recipe is recorded)",
  )
  p.add_argument(
      "--max-new-tokens",
      type=int,
      help="longest answer, in tokens, greedy decoding (default: the " "recipe's, else 16)",
  )
  p.add_argument("--max-items", type=int, help="stop after this many new items and resume later (default: no limit)")
  p.add_argument(
      "--retry-failed",
      action="store_true",
      help="run the items a previous run recorded as failed again (default: keep them as failed)",
  )
  p.add_argument(
      "--force-new-output",
      action="store_true",
      help="start over in --output even if its predictions were made with other settings or another "
      "checkpoint; the old files are kept, renamed with a UTC time stamp",
  )
  add_loading_args(p)
  return p


def subtitle_prompter(recipe: Recipe, subtitle_root: str) -> Callable[[MCItem, np.ndarray], tuple[str, dict]]:
  """prompt_for (see model_answer_fn) of a subtitles recipe: the lines of SUBTITLE_ROOT/<video name>.srt
  shown at the sampled frames (Video-MME's layout: subtitle/<videoID>.srt). A video without that file gets
  the recipe's 'no subtitles' text, as Video-MME's reference code does. Line field: subtitle_lines (None: no
  file)."""

  def prompt_for(item: MCItem, timestamps: np.ndarray) -> tuple[str, dict]:
    path = os.path.join(subtitle_root, os.path.splitext(os.path.basename(item.video))[0] + ".srt")
    lines = subtitles_at(read_srt(path), timestamps) if os.path.isfile(path) else None
    text = None if lines is None else "\n".join(lines)
    return (
        recipe.format_prompt(item.question, item.options, subtitles=text),
        {"subtitle_lines": None if lines is None else len(lines)},
    )

  return prompt_for


def resolve_settings(
    recipe_name: str | None, num_frames: int | None, max_new_tokens: int | None
) -> tuple[Recipe | None, Recipe, dict]:
  """(the named recipe or None, the settings used, {field: {"recipe": value, "used": value}} for flags that
  changed the recipe). Without a recipe the settings are recipes.DEFAULT with the flags applied."""
  recipe = None if recipe_name is None else get_recipe(recipe_name)
  base = recipe or DEFAULT
  given = {k: v for k, v in (("num_frames", num_frames), ("max_new_tokens", max_new_tokens)) if v is not None}
  overrides = {
      k: {"recipe": getattr(base, k), "used": v}
      for k, v in given.items()
      if recipe is not None and getattr(base, k) != v
  }
  return recipe, base.replace(**given), overrides


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  output = args.output or os.path.splitext(args.benchmark)[0] + "_predictions"
  pred_path = os.path.join(output, PREDICTIONS)
  log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
  try:
    base = DEFAULT if args.recipe is None else get_recipe(args.recipe)
    args.num_frames = base.num_frames if args.num_frames is None else args.num_frames
    args.max_new_tokens = base.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    check_generation_args(args)  # before Recipe's own checks, so errors name the flag
    if args.max_items is not None and args.max_items < 0:
      raise UsageError(f"--max-items must be >= 0, got {args.max_items}")
    if not os.path.isdir(args.video_root):
      raise UsageError(f"--video-root {args.video_root}: no such folder")
    if os.path.exists(output) and not os.path.isdir(output):
      raise UsageError(f"--output {output}: is a file; expected a folder")
    recipe, settings, overrides = resolve_settings(args.recipe, args.num_frames, args.max_new_tokens)
    if settings.subtitles and args.subtitle_root is None:
      raise UsageError(f"--recipe {settings.name} needs --subtitle-root (the folder of the <video name>.srt files)")
    if args.subtitle_root is not None and not settings.subtitles:
      raise UsageError(
          f"--subtitle-root is only used by a recipe with subtitles (e.g. videomme_subtitles), " f"not {settings.name}"
      )
    if args.subtitle_root is not None and not os.path.isdir(args.subtitle_root):
      raise UsageError(f"--subtitle-root {args.subtitle_root}: no such folder")
    items = load_benchmark(args.benchmark)
    prior_predictions(items, pred_path)  # a foreign or mismatched file fails now, not after loading the model
    compile_cache.enable()  # before the first compile, which opens the cache
    if not os.path.isfile(os.path.join(args.ckpt_dir, "config.json")):  # a released (Hugging Face) folder has one
      load_config(args.ckpt_dir)  # a folder that is no checkpoint fails before all its files are hashed
    prior_run = read_run(output) if os.path.isdir(output) and not args.force_new_output else None
    try:
      checkpoint = checkpoint_hash(args.ckpt_dir, cached=prior_run and prior_run.get("checkpoint"))
    except OSError as e:
      raise UsageError(f"{args.ckpt_dir}: cannot read the checkpoint to hash it: {e}") from None
    run = run_record(recipe, settings, overrides, checkpoint)
    if args.subtitle_root is not None:
      run["subtitle_root"] = os.path.abspath(args.subtitle_root)
    prepare_output(items, output, run, force_new=args.force_new_output, log=log)  # refuses before the model loads
    for field, change in overrides.items():
      log(f"recipe {recipe.name}: {field} {change['recipe']} overridden to {change['used']} (recorded in {RUN})")
    model, tokenizer, scope = load_from_args(args)
    with scope:
      chat = Chat(
          model,
          tokenizer,
          prefill_chunk=args.prefill_chunk,
          max_positions=args.max_positions,
          warn=lambda s: print(f"warning: {s}", file=sys.stderr, flush=True),
      )
      prompt_fn = format_prompt if recipe is None else (lambda it: settings.format_prompt(it.question, it.options))
      prompt_for = subtitle_prompter(settings, args.subtitle_root) if settings.subtitles else None
      answer_fn = model_answer_fn(
          chat, num_frames=settings.num_frames, max_new_tokens=settings.max_new_tokens, prompt_for=prompt_for
      )
      summary = evaluate(
          answer_fn,
          items,
          args.video_root,
          output,
          max_items=args.max_items,
          retry_failed=args.retry_failed,
          log=log,
          run=run,
          prompt_fn=prompt_fn,
      )
  except INPUT_ERRORS + (BenchmarkError, OutputError, RecipeError) as e:
    return report_input_error(e)
  except KeyboardInterrupt:
    try:
      saved = len(read_predictions(pred_path))
    except OutputError:  # the run was stopped before it checked this file
      saved = 0
    print(
        f"\ninterrupted: {saved} items are saved in {pred_path}; run the same command again to resume",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_INTERRUPTED
  print(table(summary))
  print(json.dumps(summary))
  warning = short_video_warning(summary, settings.num_frames)
  if warning:
    log(warning)
  return 0


if __name__ == "__main__":
  sys.exit(main())
