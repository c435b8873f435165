"""The Grain training pipeline (contract sections 3 and 4).

    ArrayRecordDataSource -> MapDataset -> shuffle(seed) -> repeat(epochs) -> [shard_index::shard_count]
      -> PrepareSample (decode frames / video, resize, tokenize; bad samples become skip markers)
      -> to_iter_dataset -> PackIterDataset (first-fit) -> batch(rows per host) -> mp_prefetch(workers)
      -> TrainIterator (pops skip counts, logs them, enforces max_skip_rate; get_state / set_state)

The packer enforces max_skip_rate too while it cannot emit a row (every sample skipped), since the
TrainIterator only learns of skips from emitted rows; SkipRateExceeded then comes out of `next`.

Shards are checked when the dataset is built: a shard that does not open as an ArrayRecord file (0 bytes,
truncated: its record index at the end is gone, or not ArrayRecord at all) is left out with one warning
naming it, and counted (`TrainIterator.bad_shards`; not a metric, since every host checks every shard and
the trainer sums metrics over hosts); ShardError, naming them, when no shard can be read. A folder from
tools.build_dataset is read as its summary.json lists it, so shard files it does not list (left by older
builds) are left out too, with a warning.

A TFDS split (`dataset="tfds:NAME[:SPLIT]"`, kangaroo_jax.data.tfds_source) replaces the ArrayRecordDataSource:
its examples go through the dataset's declared mapping (PrepareTfdsSample) and then the same steps; an
example that cannot be read, or does not fit the mapping, is skipped and counted like a bad record.

Everything up to mp_prefetch runs inside the worker processes, so the transforms are module-level
classes that hold only picklable config (the tokenizer is reloaded from its file in each worker).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import grain
import numpy as np

from kangaroo_jax.config import KangarooConfig
from kangaroo_jax.data.config import SKIP_REASONS, DataConfig, DataConfigError, SkipRateExceeded
from kangaroo_jax.data.packing import PackIterDataset
from kangaroo_jax.data.prompt import PromptError, encode_conversation
from kangaroo_jax.data.records import RecordError, decode_frames, unpack_record
from kangaroo_jax.data.video import VideoError, load_video, preprocess_frames

log = logging.getLogger("kangaroo_jax.data")
_REASON = {r: i for i, r in enumerate(SKIP_REASONS)}


class ShardError(DataConfigError):
  """No shard of the dataset can be read; the message names each one and what is wrong with it."""


def _shard_problem(path: str) -> str | None:
  """What keeps `path` from being read as an ArrayRecord shard, in a few words, or None."""
  from array_record.python.array_record_module import ArrayRecordReader

  try:
    size = os.path.getsize(path)
  except OSError as e:
    return f"cannot be read ({e.strerror or e})"
  if size == 0:
    return "empty file (0 bytes)"
  try:
    reader = ArrayRecordReader(path)
  except Exception as e:  # noqa: BLE001  the binding raises bare RuntimeErrors with absl status text
    return f"not an ArrayRecord file ({size} bytes; {type(e).__name__}: {e})"
  ok, detail = reader.ok(), ""
  try:
    reader.close()  # raises the reader's status when it is not ok
  except Exception as e:  # noqa: BLE001
    ok, detail = False, str(e)
  if not ok:
    detail = f": {detail}" if detail else ", its record index is unreadable"
    return f"not a complete ArrayRecord file ({size} bytes; truncated or corrupt{detail})"
  return None


def _listed_in_summary(data: str, files: list[str]) -> list[str]:
  """`files` less the shards a tools.build_dataset summary.json in the `data` folder does not list."""
  try:
    with open(os.path.join(data, "summary.json"), encoding="utf-8") as f:
      listed = json.load(f).get("shards")
  except (OSError, ValueError, AttributeError, RecursionError):
    return files
  if not isinstance(listed, list) or not listed:
    return files
  names = {n for n in listed if isinstance(n, str)}
  unlisted = [p for p in files if os.path.basename(p) not in names]
  if unlisted:
    log.warning(
        "data: ignoring %d shard file(s) in %s that its summary.json does not list (left by an earlier " "build?): %s",
        len(unlisted),
        data,
        ", ".join(os.path.basename(p) for p in unlisted[:5]),
    )
  return [p for p in files if os.path.basename(p) in names]


def readable_shards(data_cfg: DataConfig) -> tuple[list[str], list[str]]:
  """(shard files to read, "path: problem" for each one left out). ShardError when none is readable."""
  files = data_cfg.shard_files()
  if os.path.isdir(data_cfg.dataset):
    files = _listed_in_summary(data_cfg.dataset, files)
  good, bad = [], []
  for path in files:
    problem = _shard_problem(path)
    if problem is None:
      good.append(path)
    else:
      bad.append(f"{path}: {problem}")
      log.warning("data: skipping shard %s: %s", path, problem)
  if not good:
    shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise ShardError(f"data.dataset={data_cfg.dataset!r}: none of its {len(bad)} shard file(s) can be read: {shown}")
  if bad:
    log.warning("data: %d of %d shard files skipped as unreadable", len(bad), len(files))
  return good, bad


def fit_frames(frames: np.ndarray, hw: tuple[int, int], keep_aspect: bool) -> np.ndarray:
  """uint8 [f, h, w, 3] -> [f, H, W, 3]: squash (released transform) or letterbox (aspect kept, zero bars).

  Letterboxing is how keep-aspect samples share one row: every row has one frame size (contract section 3),
  so the bars cost visual tokens; a per-row bucketing by aspect ratio is not implemented.
  """
  out_h, out_w = hw
  f, h, w, _ = frames.shape
  if (h, w) == (out_h, out_w):
    return frames
  if not keep_aspect:
    return preprocess_frames(frames, (out_h, out_w))
  scale = min(out_h / h, out_w / w)
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  inner = preprocess_frames(frames, (nh, nw))
  out = np.zeros((f, out_h, out_w, 3), np.uint8)
  top, left = (out_h - nh) // 2, (out_w - nw) // 2
  out[:, top : top + nh, left : left + nw] = inner
  return out


class PrepareSample:
  """(record index, record bytes) -> packed-sample dict, or {"skip": reason index} (never raises for bad data)."""

  def __init__(self, data_cfg: DataConfig, model_cfg: KangarooConfig, tokenizer):
    self.data_cfg = data_cfg
    self.visual_token_id = model_cfg.visual_token_id
    self.frames_per_group = model_cfg.projector.frames_per_group
    gh, gw = model_cfg.vision.grid_for(*data_cfg.frame_hw)
    self.tokens_per_group = model_cfg.projector.tokens_per_group(gh, gw)
    # Tokenizers wrap native objects; workers reload from the file when there is one.
    self._tokenizer_path = getattr(tokenizer, "path", None)
    self._tokenizer = None if self._tokenizer_path else tokenizer

  def __getstate__(self):
    d = dict(self.__dict__)
    if self._tokenizer_path:
      d["_tokenizer"] = None
    return d

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      from kangaroo_jax.tokenizer import load_tokenizer

      self._tokenizer = load_tokenizer(self._tokenizer_path)
    return self._tokenizer

  def _skip(self, reason: str, where: str, err: Exception | str, need: int | None = None) -> dict:
    """`need`: the size (tokens, frames) the sample needed, so the packer can say which limit is too small."""
    log.warning("skipping %s (%s): %s", where, reason, err)
    out = {"skip": np.int32(_REASON[reason])}
    if need is not None:
      out["need"] = np.int32(need)
    return out

  def __call__(self, index: int, raw: bytes) -> dict:
    c = self.data_cfg
    where = f"record {index}"
    try:
      rec = unpack_record(raw, where)
      where = f"record {index} ({rec.get('id', '?')})"
      if "frames" in rec:
        frames = decode_frames(rec["frames"], where)
        ts = np.asarray(rec.get("timestamps", np.zeros(len(frames))), np.float32)
        if ts.shape != (len(frames),):
          raise RecordError(f"{where}: {ts.shape[0] if ts.ndim else 0} timestamps for {len(frames)} frames")
      elif "video" in rec:
        v = rec["video"]
        dec = load_video(
            v["path"],
            num_frames=c.num_frames,
            fps=c.fps,
            max_frames=c.max_sampled_frames,
            start=v.get("start"),
            end=v.get("end"),
        )
        frames, ts = dec.frames, dec.timestamps
      else:
        frames, ts = np.zeros((0, *c.frame_hw, 3), np.uint8), np.zeros(0, np.float32)
    except VideoError as e:
      return self._skip("missing_video" if "no such file" in str(e) else "bad_video", where, e)
    except (RecordError, KeyError, TypeError, ValueError) as e:
      return self._skip("bad_record", where, e)
    return self.finish(where, rec["messages"], frames, ts)

  def finish(self, where: str, messages, frames: np.ndarray, ts: np.ndarray) -> dict:
    """A loaded sample (frames uint8 [f, h, w, 3], timestamps float32 [f]) -> packed-sample dict or skip marker."""
    c = self.data_cfg
    if len(frames) % 2 and len(frames):
      frames, ts = np.concatenate([frames, frames[-1:]]), np.concatenate([ts, ts[-1:]])
    if len(frames) > c.max_frames:
      return self._skip("too_many_frames", where, f"{len(frames)} frames > max_frames {c.max_frames}", need=len(frames))
    try:
      if len(frames):
        frames = fit_frames(frames, c.frame_hw, c.keep_aspect)
      enc = encode_conversation(
          self.tokenizer,
          messages,
          num_groups=len(frames) // self.frames_per_group,
          tokens_per_group=self.tokens_per_group,
          visual_token_id=self.visual_token_id,
          markers=c.markers,
          system=c.system_prompt,
      )
    except (PromptError, KeyError, TypeError, ValueError) as e:
      return self._skip("bad_conversation", where, e)
    if len(enc) > c.seq_len:
      return self._skip("too_long", where, f"{len(enc)} tokens > seq_len {c.seq_len}", need=len(enc))
    return {"input_ids": enc.input_ids, "loss_mask": enc.loss_mask, "frames": frames, "timestamps": ts}


class PrepareTfdsSample(PrepareSample):
  """(read index, TFDS example dict) -> packed-sample dict or skip marker, through the dataset's bound mapping
  (kangaroo_jax.data.tfds_mappings); the steps after the mapping are PrepareSample's."""

  def __init__(self, data_cfg: DataConfig, model_cfg: KangarooConfig, tokenizer, mapping):
    super().__init__(data_cfg, model_cfg, tokenizer)
    self.mapping = mapping

  def __call__(self, index: int, example: dict) -> dict:
    from kangaroo_jax.data.tfds_source import ERROR_KEY, INDEX_KEY

    if ERROR_KEY in example:
      return self._skip("bad_record", f"{self.mapping.where} read {index}", example[ERROR_KEY])
    where = f"{self.mapping.where} record {example.get(INDEX_KEY, '?')}"
    try:
      sample = self.mapping(example, index, example.get(INDEX_KEY, -1))
    except VideoError as e:
      return self._skip("missing_video" if "no such file" in str(e) else "bad_video", where, e)
    except (RecordError, KeyError, TypeError, ValueError, StopIteration) as e:
      return self._skip("bad_record", where, e)
    return self.finish(
        f"{where} ({sample.id})" if sample.id != where else where, sample.messages, sample.frames, sample.timestamps
    )


