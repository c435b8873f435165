"""Video needle-in-a-haystack (V-NIAH, as LongVA runs it): accuracy over haystack length x needle depth.

    python -m kangaroo_jax.niah CKPT_DIR --haystack VIDEO --needle IMAGE_OR_CLIP --question "..." --answer "..." \\
        [--options TEXT TEXT ...] --lengths 64,256,1024 --depths 0,0.25,0.5,0.75,1 --output DIR

For each length L, L frames are sampled uniformly from the haystack (kangaroo_jax.data.video, as chat samples
a video) and resized as chat does; for each depth d the needle's n frames (an image repeated, or a clip
sampled to n frames, --needle-frames) replace the frames from round(d * (L - n)) on
(kangaroo_jax.inference.niah_layout), keeping their timestamps. The model then answers the question
greedily. With --options the prompt is the multiple-choice one of kangaroo_jax.evaluate and the chosen
letter is extracted the same way; without, the answer counts when --answer appears in it (case-insensitive;
"exact" when it is the whole answer).

DIR holds results.jsonl (one record per (length, depth), with the frame indices the needle occupies),
summary.json (accuracy per cell, length and depth) and heatmap.png (needs matplotlib: the `eval` extra).
Each file is written to a temporary file and renamed. A rerun skips the cells already in results.jsonl, so a
longer --lengths list computes only the new cells; cells that failed (prompt past --max-positions, out of
device memory, undecodable haystack) are kept as failed unless --retry-failed (e.g. with a larger
--max-positions, which is not one of the settings a resumed run must keep). DIR files this tool did not
write, or results of other settings (question, needle, checkpoint, ...), are refused, never overwritten.
A haystack with fewer frames than a length repeats frames: that is warned about and recorded
(`duplicated`, `haystack_frames_available`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
from typing import Callable

import numpy as np

from kangaroo_jax import compile_cache
from kangaroo_jax.cli_help import HelpFormatter
from kangaroo_jax.data.video import (IMAGE_EXTENSIONS, VideoError, load_video, normalize_frames, preprocess_frames)
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
from kangaroo_jax.inference.mcq import LETTERS, BenchmarkError, _parse_item, extract_choice, format_prompt
from kangaroo_jax.inference.niah_layout import needle_indices, place_needle

TOOL = "kangaroo_jax.niah"  # every file this tool writes says so; others in DIR are never overwritten
RESULTS = "results.jsonl"
SUMMARY = "summary.json"
HEATMAP = "heatmap.png"
RECORD_KEYS = ("tool", "length", "depth", "correct", "setup")
PNG_SOURCE_KEY = "Source"  # PNG text chunk naming the tool that drew the heatmap


class OutputError(ValueError):
  """An output folder this tool cannot write into (a file not its own, results of other settings)."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """What decides a cell's answer; every record stores it, and a resumed run must match it."""

  checkpoint: str
  haystack: str
  needle: str
  needle_frames: int
  align: int
  question: str
  answer: str
  options: tuple[str, ...] | None
  max_new_tokens: int
  param_dtype: str | None = None

  def as_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["options"] = None if self.options is None else list(self.options)
    return d


