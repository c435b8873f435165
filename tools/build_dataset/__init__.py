"""`python -m tools.build_dataset MANIFEST.jsonl OUT_DIR`: JSONL manifest -> ArrayRecord shards.

Each usable row becomes one record (kangaroo_jax.data.records): its video is decoded with the configured
sampling, resized with the released transform and stored as JPEG (or raw uint8) frames, or, with
`--reference`, only the path is stored and decoding happens in the training pipeline. Bad rows (malformed
JSON / fields / text, clip times out of range, missing / corrupt / truncated / empty / oversized videos and
images) are skipped, counted by reason and listed in summary.json.

The build stops, keeping any previous dataset in OUT_DIR intact, once the skipped fraction exceeds
--max-skip-rate: as soon as that is certain (more rows skipped than the rate allows for the whole
manifest) or clear (after --skip-check-min-rows rows, a skipped fraction more than 3 standard errors
above the rate). Shards are written to a folder beside OUT_DIR and swapped in only when complete (see
staging.py); every stop (complete, skip rate, error, interrupt) writes a summary.json with its reason.
Exit status: 0 complete, 1 stopped (skip rate or an error while writing), 2 bad arguments, manifest or
OUT_DIR, 130 interrupted.

With --tfds the same records are written as the TFDS dataset `kangaroo_video_qa` instead (tfds_output.py:
declared features, dataset_info.json, ArrayRecord shards, one split per manifest: the positional one is
--split, default train; add more with --add-split NAME=MANIFEST), with the same skip accounting and swap.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import re
import sys

from kangaroo_jax.cli_help import HelpFormatter
from kangaroo_jax.data.manifest import ManifestError, ManifestRow, parse_row
from kangaroo_jax.data.records import FRAME_FORMATS, encode_frames, pack_record
from kangaroo_jax.data.video import ClipRangeError, VideoError, load_video, preprocess_frames
from tools.build_dataset import staging
from tools.build_dataset.staging import OutputError

log = logging.getLogger("build_dataset")
_MAX_EXAMPLES = 20  # skipped rows listed per reason in summary.json
_SPLIT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class BuildInputError(ValueError):
  """A bad argument or an unreadable manifest; the message names it (CLI exit 2)."""


class SkipRateExceeded(RuntimeError):
  """Too many rows were skipped; the message gives the counts and the summary.json to read (CLI exit 1)."""


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  size: int = 448
  keep_aspect: bool = False
  patch_size: int = 14
  num_frames: int | None = 16
  fps: float | None = None
  max_frames: int | None = None
  frames_fps: float = 1.0
  frame_format: str = "jpeg"
  quality: int = 95
  reference: bool = False


def shard_paths(out_dir: str, num_shards: int) -> list[str]:
  return [os.path.join(out_dir, f"data-{i:05d}-of-{num_shards:05d}.array_record") for i in range(num_shards)]


def _convert(args) -> tuple[str, bytes | None, str]:
  """(line_no, line bytes, manifest, options) -> (reason, record bytes or None, detail). Never raises: any
  failure of one row is that row's skip reason, so no row can end the build."""
  line_no, line, manifest, opt = args
  try:
    row: ManifestRow = parse_row(line, line_no=line_no, manifest_path=manifest)
  except ManifestError as e:
    return "malformed_row", None, str(e)
  except Exception as e:  # noqa: BLE001
    return "malformed_row", None, f"{manifest}:{line_no}: {type(e).__name__}: {e}"
  try:
    return "ok", _record(row, opt), ""
  except ClipRangeError as e:
    return "start_past_end", None, f"{row.id}: {e}"
  except VideoError as e:
    return ("missing_video" if "no such file" in str(e) else "bad_video"), None, f"{row.id}: {e}"
  except Exception as e:  # noqa: BLE001  e.g. a decoder failing in a way nobody anticipated
    return "unexpected_error", None, f"{row.id}: {row.path}: {type(e).__name__}: {e}"