class _PrepareMap(grain.transforms.MapWithIndex):

  def __init__(self, prepare: PrepareSample):
    self.prepare = prepare

  def map_with_index(self, index: int, element) -> dict:
    return self.prepare(index, element)


@dataclasses.dataclass
class Source:
  """What the pipeline reads: Grain random-access records and the transform that prepares one of them."""

  records: Any  # ArrayRecordDataSource (bytes) or tfds_source.TfdsRecords (example dicts)
  prepare: type  # PrepareSample or PrepareTfdsSample
  mapping: Any = None  # the TFDS bound mapping (PrepareTfdsSample's extra argument)
  bad_shards: list = dataclasses.field(default_factory=list)


def open_source(data_cfg: DataConfig) -> Source:
  """The records `data_cfg.dataset` names: ArrayRecord shards (checked, see `readable_shards`) or a TFDS split
  (tfds_source.open_tfds: features checked against its mapping). DataConfigError / ShardError when unusable."""
  spec = data_cfg.tfds
  if spec is None:
    files, bad = readable_shards(data_cfg)
    return Source(grain.sources.ArrayRecordDataSource(files), PrepareSample, None, bad)
  from kangaroo_jax.data.tfds_mappings import Sampling
  from kangaroo_jax.data.tfds_source import open_tfds

  c = data_cfg
  sampling = Sampling(c.num_frames, c.fps, c.max_sampled_frames, c.markers.video)
  opened = open_tfds(
      spec,
      data_dir=c.tfds_data_dir or None,
      mapping=c.tfds_mapping or None,
      sampling=sampling,
      shard_problem=_shard_problem,
  )
  return Source(opened.records, PrepareTfdsSample, opened.mapping, opened.bad_shards)


