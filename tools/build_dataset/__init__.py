"""`python -m tools.build_dataset MANIFEST.jsonl OUT_DIR`: JSONL manifest -> ArrayRecord shards.

Each usable row becomes one record (kangaroo_jax.data.records): its video is decoded with the configured
sampling, resized with the released transform and stored as JPEG (or raw uint8) frames, or, with
`--reference`, only the path is stored and decoding happens in the training pipeline. Bad rows (malformed
JSON/fields, missing / corrupt / truncated / empty videos) are skipped, counted by reason and listed in
OUT_DIR/summary.json; the build fails only when the skip fraction exceeds --max-skip-rate.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import multiprocessing
import os
import sys

from kangaroo_jax.data.manifest import ManifestError, ManifestRow, parse_row
from kangaroo_jax.data.records import FRAME_FORMATS, encode_frames, pack_record
from kangaroo_jax.data.video import VideoError, load_video, preprocess_frames

log = logging.getLogger("build_dataset")


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
  """(line_no, line, manifest, options) -> (reason, record bytes or None, detail). Never raises."""
  line_no, line, manifest, opt = args
  try:
    row: ManifestRow = parse_row(line, line_no=line_no, manifest_path=manifest)
  except ManifestError as e:
    return "malformed_row", None, str(e)
  sample = {"id": row.id, "messages": row.messages}
  if opt.reference:
    if not os.path.exists(row.path):
      return "missing_video", None, f"{row.id}: {row.path}: no such file or folder"
    sample["video"] = {"path": row.path, "start": row.start, "end": row.end}
    return "ok", pack_record(sample), ""
  try:
    v = load_video(row.path, num_frames=opt.num_frames, fps=opt.fps, max_frames=opt.max_frames, start=row.start,
                   end=row.end, frames_fps=opt.frames_fps)
  except VideoError as e:
    reason = "missing_video" if "no such file" in str(e) else "bad_video"
    return reason, None, f"{row.id}: {e}"
  frames = preprocess_frames(v.frames, opt.size, keep_aspect=opt.keep_aspect, patch_size=opt.patch_size)
  sample["frames"] = encode_frames(frames, opt.frame_format, opt.quality)
  sample["timestamps"] = [float(t) for t in v.timestamps]
  return "ok", pack_record(sample), ""


def build(manifest: str, out_dir: str, opt: BuildOptions = BuildOptions(), *, num_shards: int = 1,
          workers: int = 0, max_skip_rate: float = 1.0, progress: bool = True) -> dict:
  """Writes the shards and OUT_DIR/summary.json; returns the summary dict."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm import tqdm
  if opt.frame_format not in FRAME_FORMATS:
    raise ValueError(f"--frame-format must be one of {FRAME_FORMATS}, got {opt.frame_format!r}")
  with open(manifest) as f:
    lines = [(i + 1, ln) for i, ln in enumerate(f) if ln.strip()]
  os.makedirs(out_dir, exist_ok=True)
  paths = shard_paths(out_dir, num_shards)
  writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
  skipped: collections.Counter = collections.Counter()
  examples: dict[str, list[str]] = collections.defaultdict(list)
  written = 0
  jobs = ((n, ln, manifest, opt) for n, ln in lines)
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
  try:
    results = pool.imap(_convert, jobs, chunksize=4) if pool else map(_convert, jobs)
    for reason, rec, detail in tqdm(results, total=len(lines), desc="build_dataset", disable=not progress,
                                    file=sys.stderr):
      if rec is None:
        skipped[reason] += 1
        if len(examples[reason]) < 20:
          examples[reason].append(detail)
        log.warning("skipped (%s): %s", reason, detail)
        continue
      writers[written % num_shards].write(rec)  # round robin keeps shards balanced
      written += 1
  finally:
    if pool:
      pool.close()
      pool.join()
    for w in writers:
      w.close()
  total = len(lines)
  summary = {"manifest": os.path.abspath(manifest), "rows": total, "written": written,
             "skipped": dict(skipped), "skip_examples": dict(examples), "shards": [os.path.basename(p) for p in paths],
             "options": dataclasses.asdict(opt)}
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  rate = sum(skipped.values()) / max(total, 1)
  if rate > max_skip_rate:
    raise RuntimeError(f"{sum(skipped.values())} of {total} manifest rows were skipped ({rate:.1%} > "
                       f"--max-skip-rate {max_skip_rate:.1%}); reasons: {dict(skipped)}; see {out_dir}/summary.json")
  return summary


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m tools.build_dataset", description=__doc__.split("\n\n")[0])
  p.add_argument("manifest")
  p.add_argument("out_dir")
  p.add_argument("--size", type=int, default=448, help="frame size (square; long side with --keep-aspect)")
  p.add_argument("--keep-aspect", action="store_true")
  p.add_argument("--patch-size", type=int, default=14)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--num-frames", type=int, default=None, help="uniform segment sampling (default 16)")
  g.add_argument("--fps", type=float, default=None, help="fps-based sampling (cap with --max-frames)")
  p.add_argument("--max-frames", type=int, default=None)
  p.add_argument("--frames-fps", type=float, default=1.0, help="frame rate of frames_dir rows")
  p.add_argument("--frame-format", choices=FRAME_FORMATS, default="jpeg")
  p.add_argument("--quality", type=int, default=95)
  p.add_argument("--reference", action="store_true", help="store video paths; decode in the training pipeline")
  p.add_argument("--shards", type=int, default=1)
  p.add_argument("--workers", type=int, default=0)
  p.add_argument("--max-skip-rate", type=float, default=1.0)
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  num_frames = a.num_frames if a.num_frames is not None or a.fps is not None else 16
  opt = BuildOptions(a.size, a.keep_aspect, a.patch_size, num_frames, a.fps, a.max_frames, a.frames_fps,
                     a.frame_format, a.quality, a.reference)
  try:
    s = build(a.manifest, a.out_dir, opt, num_shards=a.shards, workers=a.workers, max_skip_rate=a.max_skip_rate)
  except (OSError, RuntimeError, ValueError) as e:
    print(f"build_dataset: error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({"rows": s["rows"], "written": s["written"], "skipped": s["skipped"], "out_dir": a.out_dir}))
  return 0