def _record(row: ManifestRow, opt: BuildOptions) -> bytes:
  sample = {"id": row.id, "messages": row.messages}
  if opt.reference:
    if not os.path.exists(row.path):
      raise VideoError(f"{row.path}: no such file or folder")
    sample["video"] = {"path": row.path, "start": row.start, "end": row.end}
    return pack_record(sample)
  v = load_video(
      row.path,
      num_frames=opt.num_frames,
      fps=opt.fps,
      max_frames=opt.max_frames,
      start=row.start,
      end=row.end,
      frames_fps=opt.frames_fps,
  )
  frames = preprocess_frames(v.frames, opt.size, keep_aspect=opt.keep_aspect, patch_size=opt.patch_size)
  sample["frames"] = encode_frames(frames, opt.frame_format, opt.quality)
  sample["timestamps"] = [float(t) for t in v.timestamps]
  return pack_record(sample)


def skip_rate_verdict(skipped: int, processed: int, total: int, max_skip_rate: float, min_rows: int) -> str | None:
  """Why the build must stop now, or None. Certain: more rows skipped than `max_skip_rate` allows of all
  `total`. Clear: after `min_rows`, a skipped fraction over the rate by more than 3 binomial standard errors
  (at a 5% rate: 11.5% after 100 rows, 7.1% after 1,000), so chance alone almost never stops a good build."""
  if skipped > max_skip_rate * total:
    done = "" if processed >= total else f" after {processed}"
    return (
        f"{skipped} of the manifest's {total} rows skipped{done} ({skipped / total:.1%} of all rows > "
        f"--max-skip-rate {max_skip_rate:.1%})"
    )
  if processed >= min_rows and max_skip_rate < 1:
    margin = 3 * math.sqrt(max_skip_rate * (1 - max_skip_rate) / processed)
    if skipped / processed > max_skip_rate + margin:
      return (
          f"{skipped} of the first {processed} rows skipped ({skipped / processed:.1%}, clearly above "
          f"--max-skip-rate {max_skip_rate:.1%}: by more than 3 standard errors)"
      )
  return None


def _read_manifest(manifest: str) -> list[tuple[int, bytes]]:
  """(line number, line) of every non-blank line; bytes, so one line of bad UTF-8 is one bad row."""
  try:
    with open(manifest, "rb") as f:
      lines = [(i + 1, ln) for i, ln in enumerate(f) if ln.strip()]
  except OSError as e:
    raise BuildInputError(f"{manifest}: cannot read the manifest ({e.strerror or e})") from None
  if not lines:
    raise BuildInputError(f"{manifest}: the manifest holds no rows")
  return lines


def _check_args(opt: BuildOptions, num_shards, workers, max_skip_rate, skip_check_min_rows) -> None:
  if opt.frame_format not in FRAME_FORMATS:
    raise BuildInputError(f"--frame-format must be one of {FRAME_FORMATS}, got {opt.frame_format!r}")
  checks = [
      ("--shards", num_shards, 1, 99999),
      ("--workers", workers, 0, 1024),
      ("--size", opt.size, 1, 1 << 15),
      ("--skip-check-min-rows", skip_check_min_rows, 1, None),
      ("--quality", opt.quality, 1, 100),
  ]
  for flag, value, low, high in checks:
    if not isinstance(value, int) or value < low or (high is not None and value > high):
      raise BuildInputError(
          f"{flag} must be an integer in [{low}, {high if high is not None else 'inf'}], " f"got {value!r}"
      )
  if not (isinstance(max_skip_rate, (int, float)) and 0.0 <= max_skip_rate <= 1.0):
    raise BuildInputError(f"--max-skip-rate must be a fraction in [0, 1], got {max_skip_rate!r}")


@dataclasses.dataclass
class _Tally:
  written: int = 0
  processed: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
  split_written: dict = dataclasses.field(default_factory=dict)  # --tfds: rows written per split

  def skip(self, reason: str, detail: str) -> None:
    self.skipped[reason] += 1
    if len(self.examples[reason]) < _MAX_EXAMPLES:
      self.examples[reason].append(detail)
    log.warning("skipped (%s): %s", reason, detail)