def build_dataset(
    data_cfg: DataConfig,
    model_cfg: KangarooConfig,
    tokenizer,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    shard_files: list[str] | None = None,
    source: Source | None = None,
) -> grain.IterDataset:
  """The Grain dataset yielding host batches (numpy dicts incl. `_skips` [B, R] and `_seen` [B]).

  `shard_files`: the files to read, as `readable_shards` returned them (checked here when not given);
  `source`: what `open_source` returned (TFDS data), instead of them."""
  c = data_cfg
  if c.batch_size % shard_count:
    raise ValueError(f"data.batch_size {c.batch_size} is not divisible by the {shard_count} data shards")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  if source is None:
    source = (
        Source(grain.sources.ArrayRecordDataSource(shard_files), PrepareSample)
        if shard_files is not None
        else open_source(c)
    )
  prepare = (
      source.prepare(c, model_cfg, tokenizer)
      if source.mapping is None
      else source.prepare(c, model_cfg, tokenizer, source.mapping)
  )
  ds = grain.MapDataset.source(source.records)
  if c.shuffle:
    ds = ds.shuffle(seed=c.shuffle_seed)
  ds = ds.repeat(c.num_epochs)
  ds = ds[shard_index::shard_count]
  ds = ds.map_with_index(_PrepareMap(prepare))
  it = ds.to_iter_dataset()
  it = PackIterDataset(
      it,
      seq_len=c.seq_len,
      max_frames=c.max_frames,
      frame_hw=c.frame_hw,
      bins=c.packing_bins,
      max_skip_rate=c.max_skip_rate,
      min_samples=c.skip_check_min_samples,
  )
  it = it.batch(c.batch_size // shard_count, drop_remainder=True)
  if c.worker_count > 0:
    _mark_absl_flags_parsed()
    it = it.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=c.worker_count, per_worker_buffer_size=c.worker_buffer_size)
    )
  return it


