"""TFDS datasets as a training source: `DataConfig.data = "tfds:NAME[/CONFIG][:VERSION][:SPLIT]"`.

The dataset is opened from its prepared files (`data_dir/NAME[/CONFIG]/VERSION/`: dataset_info.json,
features.json, ArrayRecord shards), never from the catalog's generation code, so reading needs neither a
download nor TensorFlow (TFDS's Video feature is the exception: its constructor imports TensorFlow, so
datasets declaring `Video` features, e.g. the real ucf101, need it installed to be opened). The split may
carry TFDS slicing (`train[:10%]`); it defaults to `train`.

Grain reads the split through `builder.as_data_source` (random access over the ArrayRecord shards); each
example goes through the dataset's declared mapping (tfds_mappings) and then the same prepare / pack /
batch steps as our shards, so resume, skip accounting and the skip-rate check are the same.

This module imports tensorflow_datasets; the pipeline imports it only for `tfds:` data.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from kangaroo_jax.data.config import SPLIT_NAME, DataConfigError, TfdsSpec
from kangaroo_jax.data.tfds_mappings import DATASET_SHAPES, MAPPINGS, BoundMapping, Sampling

log = logging.getLogger("kangaroo_jax.data")
ERROR_KEY = "_tfds_error"  # set in place of an example that could not be read or parsed
INDEX_KEY = "_tfds_record"  # the example's index in the split, for messages


def mapping_for(spec: TfdsSpec, override: str | None):
  """The declared mapping of the dataset (or the `override` shape); DataConfigError when there is none."""
  shape = override or DATASET_SHAPES.get(spec.dataset)
  if shape is None:
    raise DataConfigError(
        f"{spec}: no mapping is declared for dataset {spec.dataset!r} (declared: {', '.join(sorted(DATASET_SHAPES))});"
        f" set DataConfig.tfds_mapping to one of {sorted(MAPPINGS)} if its features have that shape"
    )
  if shape not in MAPPINGS:
    raise DataConfigError(f"DataConfig.tfds_mapping={shape!r}: expected one of {sorted(MAPPINGS)}")
  return MAPPINGS[shape]


class KeepEncoded(tfds.decode.Decoder):
  """Leaves an Image (or each frame of a Video) as its encoded bytes; tfds_mappings decodes what it uses.
  (`tfds.decode.SkipDecoding` lacks the NumPy batch method a Sequence of images needs.)"""

  def decode_example(self, serialized_example):
    return serialized_example

  def decode_example_np(self, serialized_example):
    return serialized_example

  def decode_batch_example_np(self, serialized_example):
    return serialized_example


def _builder(spec: TfdsSpec, data_dir: str | None):
  where = data_dir or "the default TFDS data dirs (TFDS_DATA_DIR, ~/tensorflow_datasets)"
  try:
    return read_only_builder.builder_from_files(spec.name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataConfigError(
        f"{spec}: no prepared dataset {spec.name!r} in {where}; prepare it in ArrayRecord format, e.g. "
        f"`tfds build {spec.dataset} --file_format=array_record --data_dir=DIR`, or build ours with "
        "`python -m tools.build_dataset MANIFEST DIR --tfds`"
    ) from None
  except ModuleNotFoundError as e:
    raise DataConfigError(
        f"{spec}: its features need {e.name} to be read (TFDS's Video feature imports " "TensorFlow); install it"
    ) from None
  except Exception as e:  # noqa: BLE001  a damaged dataset_info.json / features.json, in many exception types
    raise DataConfigError(f"{spec}: cannot open the dataset in {where} ({type(e).__name__}: {e})") from None


class TfdsRecords:
  """A Grain random-access source over a TFDS split whose items never raise: an example that cannot be read
  (a damaged shard or record) comes out as {ERROR_KEY: why}, so the pipeline skips and counts it."""

  def __init__(self, source, where: str):
    self._source, self._where = source, where

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    try:
      example = self._source[index]
    except Exception as e:  # noqa: BLE001  ArrayRecord / proto parsing raise many unrelated types
      return {ERROR_KEY: f"{self._where} record {index}: cannot be read ({type(e).__name__}: {e})"}
    example[INDEX_KEY] = index
    return example

  def __repr__(self) -> str:
    return f"TfdsRecords({self._where}, {len(self)} examples)"


@dataclasses.dataclass
class OpenedTfds:
  records: TfdsRecords
  mapping: BoundMapping
  bad_shards: list[str]  # "path: problem" of each shard file that does not open (its examples are skipped)


def open_tfds(
    spec: TfdsSpec,
    *,
    data_dir: str | None,
    mapping: str | None,
    sampling: Sampling,
    shard_problem: Callable[[str], str | None],
) -> OpenedTfds:
  """Opens the split, checks the mapping against the dataset's features and the split's shard files.
  DataConfigError (MappingError for misfitting features) naming the dataset, split and what is wrong."""
  builder = _builder(spec, data_dir)
  chosen = mapping_for(spec, mapping)
  where = f"tfds:{builder.info.full_name} split {spec.split!r}"
  fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
  if fmt != "array_record":
    raise DataConfigError(
        f"{where}: stored as {fmt}, which has no random access; prepare it again with " "--file_format=array_record"
    )
  base = SPLIT_NAME.match(spec.split).group(0)
  splits = sorted(builder.info.splits.keys())
  if base not in splits:
    raise DataConfigError(f"{where}: no split {base!r}; the dataset has {', '.join(splits) or 'no splits'}")
  bound = chosen.bind(builder.info.features, where).with_sampling(sampling)
  decoders = {path: KeepEncoded() for path in bound.encoded}
  try:
    source = builder.as_data_source(split=spec.split, decoders=decoders or None)
  except Exception as e:  # noqa: BLE001  e.g. a slice TFDS cannot parse
    raise DataConfigError(f"{where}: cannot read the split ({type(e).__name__}: {e})") from None
  if len(source) == 0:
    raise DataConfigError(f"{where}: the split holds no examples")
  bad = []
  for path in builder.info.splits[base].filepaths:
    problem = shard_problem(str(path))
    if problem is not None:
      bad.append(f"{path}: {problem}")
      log.warning("data: shard %s of %s: %s; its examples will be skipped", path, where, problem)
  if bad and len(bad) == len(builder.info.splits[base].filepaths):
    from kangaroo_jax.data.pipeline import ShardError

    raise ShardError(f"{where}: none of its {len(bad)} shard file(s) can be read: {'; '.join(bad[:3])}")
  return OpenedTfds(TfdsRecords(source, where), bound, bad)