class _Converter:
  """`convert(lines, manifest, opt)` -> iterator of `_convert` results in line order (a process pool when
  workers > 0). Used as a context manager; the pool is terminated, not drained, unless `finished` was set
  (close() + join() would first convert every row still queued)."""

  def __init__(self, workers: int):
    self.pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
    self.finished = False

  def __call__(self, lines, manifest, opt):
    jobs = ((n, ln, manifest, opt) for n, ln in lines)
    return self.pool.imap(_convert, jobs, chunksize=4) if self.pool else map(_convert, jobs)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.pool:
      if self.finished:
        self.pool.close()
      else:
        self.pool.terminate()
      self.pool.join()


def _write_shards(lines, manifest, opt, paths, convert, verdict, bar, tally: _Tally) -> str | None:
  """Converts every row into the shards at `paths` (round robin, which keeps them balanced), counting in
  `tally`, until `verdict(tally)` gives a reason to stop; returns that reason (None: all rows done)."""
  from array_record.python.array_record_module import ArrayRecordWriter

  writers = []
  try:
    writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
    for reason, rec, detail in convert(lines, manifest, opt):
      bar.update()
      tally.processed += 1
      if rec is None:
        tally.skip(reason, detail)
        stop = verdict(tally)
        if stop:
          return stop
        continue
      writers[tally.written % len(writers)].write(rec)
      tally.written += 1
  finally:
    for w in writers:
      w.close()
  return None


def build(
    manifest: str,
    out_dir: str,
    opt: BuildOptions = BuildOptions(),
    *,
    num_shards: int = 1,
    workers: int = 0,
    max_skip_rate: float = 0.05,
    progress: bool = True,
    overwrite: bool = False,
    skip_check_min_rows: int = 100,
    tfds: bool = False,
    split: str = "train",
    more_splits: dict[str, str] | None = None,
) -> dict:
  """Writes the shards and summary.json into OUT_DIR (swapped in when complete); returns the summary dict.

  `tfds`: write the TFDS dataset `kangaroo_video_qa` instead, `manifest` as split `split` and each of
  `more_splits` (split name -> manifest) as another split; TFDS sizes the shards (`num_shards` must stay 1).
  Raises BuildInputError / OutputError (bad arguments, manifest or OUT_DIR; nothing written),
  SkipRateExceeded (stopped; OUT_DIR untouched, the summary names the temporary folder it was left in),
  OSError / RuntimeError (writing failed; OUT_DIR untouched).
  """
  _check_args(opt, num_shards, workers, max_skip_rate, skip_check_min_rows)
  manifests = _check_splits(manifest, tfds, split, more_splits or {}, num_shards)
  split_lines = {name: _read_manifest(path) for name, path in manifests.items()}
  total = sum(len(lines) for lines in split_lines.values())
  if tfds:
    from tools.build_dataset import tfds_output

    names = []
    out_dir, temp, notes = staging.prepare(out_dir, names, overwrite=overwrite, scratch=tfds_output.SCRATCH)
  else:
    names = [os.path.basename(p) for p in shard_paths("", num_shards)]
    out_dir, temp, notes = staging.prepare(out_dir, names, overwrite=overwrite)
  for note in notes:
    log.warning("%s", note)
  summary = {
      "manifest": os.path.abspath(manifest),
      "out_dir": out_dir,
      "rows": total,
      "shards": names,
      "options": dataclasses.asdict(opt),
      "max_skip_rate": max_skip_rate,
  }

  def verdict(t: _Tally) -> str | None:
    return skip_rate_verdict(sum(t.skipped.values()), t.processed, total, max_skip_rate, skip_check_min_rows)

  tally = _Tally()
  try:
    from tqdm import tqdm

    with _Converter(workers) as convert, tqdm(
        total=total, desc="build_dataset", disable=not progress, file=sys.stderr
    ) as bar:
      if tfds:
        stop = tfds_output.write(
            temp, {n: (manifests[n], split_lines[n]) for n in manifests}, opt, convert, verdict, tally, bar
        )
      else:
        stop = _write_shards(
            split_lines[split], manifest, opt, [os.path.join(temp, n) for n in names], convert, verdict, bar, tally
        )
      convert.finished = stop is None
  except BaseException as e:
    status = "interrupted" if isinstance(e, KeyboardInterrupt) else "error"
    where = _abandon(temp, {**summary, **_counts(tally), "status": status, "reason": f"{type(e).__name__}: {e}"})
    if isinstance(e, Exception):
      raise RuntimeError(f"stopped by {type(e).__name__}: {e}; {out_dir} is unchanged; see {where}") from e
    raise
  final = {**summary, **_counts(tally)}
  if stop is None:
    stop = verdict(tally)  # the certain rule, once every row is in
  if stop is not None:
    where = _abandon(temp, {**final, "status": "skip_rate_exceeded", "reason": stop})
    raise SkipRateExceeded(f"stopped: {stop}; reasons: {dict(tally.skipped)}; {out_dir} is unchanged; " f"see {where}")
  if tfds:
    from kangaroo_jax.data.tfds_builder import NAME, VERSION_STR

    final["shards"] = staging.adopt(temp, NAME)
    final["tfds"] = {
        "name": NAME,
        "version": VERSION_STR,
        "data_dir": out_dir,
        "splits": {
            n: {
                "manifest": os.path.abspath(manifests[n]),
                "rows": len(split_lines[n]),
                "written": tally.split_written.get(n, 0),
            }
            for n in manifests
        },
    }
  final.update(status="complete", reason=f"all {total} rows processed")
  staging.write_summary(temp, final)
  for note in staging.commit(temp, out_dir):
    log.warning("%s", note)
  return {"tool": staging.TOOL, **final}