def _mark_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; programs that do not use absl never parse them."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class TrainIterator:
  """Host batches (contract section 3) with skip accounting; `get_state` / `set_state` for checkpoints.

  The state is a JSON-serialisable dict: {"grain": Grain iterator state, "skipped": {reason: n}, "seen": n}.
  `bad_shards`: "path: problem" of each shard file left out as unreadable (see `readable_shards`).
  """

  def __init__(self, ds: grain.IterDataset, data_cfg: DataConfig, bad_shards: tuple[str, ...] | list[str] = ()):
    self._ds, self._cfg = ds, data_cfg
    self.bad_shards = list(bad_shards)
    self._it = iter(ds)
    self._skipped = np.zeros(len(SKIP_REASONS), np.int64)
    self._seen = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    skips = batch.pop("_skips").sum(axis=0)
    self._seen += int(batch.pop("_seen").sum())
    if skips.any():
      self._skipped += skips
      log.warning("data: skipped %s so far (of %d samples read)", self.skipped, self._seen)
    self._check_skip_rate()
    return batch

  @property
  def skipped(self) -> dict[str, int]:
    return {r: int(n) for r, n in zip(SKIP_REASONS, self._skipped) if n}

  def metrics(self) -> dict[str, float]:
    m = {f"data/skipped/{r}": float(n) for r, n in zip(SKIP_REASONS, self._skipped)}
    m["data/seen"] = float(self._seen)
    m["data/skip_rate"] = float(self._skipped.sum()) / max(self._seen, 1)
    return m

  def _check_skip_rate(self) -> None:
    c = self._cfg
    total = int(self._skipped.sum())
    if self._seen >= c.skip_check_min_samples and total > c.max_skip_rate * self._seen:
      raise SkipRateExceeded(
          f"data: {total} of {self._seen} samples skipped ({total / self._seen:.1%} > max_skip_rate "
          f"{c.max_skip_rate:.1%}); reasons: {self.skipped}. Fix or rebuild the dataset "
          f"({c.dataset}), or raise data.max_skip_rate."
      )

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "skipped": self.skipped, "seen": self._seen}

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state["grain"])
    self._skipped = np.asarray([int(state["skipped"].get(r, 0)) for r in SKIP_REASONS], np.int64)
    self._seen = int(state["seen"])

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def make_train_iterator(
    data_cfg: DataConfig, model_cfg: KangarooConfig, tokenizer, *, process_index: int = 0, process_count: int = 1
) -> TrainIterator:
  """The trainer's entry point. `process_index` / `process_count` select the data shard this host reads:
  pass `data_shard_for_process(mesh, data_cfg.batch_size)` when `context` spans hosts (hosts holding the same
  batch rows must read the same shard), else `jax.process_index()`, `jax.process_count()`."""
  source = open_source(data_cfg)
  return TrainIterator(
      build_dataset(
          data_cfg, model_cfg, tokenizer, shard_index=process_index, shard_count=process_count, source=source
      ),
      data_cfg,
      source.bad_shards,
  )
