"""`--tfds`: the converted rows written as the TFDS dataset `kangaroo_video_qa` (kangaroo_jax.data.tfds_builder).

TFDS's own builder machinery writes it (GeneratorBasedBuilder.download_and_prepare, ArrayRecord format):
features.json, dataset_info.json with each split's example count and shard lengths, and shards TFDS sizes
itself. It writes into the build's scratch folder (staging.prepare), whose result `staging.adopt` moves up
once complete, so OUT_DIR still only ever holds a complete build:

    OUT_DIR/summary.json
    OUT_DIR/kangaroo_video_qa/1.0.0/{dataset_info.json, features.json, kangaroo_video_qa-SPLIT.array_record-*}

Open it with `tfds.data_source("kangaroo_video_qa", data_dir=OUT_DIR)`; train with
`data.dataset="tfds:kangaroo_video_qa[:SPLIT]"`, `data.tfds_data_dir=OUT_DIR`.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Callable, Iterator

SCRATCH = ".tfds-work"


class _Stopped(Exception):
  """Raised inside TFDS's generator loop to end the build; the reason is kept by `write`."""


def write(
    temp: str, splits: dict[str, tuple[str, list]], opt, convert: Callable, verdict: Callable, tally, bar
) -> str | None:
  """Writes `splits` (name -> (manifest, [(line number, line)])) into `temp`'s scratch folder.

  `convert(lines, manifest, opt)` yields (reason, record bytes or None, detail) per line, in order; skipped
  rows are counted in `tally` and `verdict(tally)` can stop the build. Returns the reason it stopped (a split
  left without a usable row stops it too), else None.
  """
  import tensorflow_datasets as tfds
  from kangaroo_jax.data.records import unpack_record
  from kangaroo_jax.data.tfds_builder import KangarooVideoQa, example_from_record

  stop: list[str] = []

  def examples(name: str, manifest: str, lines: list) -> Iterator[tuple[int, dict]]:
    written = 0
    for (line_no, _), (reason, rec, detail) in zip(lines, convert(lines, manifest, opt)):
      bar.update()
      tally.processed += 1
      if rec is not None:
        try:
          example = example_from_record(unpack_record(rec))
        except Exception as e:  # noqa: BLE001  as in _convert: no row can end the build
          rec, reason, detail = None, "unexpected_error", f"{manifest}:{line_no}: {type(e).__name__}: {e}"
      if rec is None:
        tally.skip(reason, detail)
        why = verdict(tally)
        if why:
          stop.append(why)
          raise _Stopped(why)
        continue
      yield line_no, example  # the line number: unique in the split, the key TFDS shuffles by
      written += 1
      tally.written += 1
      tally.split_written[name] = written
    if not written:
      stop.append(f"split {name!r}: none of the {len(lines)} rows of {manifest} is usable")
      raise _Stopped(stop[-1])

  description = (
      f"Video question-answer records built by tools.build_dataset from {', '.join(sorted(splits))} "
      f"manifests; frames {opt.size} px, {opt.frame_format}" + (", video references" if opt.reference else "")
  )
  work = os.path.join(temp, SCRATCH)
  builder = KangarooVideoQa(
      data_dir=work,
      file_format="array_record",
      description=description,
      splits={n: examples(n, m, lines) for n, (m, lines) in splits.items()},
  )
  from tensorflow_datasets.core.utils import tqdm_utils

  bars = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)  # our own bar counts rows; TFDS's would print per split and stage
  try:
    # TFDS prints where it writes: the scratch folder, moved once complete. stdout carries the CLI's result.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(
          download_dir=os.path.join(work, "downloads"),
          download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      )
  except BaseException:
    if stop:
      return stop[0]
    raise
  finally:
    tfds.display_progress_bar(bars)
  return None