def _check_splits(manifest: str, tfds: bool, split: str, more: dict[str, str], num_shards: int) -> dict[str, str]:
  """split name -> manifest; BuildInputError for split options without --tfds, bad or repeated names."""
  if not tfds:
    if split != "train" or more:
      raise BuildInputError("--split / --add-split name TFDS splits; they need --tfds")
    return {split: manifest}
  if num_shards != 1:
    raise BuildInputError(f"--shards {num_shards}: with --tfds, TFDS sizes the shards itself; leave --shards out")
  manifests = {split: manifest}
  for name, path in more.items():
    if name in manifests:
      raise BuildInputError(f"--add-split {name}={path}: split {name!r} is given twice")
    manifests[name] = path
  for name in manifests:
    if not (isinstance(name, str) and _SPLIT_NAME.fullmatch(name)):
      raise BuildInputError(
          f"split name {name!r}: expected letters, digits and underscores, starting with a "
          "letter (TFDS split names, e.g. train, validation)"
      )
  return manifests


def _counts(t: _Tally) -> dict:
  return {"processed": t.processed, "written": t.written, "skipped": dict(t.skipped), "skip_examples": dict(t.examples)}


def _abandon(temp: str, summary: dict) -> str:
  """staging.abandon, never masking the error that stopped the build (e.g. a full disk fails this too)."""
  try:
    return staging.abandon(temp, summary)
  except OSError as e:
    log.error("could not write the summary of the stopped build in %s: %s", temp, e)
    return temp


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m tools.build_dataset", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
  )
  p.add_argument("manifest", help="JSONL manifest, one row per sample (kangaroo_jax.data.manifest)")
  p.add_argument("out_dir", help="output folder for the shards and summary.json (swapped in when complete)")
  p.add_argument("--size", type=int, default=448, help="frame size (square; long side with --keep-aspect)")
  p.add_argument(
      "--keep-aspect",
      action="store_true",
      help="keep each video's aspect ratio: long side --size, both sides multiples of 2 x --patch-size "
      "(default: squash to --size x --size, as released)",
  )
  p.add_argument(
      "--patch-size",
      type=int,
      default=14,
      help="the vision tower's patch size (--keep-aspect rounds " "frame sides to multiples of twice this)",
  )
  g = p.add_mutually_exclusive_group()
  g.add_argument(
      "--num-frames",
      type=int,
      default=None,
      help="uniform segment sampling: frames per video (default: 16 unless --fps)",
  )
  g.add_argument("--fps", type=float, default=None, help="fps-based sampling (cap with --max-frames)")
  p.add_argument(
      "--max-frames",
      type=int,
      default=None,
      help="most frames kept per video, thinned uniformly (default: none, no cap)",
  )
  p.add_argument("--frames-fps", type=float, default=1.0, help="frame rate of frames_dir rows")
  p.add_argument("--frame-format", choices=FRAME_FORMATS, default="jpeg", help="how frames are stored in the records")
  p.add_argument("--quality", type=int, default=95, help="JPEG quality, 1-100 (--frame-format jpeg)")
  p.add_argument("--reference", action="store_true", help="store video paths; decode in the training pipeline")
  p.add_argument("--shards", type=int, default=None, help="shard files (default: 1; not with --tfds)")
  p.add_argument("--workers", type=int, default=0, help="worker processes decoding videos (0: in this process)")
  p.add_argument(
      "--max-skip-rate",
      type=float,
      default=0.05,
      help="stop when more than this fraction of rows is skipped (default: 0.05, as the trainer)",
  )
  p.add_argument(
      "--skip-check-min-rows",
      type=int,
      default=100,
      help="rows read before a clearly exceeded skip rate stops the build early",
  )
  p.add_argument(
      "--tfds",
      action="store_true",
      help="write the TFDS dataset kangaroo_video_qa (read with tfds.data_source, data_dir=OUT_DIR)",
  )
  p.add_argument("--split", default="train", help="with --tfds: the split the manifest becomes")
  p.add_argument(
      "--add-split",
      action="append",
      default=[],
      metavar="NAME=MANIFEST",
      help="with --tfds: another split from another manifest, repeatable (default: none)",
  )
  p.add_argument(
      "--overwrite",
      action="store_true",
      help="replace a previous build in OUT_DIR (never a folder holding files this tool did not write)",
  )
  return p