class FramesChat(Chat):
  """A Chat that answers about frames held in memory (`show`) instead of a video file; the path it is given
  is only a label. The last frames' visual tokens are kept, so asking twice encodes once."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._shown: tuple | None = None
    self._encoded: tuple | None = None  # (key, visual tokens [1, n_vis, embed])

  def show(self, key, frames: np.ndarray, timestamps: np.ndarray) -> None:
    """key: any hashable naming these frames; frames float32 [f, S, S, 3] normalised; timestamps [f] seconds."""
    self._shown = (key, frames, np.asarray(timestamps, np.float32))

  def visual_tokens(self, path, num_frames, start=None, end=None):
    if self._shown is None:
      raise ValueError("FramesChat: call show(key, frames, timestamps) before asking about frames")
    key, frames, timestamps = self._shown
    if self._encoded is None or self._encoded[0] != key:
      self._encoded = (key, self.engine.encode_frames(frames[None], timestamps[None]))
    return key, self._encoded[1], frames.shape[:3]


# --- frames -------------------------------------------------------------------------------------------------------


def to_model_size(frames_uint8: np.ndarray, model_cfg) -> np.ndarray:
  """uint8 [f, h, w, 3] -> uint8 [f, S, S, 3], resized as chat resizes a video for this model."""
  return preprocess_frames(frames_uint8, model_cfg.vision.image_size, patch_size=model_cfg.vision.patch_size)


def load_needle(path: str, needle_frames: int) -> np.ndarray:
  """uint8 [needle_frames, h, w, 3]: an image repeated, or a clip sampled uniformly to needle_frames frames."""
  if path.lower().endswith(IMAGE_EXTENSIONS):
    image = load_video(path).frames[:1]
    return np.repeat(image, needle_frames, axis=0)
  return load_video(path, num_frames=needle_frames).frames[:needle_frames]  # an odd count came back padded


@dataclasses.dataclass(frozen=True)
class Haystack:
  """frames uint8 [length, h, w, 3], timestamps float32 [length]; `available`: the video's frame count when
  it has fewer than `length` (every frame was used, some more than once), else None (at least `length`)."""

  frames: np.ndarray
  timestamps: np.ndarray
  available: int | None


def load_haystack(path: str, length: int) -> Haystack:
  decoded = load_video(path, num_frames=length)
  frames, timestamps, indices = decoded.frames, decoded.timestamps, decoded.indices
  if len(frames) < length:  # an image haystack is 2 frames whatever num_frames says: stretch it the same way
    pick = np.minimum(np.floor((np.arange(length) + 0.5) * len(frames) / length).astype(np.int64), len(frames) - 1)
    frames, timestamps, indices = frames[pick], timestamps[pick], indices[pick]
  distinct = len(np.unique(indices))
  # Uniform sampling of more frames than the video has hits every frame, so `distinct` is then its count.
  return Haystack(frames[:length], timestamps[:length], distinct if distinct < length else None)


# --- scoring ------------------------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
  return " ".join(text.casefold().split())


def score(prediction: str, setup: Setup) -> dict:
  """{"correct", and "choice" (the letter picked, or None) with options, else "match": exact/substring/None}."""
  if setup.options is not None:
    item = mc_item(setup)
    choice = extract_choice(prediction, item.options)
    return {"choice": None if choice is None else LETTERS[choice], "correct": choice == item.answer}
  said, want = _normalise(prediction), _normalise(setup.answer)
  if said.strip(" .!?,;:'\"") == want:
    return {"match": "exact", "correct": True}
  return {"match": "substring" if want in said else None, "correct": want in said}


def mc_item(setup: Setup):
  """The multiple-choice item of --question / --options / --answer (answer: a letter or an option's text)."""
  return _parse_item(
      {"question": setup.question, "options": list(setup.options), "answer": setup.answer, "video": setup.haystack},
      where="--options / --answer",
      task="niah",
      index=0,
  )


def prompt_for(setup: Setup) -> str:
  return format_prompt(mc_item(setup)) if setup.options is not None else setup.question


# --- the output folder --------------------------------------------------------------------------------------------


def _write_atomic(out_dir: str, name: str, write: Callable) -> None:
  """write(file object) into a fresh temporary file in out_dir, then renamed to `name`; never a half file."""
  fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".niah-", suffix=".tmp")
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, os.path.join(out_dir, name))
  except BaseException:
    os.unlink(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0o22)  # reading the umask means setting it; put it straight back
  os.umask(mask)
  return mask


def _differences(stored: dict, setup: dict) -> list[str]:
  return [k for k in sorted(set(stored) | set(setup)) if stored.get(k) != setup.get(k)]