def main(argv=None) -> int:
  p = _parser()
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  num_frames = a.num_frames if a.num_frames is not None or a.fps is not None else 16
  opt = BuildOptions(
      a.size,
      a.keep_aspect,
      a.patch_size,
      num_frames,
      a.fps,
      a.max_frames,
      a.frames_fps,
      a.frame_format,
      a.quality,
      a.reference,
  )
  try:
    more = _parse_add_split(a.add_split)
    s = build(
        a.manifest,
        a.out_dir,
        opt,
        num_shards=1 if a.shards is None else a.shards,
        workers=a.workers,
        max_skip_rate=a.max_skip_rate,
        overwrite=a.overwrite,
        skip_check_min_rows=a.skip_check_min_rows,
        tfds=a.tfds,
        split=a.split,
        more_splits=more,
    )
  except (BuildInputError, OutputError) as e:
    print(f"build_dataset: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"build_dataset: interrupted; {a.out_dir} is unchanged", file=sys.stderr)
    return 130
  except (SkipRateExceeded, OSError, RuntimeError) as e:
    print(f"build_dataset: error: {e}", file=sys.stderr)
    return 1
  result = {"rows": s["rows"], "written": s["written"], "skipped": s["skipped"], "out_dir": s["out_dir"]}
  if "tfds" in s:
    result["tfds"] = {"name": s["tfds"]["name"], "splits": {n: v["written"] for n, v in s["tfds"]["splits"].items()}}
  print(json.dumps(result))
  return 0


def _parse_add_split(values: list[str]) -> dict[str, str]:
  out = {}
  for v in values:
    name, sep, path = v.partition("=")
    if not sep or not name or not path:
      raise BuildInputError(f"--add-split {v!r}: expected NAME=MANIFEST")
    if name in out:
      raise BuildInputError(f"--add-split {v!r}: split {name!r} is given twice")
    out[name] = path
  return out