def read_results(out_dir: str, setup: Setup) -> dict[tuple[int, float], dict]:
  """The records already in out_dir, by (length, depth), after checking every file there this tool would write.

  OutputError (one line, naming the file) when out_dir is a file, a file is not this tool's, or the records
  were computed with other settings.
  """
  if not os.path.exists(out_dir):
    return {}
  if not os.path.isdir(out_dir):
    raise OutputError(f"--output {out_dir}: is a file; expected a folder")
  _check_own_summary(os.path.join(out_dir, SUMMARY))
  _check_own_heatmap(os.path.join(out_dir, HEATMAP))
  path = os.path.join(out_dir, RESULTS)
  if not os.path.exists(path):
    return {}
  if not os.path.isfile(path):
    raise OutputError(f"{path}: is not a file; use another --output folder")
  done: dict[tuple[int, float], dict] = {}
  want = setup.as_json()
  with open(path, encoding="utf-8", errors="replace") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        rec = None
      if not (isinstance(rec, dict) and rec.get("tool") == TOOL and all(k in rec for k in RECORD_KEYS)):
        raise OutputError(f"{path}: line {i} is not a record of {TOOL}; use another --output folder")
      differ = _differences(rec["setup"], want) if isinstance(rec["setup"], dict) else ["setup"]
      if differ:
        raise OutputError(
            f"{path}: line {i} was computed with other settings (differing: {', '.join(differ)}); "
            "use another --output folder or the same settings"
        )
      done[(int(rec["length"]), float(rec["depth"]))] = rec
  return done


def _check_own_summary(path: str) -> None:
  if not os.path.lexists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      ours = json.load(f).get("tool") == TOOL
  except (OSError, ValueError, AttributeError):
    ours = False
  if not ours:
    raise OutputError(f"{path}: not written by {TOOL}; refusing to overwrite it (use another --output folder)")


def _check_own_heatmap(path: str) -> None:
  if not os.path.lexists(path):
    return
  from PIL import Image

  try:
    with Image.open(path) as im:
      ours = im.format == "PNG" and im.text.get(PNG_SOURCE_KEY) == TOOL
  except Exception:  # noqa: BLE001  whatever Pillow raises for a file that is not a PNG
    ours = False
  if not ours:
    raise OutputError(f"{path}: not written by {TOOL}; refusing to overwrite it (use another --output folder)")


def write_results(out_dir: str, done: dict[tuple[int, float], dict]) -> None:
  text = "".join(json.dumps(done[k]) + "\n" for k in sorted(done))
  _write_atomic(out_dir, RESULTS, lambda f: f.write(text.encode()))


# --- summary and heatmap ------------------------------------------------------------------------------------------


def _percent(correct: int, total: int) -> float | None:
  return round(100.0 * correct / total, 2) if total else None


def _cell_percent(rec: dict) -> float | None:
  return None if rec.get("error") is not None else 100.0 * bool(rec["correct"])


def summarize(done: dict[tuple[int, float], dict], setup: Setup) -> dict:
  """Accuracy (%) per cell ("grid"[length][depth]: 100, 0 or None for a failed cell), per length and per depth
  (over answered cells), and overall ("accuracy" counts failed cells as wrong, "accuracy_answered" leaves them
  out), over every cell in results.jsonl."""
  lengths = sorted({k[0] for k in done})
  depths = sorted({k[1] for k in done})
  answered = {k: r for k, r in done.items() if r.get("error") is None}

  def over(keys):
    keys = [k for k in keys if k in answered]
    return _percent(sum(bool(answered[k]["correct"]) for k in keys), len(keys))

  correct = sum(bool(r["correct"]) for r in answered.values())
  return {
      "tool": TOOL,
      "setup": setup.as_json(),
      "lengths": lengths,
      "depths": depths,
      "grid": {str(n): {str(d): _cell_percent(done[(n, d)]) for d in depths if (n, d) in done} for n in lengths},
      "by_length": {str(n): over([(n, d) for d in depths]) for n in lengths},
      "by_depth": {str(d): over([(n, d) for n in lengths]) for d in depths},
      "accuracy": _percent(correct, len(done)),
      "accuracy_answered": _percent(correct, len(answered)),
      "correct": correct,
      "cells": len(done),
      "failed": len(done) - len(answered),
      "duplicated_lengths": sorted({k[0] for k, r in done.items() if r.get("duplicated")}),
  }


def heatmap_pixels(num_lengths: int, num_depths: int) -> tuple[int, int]:
  """(width, height) of heatmap.png in pixels: a fixed frame plus a fixed size per cell."""
  return 240 + 80 * num_lengths, 150 + 40 * num_depths


HEATMAP_DPI = 100


def draw_heatmap(summary: dict, out_dir: str) -> None:
  """heatmap.png: rows = needle depth (0 at the top), columns = haystack length; colour = accuracy, grey = failed."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.colors import ListedColormap
  from matplotlib.figure import Figure

  lengths, depths = summary["lengths"], summary["depths"]
  values = np.full((len(depths), len(lengths)), np.nan)
  labels = [["" for _ in lengths] for _ in depths]
  failed = np.zeros(values.shape, bool)
  for j, n in enumerate(lengths):
    for i, d in enumerate(depths):
      if str(d) not in summary["grid"][str(n)]:
        continue  # not computed (yet)
      acc = summary["grid"][str(n)][str(d)]
      if acc is None:
        failed[i, j], labels[i][j] = True, "failed"
      else:
        values[i, j], labels[i][j] = acc, f"{acc:.0f}"
  w, h = heatmap_pixels(len(lengths), len(depths))
  fig = Figure(figsize=(w / HEATMAP_DPI, h / HEATMAP_DPI), dpi=HEATMAP_DPI, layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.imshow(np.where(failed, 1.0, np.nan), cmap=ListedColormap(["#bbbbbb"]), vmin=0, vmax=1, aspect="auto")
  image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
  for i in range(len(depths)):
    for j in range(len(lengths)):
      ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8)
  repeats = set(summary["duplicated_lengths"])
  ax.set_xticks(range(len(lengths)), [f"{n}\n(repeats)" if n in repeats else str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
  ax.set_xlabel("haystack length (frames)")
  ax.set_ylabel("needle depth")
  acc, failed_cells = summary["accuracy"], summary["failed"]
  ax.set_title(
      f"V-NIAH: {'-' if acc is None else f'{acc:.1f}%'} of {summary['cells']} cells correct"
      + (f", {failed_cells} failed" if failed_cells else ""),
      fontsize=9,
  )
  fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03)
  _write_atomic(
      out_dir, HEATMAP, lambda f: fig.savefig(f, format="png", dpi=HEATMAP_DPI, metadata={PNG_SOURCE_KEY: TOOL})
  )


def write_outputs(out_dir: str, done: dict, setup: Setup, *, plot: bool = True) -> dict:
  summary = summarize(done, setup)
  _write_atomic(out_dir, SUMMARY, lambda f: f.write(json.dumps(summary, indent=2).encode()))
  if plot and done:
    draw_heatmap(summary, out_dir)
  return summary


# --- the run ------------------------------------------------------------------------------------------------------


def _cell_errors() -> tuple[type[BaseException], ...]:
  """What fails one cell (or one length's cells) without ending the run."""
  import av
  import jax

  return (VideoError, OSError, PromptTooLong, av.error.FFmpegError, jax.errors.JaxRuntimeError)


def _reason(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  if "RESOURCE_EXHAUSTED" in text:
    return "out of device memory: " + text[:300]
  return text


def _answer_cell(
    chat: FramesChat,
    setup: Setup,
    prompt: str,
    needle: np.ndarray,
    hay: Haystack,
    length: int,
    depth: float,
    errors: tuple,
) -> dict:
  """One cell's record fields past its key: where the needle went, and the answer and its score (or the error).

  needle uint8 [n, S, S, 3] and hay.frames uint8 [length, S, S, 3] are at the model's frame size.
  """
  where = needle_indices(length, depth, setup.needle_frames, setup.align)
  rec = {
      "needle_indices": where,
      "needle_seconds": [round(float(hay.timestamps[where[0]]), 4), round(float(hay.timestamps[where[-1]]), 4)],
      "duplicated": hay.available is not None,
      "haystack_frames_available": hay.available,
  }
  try:
    chat.show(("niah", length, depth), normalize_frames(place_needle(hay.frames, needle, where[0])), hay.timestamps)
    text, _ = chat.chat(
        f"niah:{length}@{depth}", prompt, None, num_frames=length, max_new_tokens=setup.max_new_tokens, do_sample=False
    )
  except errors as e:
    return {**rec, "prediction": None, "correct": False, "error": _reason(e)}
  return {**rec, "prediction": text, "prompt_tokens": chat.last_prefill_tokens, **score(text, setup)}


def run(
    chat: FramesChat,
    setup: Setup,
    lengths: list[int],
    depths: list[float],
    out_dir: str,
    *,
    retry_failed: bool = False,
    plot: bool = True,
    log: Callable[[str], None] = lambda s: None,
    warn: Callable[[str], None] = lambda s: None,
) -> dict:
  """Answers every (length, depth) cell not yet in out_dir/results.jsonl; returns the summary of all cells there.

  results.jsonl is rewritten after each cell, summary.json and heatmap.png at the end (also when interrupted).
  A haystack that cannot be decoded at some length fails that length's cells; the other lengths still run.
  """
  done = read_results(out_dir, setup)
  os.makedirs(out_dir, exist_ok=True)
  if retry_failed:
    kept = {k: r for k, r in done.items() if r.get("error") is None}
    if len(kept) < len(done):
      log(f"retrying {len(done) - len(kept)} failed cells")
    done = kept
  todo = [(n, d) for n in lengths for d in depths if (n, d) not in done]
  if done:
    log(f"resuming: {len(done)} cells already in {os.path.join(out_dir, RESULTS)}, {len(todo)} to compute")
  needle = to_model_size(load_needle(setup.needle, setup.needle_frames), chat.model.cfg)
  prompt = prompt_for(setup)
  errors = _cell_errors()
  try:
    for length in lengths:
      cells = [d for d in depths if (length, d) in todo]
      if not cells:
        continue
      try:
        hay = load_haystack(setup.haystack, length)
        # Full-size frames are dropped here: a long haystack at video resolution would hold gigabytes.
        hay, failure = dataclasses.replace(hay, frames=to_model_size(hay.frames, chat.model.cfg)), None
      except errors as e:
        hay, failure = None, _reason(e)
      if hay is not None and hay.available is not None:
        warn(
            f"{setup.haystack} has only {hay.available} frames; the {length}-frame haystack repeats frames "
            "(recorded as duplicated)"
        )
      for depth in cells:
        rec = {"tool": TOOL, "length": length, "depth": depth}
        if hay is None:
          rec.update(
              needle_indices=needle_indices(length, depth, setup.needle_frames, setup.align),
              prediction=None,
              correct=False,
              error=failure,
          )
        else:
          rec.update(_answer_cell(chat, setup, prompt, needle, hay, length, depth, errors))
        rec["setup"] = setup.as_json()
        done[(length, depth)] = rec
        write_results(out_dir, done)
        where = rec["needle_indices"]
        outcome = f"failed: {rec['error']}" if "error" in rec else ("correct" if rec["correct"] else "wrong")
        log(f"[{len(done)} cells] length {length}, depth {depth:g} (frames {where[0]}-{where[-1]}): {outcome}")
  finally:
    summary = write_outputs(out_dir, done, setup, plot=plot)
  return summary


# --- command line -------------------------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or any(v < 2 or v % 2 for v in values):
    raise UsageError(
        f"--lengths must be comma-separated positive even frame counts (frames are encoded in " f"pairs), got {text!r}"
    )
  return sorted(dict.fromkeys(values))


def parse_depths(text: str) -> list[float]:
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or any(not 0.0 <= v <= 1.0 for v in values):  # NaN fails both comparisons
    raise UsageError(f"--depths must be comma-separated numbers in [0, 1], got {text!r}")
  return sorted(dict.fromkeys(values))


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=f"python -m {TOOL}",
      description=__doc__.split("\n\n")[0],
      epilog=compile_cache.HELP_EPILOG,
      formatter_class=HelpFormatter,
  )
  p.add_argument("ckpt_dir", help="from_pretrained folder")
  p.add_argument("--haystack", required=True, help="video (or folder of frames) the needle is hidden in")
  p.add_argument("--needle", required=True, help="image, or short clip, to hide")
  p.add_argument("--question", required=True, help="question about the needle")
  p.add_argument(
      "--answer",
      required=True,
      help="expected answer: text that must appear in the model's answer, "
      "or with --options a letter or an option's text",
  )
  p.add_argument(
      "--options",
      nargs="+",
      metavar="TEXT",
      help="answer options: a multiple-choice question " "(default: none, an open question)",
  )
  p.add_argument("--lengths", default="64,256,1024", help="haystack lengths in frames, comma-separated, even")
  p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1], comma-separated")
  p.add_argument(
      "--needle-frames",
      type=int,
      default=2,
      help="frames the needle occupies (an image is "
      "repeated, a clip sampled uniformly); patchify averages frame pairs, so keep it even",
  )
  p.add_argument(
      "--align",
      type=int,
      default=1,
      help="round the needle's first frame to a multiple of this " "(2 keeps a 2-frame needle in one patchify group)",
  )
  p.add_argument("--output", required=True, help="folder for results.jsonl, summary.json and heatmap.png")
  p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer, in tokens (greedy decoding)")
  p.add_argument(
      "--retry-failed",
      action="store_true",
      help="compute the cells a previous run recorded as failed again (default: keep them)",
  )
  p.add_argument("--no-plot", action="store_true", help="skip heatmap.png (then matplotlib is not needed)")
  add_loading_args(p)
  return p


def _check_args(args) -> tuple[Setup, list[int], list[float]]:
  lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
  check_generation_args(argparse.Namespace(**vars(args), num_frames=lengths[0]))
  for name, value in (("--question", args.question), ("--answer", args.answer)):
    if not value.strip():
      raise UsageError(f"{name} must be non-empty")
  if not 1 <= args.needle_frames <= lengths[0]:
    raise UsageError(f"--needle-frames must be in [1, {lengths[0]}] (the shortest --lengths), got {args.needle_frames}")
  if args.align < 1:
    raise UsageError(f"--align must be >= 1, got {args.align}")
  if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
    raise UsageError("the heatmap needs matplotlib (pip install 'kangaroo-jax[plot]'), or pass --no-plot")
  setup = Setup(
      checkpoint=os.path.abspath(args.ckpt_dir),
      haystack=os.path.abspath(args.haystack),
      needle=os.path.abspath(args.needle),
      needle_frames=args.needle_frames,
      align=args.align,
      question=args.question,
      answer=args.answer,
      options=None if args.options is None else tuple(args.options),
      max_new_tokens=args.max_new_tokens,
      param_dtype=args.param_dtype,
  )
  if setup.options is not None:
    mc_item(setup)  # BenchmarkError naming --answer when it is no option
  load_video(setup.haystack, num_frames=2)  # a missing or unreadable haystack fails now, not per length
  load_needle(setup.needle, setup.needle_frames)
  return setup, lengths, depths


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  stderr = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
  try:
    setup, lengths, depths = _check_args(args)
    read_results(args.output, setup)  # a foreign or mismatched folder fails now, not after loading the model
    compile_cache.enable()
    model, tokenizer, scope = load_from_args(args)
    with scope:
      chat = FramesChat(
          model,
          tokenizer,
          prefill_chunk=args.prefill_chunk,
          max_positions=args.max_positions,
          warn=lambda s: stderr(f"warning: {s}"),
      )
      try:
        summary = run(
            chat,
            setup,
            lengths,
            depths,
            args.output,
            retry_failed=args.retry_failed,
            plot=not args.no_plot,
            log=stderr,
            warn=lambda s: stderr(f"warning: {s}"),
        )
      except OSError as e:  # cells catch their own read errors: this is the output folder (read-only, disk full)
        raise OutputError(f"--output {args.output}: cannot write: {e.strerror or e}") from None
  except INPUT_ERRORS + (BenchmarkError, OutputError) as e:
    return report_input_error(e)
  except KeyboardInterrupt:
    stderr(
        f"\ninterrupted: finished cells are saved in {os.path.join(args.output, RESULTS)}; run the same command "
        "again to resume"
    )
    return EXIT_INTERRUPTED
  print(
      json.dumps(
          {
              k: summary[k]
              for k in ("accuracy", "accuracy_answered", "correct", "cells", "failed", "by_length", "by_depth")
          }
      )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
