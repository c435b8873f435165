"""Experiment config (an ml_collections ConfigDict file) -> a validated, frozen `TrainConfig`.

Every field is checked once, here, before anything is traced: a typo or an impossible value fails
with the dotted name of the field (`optim.warmup_steps: ...`), never as an XLA error later.
Unknown keys are errors too, so a misspelt override cannot be silently ignored.

Config file sections (see configs/common.py for the defaults):
  stage, seed, total_steps, log_every, init_from, export, peak_flops_per_device
  model:  preset, overrides (nested dict applied onto the preset's KangarooConfig.to_dict(): shapes only)
  run:    how the model runs: RunOptions fields (compute_dtype, attention_impl, remat_policy, ...);
          optional, default RunOptions() (kangaroo_jax/run_options.py); training needs param_dtype float32
  mesh:   data, fsdp, context, tensor, dcn_*          (kangaroo_jax.parallel.mesh.MeshConfig)
  data:   source, batch_size (global rows), seq_len, frame_size, max_frames, ...
  optim:  lr, warmup_steps, min_lr_ratio, b1, b2, eps, weight_decay, clip_norm, grad_accum,
          trainable (regexes), frozen (regexes), lr_scales ((regex, factor), ...), max_nonfinite
  ckpt:   every, keep, keep_best, async_save
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import ml_collections

from kangaroo_jax.config import ConfigError, KangarooConfig, preset
from kangaroo_jax.parallel.mesh import MeshConfig
from kangaroo_jax.run_options import RunOptions

DATA_SOURCES = ("synthetic", "grain")


def _err(field: str, msg: str) -> ConfigError:
  return ConfigError(f"{field}: {msg}")


def _plain(x: Any) -> Any:
  """ConfigDict / FrozenConfigDict / tuples -> plain dicts and tuples (hashable-friendly)."""
  if isinstance(x, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict, Mapping)):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return tuple(_plain(v) for v in x)
  return x


def _take(section: dict, cls, where: str) -> Any:
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(section) - known)
  if unknown:
    raise _err(f"{where}.{unknown[0]}", f"unknown key(s) {unknown}; known: {sorted(known)}")
  return cls(**section)


def _int(obj, field: str, lo: int | None = None, where: str = "") -> None:
  v = getattr(obj, field)
  name = f"{where}.{field}" if where else field
  if not isinstance(v, int) or isinstance(v, bool):
    raise _err(name, f"expected an int, got {v!r}")
  if lo is not None and v < lo:
    raise _err(name, f"expected >= {lo}, got {v}")


def _float(obj, field: str, lo: float | None = None, hi: float | None = None, where: str = "",
           open_lo: bool = False) -> None:
  v = getattr(obj, field)
  name = f"{where}.{field}" if where else field
  if not isinstance(v, (int, float)) or isinstance(v, bool):
    raise _err(name, f"expected a number, got {v!r}")
  if not math.isfinite(v):  # nan passes every comparison below and would train to a NaN "success"
    raise _err(name, f"expected a finite number, got {v!r}")
  if lo is not None and (v <= lo if open_lo else v < lo):
    raise _err(name, f"expected {'>' if open_lo else '>='} {lo}, got {v}")
  if hi is not None and v > hi:
    raise _err(name, f"expected <= {hi}, got {v}")


def _regexes(values, name: str) -> tuple[str, ...]:
  if isinstance(values, str):
    values = (values,)
  out = []
  for i, r in enumerate(values):
    try:
      re.compile(r)
    except (re.error, TypeError) as e:
      raise _err(f"{name}[{i}]", f"not a valid regex {r!r}: {e}") from None
    out.append(r)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "synthetic"     # "synthetic": contract-shaped generated rows; "grain": kangaroo_jax.data pipeline
  batch_size: int = 8           # global rows per optimizer step (all hosts, all micro-batches)
  seq_len: int = 256            # tokens per packed row
  frame_size: int = 56          # square frames, pixels
  max_frames: int = 8           # frame slots per row
  num_frames: int = 8           # frames sampled per video (grain); even
  dataset: str = ""             # grain: ArrayRecord shards of tools.build_dataset (folder, file or glob), or a TFDS
                                # split "tfds:NAME[/CONFIG][:VERSION][:SPLIT]" (kangaroo_jax.data.tfds_source)
  tfds_data_dir: str = ""       # tfds: where the prepared dataset lies ("": $TFDS_DATA_DIR or ~/tensorflow_datasets)
  tfds_mapping: str = ""        # tfds: a mapping shape for a dataset tfds_mappings.DATASET_SHAPES does not name
  tokenizer: str = ""           # folder with tokenizer files (grain; copied into the export)
  worker_count: int = 0         # Grain worker processes
  shuffle_seed: int = 0
  max_skip_rate: float = 0.05   # grain: stop when more than this fraction of samples was unusable

  def validate(self) -> None:
    w = "data"
    if self.source not in DATA_SOURCES:
      raise _err(f"{w}.source", f"got {self.source!r}, expected one of {DATA_SOURCES}")
    for f in ("batch_size", "seq_len", "frame_size", "max_frames", "num_frames"):
      _int(self, f, 1, w)
    _int(self, "worker_count", 0, w)
    _int(self, "shuffle_seed", 0, w)
    _float(self, "max_skip_rate", 0.0, 1.0, where=w)
    if self.max_frames % 2 or self.num_frames % 2:
      raise _err(f"{w}.max_frames", f"frame counts must be even (patchify pairs frames), got "
                 f"max_frames={self.max_frames}, num_frames={self.num_frames}")
    if self.num_frames > self.max_frames:
      raise _err(f"{w}.num_frames", f"{self.num_frames} frames per video exceed max_frames={self.max_frames}")
    if self.source == "grain":
      for f in ("dataset", "tokenizer"):
        if not getattr(self, f):
          raise _err(f"{w}.{f}", "required when data.source='grain'")
    self._validate_tfds()

  def _validate_tfds(self) -> None:
    from kangaroo_jax.data.config import DataConfigError, is_tfds, parse_tfds
    w = "data"
    for f in ("dataset", "tfds_data_dir", "tfds_mapping"):
      if not isinstance(getattr(self, f), str):
        raise _err(f"{w}.{f}", f"expected a string, got {getattr(self, f)!r}")
    if is_tfds(self.dataset):
      try:
        parse_tfds(self.dataset, f"{w}.dataset")
      except DataConfigError as e:
        raise ConfigError(str(e)) from None
    elif self.tfds_data_dir or self.tfds_mapping:
      f = "tfds_data_dir" if self.tfds_data_dir else "tfds_mapping"
      raise _err(f"{w}.{f}", f"only for a TFDS dataset (data.dataset='tfds:NAME[:SPLIT]'), got "
                 f"dataset={self.dataset!r}")
    if self.tfds_mapping:
      from kangaroo_jax.data.tfds_mappings import MAPPINGS
      if self.tfds_mapping not in MAPPINGS:
        raise _err(f"{w}.tfds_mapping", f"got {self.tfds_mapping!r}, expected one of {sorted(MAPPINGS)}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-3
  warmup_steps: int = 10
  min_lr_ratio: float = 0.1     # cosine ends at lr * min_lr_ratio at total_steps
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0     # decoupled; applied to kernels and embeddings only
  clip_norm: float = 1.0        # global norm over trainable grads; 0 disables
  grad_accum: int = 1           # micro-batches per step; batch_size must divide by it
  trainable: tuple[str, ...] = (".*",)   # a param trains iff its path matches one of these ...
  frozen: tuple[str, ...] = ()           # ... and none of these (paths like llm/model/layers/mlp/up_proj/kernel)
  lr_scales: tuple[tuple[str, float], ...] = ()  # (regex, factor): first match scales that param's lr
  max_nonfinite: int = 5        # stop after this many non-finite steps in a row (each one is skipped)

  def validate(self) -> None:
    w = "optim"
    _float(self, "lr", 0.0, where=w, open_lo=True)
    _int(self, "warmup_steps", 0, w)
    _float(self, "min_lr_ratio", 0.0, 1.0, where=w)
    _float(self, "b1", 0.0, 1.0, where=w)
    _float(self, "b2", 0.0, 1.0, where=w)
    _float(self, "eps", 0.0, where=w, open_lo=True)
    _float(self, "weight_decay", 0.0, where=w)
    _float(self, "clip_norm", 0.0, where=w)
    _int(self, "grad_accum", 1, w)
    _int(self, "max_nonfinite", 1, w)
    if not self.trainable:
      raise _err(f"{w}.trainable", "empty: nothing would train")
    for i, item in enumerate(self.lr_scales):
      if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (int, float))
              and not isinstance(item[1], bool) and math.isfinite(item[1]) and item[1] >= 0):
        raise _err(f"{w}.lr_scales[{i}]", f"expected (regex, finite factor >= 0), got {item!r}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 100              # save every N steps (and at the end, and on SIGTERM)
  keep: int = 3                 # keep the last K ...
  keep_best: int = 1            # ... plus the best K by mean training loss since the previous save
  async_save: bool = True

  def validate(self) -> None:
    _int(self, "every", 1, "ckpt")
    _int(self, "keep", 1, "ckpt")
    _int(self, "keep_best", 0, "ckpt")
    if not isinstance(self.async_save, bool):
      raise _err("ckpt.async_save", f"expected a bool, got {self.async_save!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: KangarooConfig
  mesh: MeshConfig
  data: DataConfig
  optim: OptimConfig
  ckpt: CheckpointConfig
  stage: str = "train"
  seed: int = 0
  total_steps: int = 100
  log_every: int = 10
  init_from: str = ""           # previous stage's export folder (params only; optimizer starts fresh)
  export: bool = True           # write WORKDIR/export at the end
  peak_flops_per_device: float = 0.0  # for MFU where the device kind is not in metrics.PEAK_FLOPS
  run: RunOptions = dataclasses.field(default_factory=RunOptions)  # how the model runs (not stored in exports)
  raw: dict = dataclasses.field(default_factory=dict, compare=False)  # the plain config, saved with checkpoints

  @property
  def micro_batch(self) -> int:
    return self.data.batch_size // self.optim.grad_accum


_TOP = ("stage", "seed", "total_steps", "log_every", "init_from", "export", "peak_flops_per_device")
_SECTIONS = ("model", "mesh", "data", "optim", "ckpt")
_OPTIONAL_SECTIONS = ("run",)


def model_config(section: dict) -> KangarooConfig:
  """{"preset": name, "overrides": nested dict} -> KangarooConfig (validated by its own __post_init__)."""
  unknown = sorted(set(section) - {"preset", "overrides"})
  if unknown:
    raise _err(f"model.{unknown[0]}", "unknown key; expected 'preset' and 'overrides'")
  base = preset(section.get("preset", "tiny")).to_dict()

  def merge(dst: dict, src: dict, where: str):
    for k, v in src.items():
      if not where and k in RunOptions.field_names():
        raise _err(f"model.overrides.{k}", f"a run option, not a model shape; set run.{k} instead")
      if k not in dst:
        raise _err(f"model.overrides.{where}{k}", f"unknown model field; known: {sorted(dst)}")
      if isinstance(v, dict) and isinstance(dst[k], dict):
        merge(dst[k], v, f"{where}{k}.")
      elif isinstance(v, dict) and dst[k] is None:
        dst[k] = v
      else:
        dst[k] = list(v) if isinstance(v, tuple) else v
  merge(base, section.get("overrides", {}) or {}, "")
  _reject_nonfinite(base, "model.overrides")
  try:
    return KangarooConfig.from_dict(base)
  except (ConfigError, TypeError) as e:
    raise _err("model.overrides", str(e)) from None


def run_options(section: dict) -> RunOptions:
  """The `run` section -> RunOptions; ConfigError naming `run.<field>` for an unknown key or a bad value."""
  return RunOptions.from_dict(section, where="run")


def _reject_nonfinite(tree: Any, where: str) -> None:
  """Raises naming the first nan / inf float anywhere in a nested dict / sequence."""
  if isinstance(tree, float) and not math.isfinite(tree):
    raise _err(where, f"expected a finite number, got {tree!r}")
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      _reject_nonfinite(v, f"{where}.{k}")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      _reject_nonfinite(v, f"{where}[{i}]")


def from_configdict(config: ml_collections.ConfigDict) -> TrainConfig:
  """Validates every field and resolves the model/mesh configs. Raises ConfigError naming the field."""
  d = _plain(config)
  unknown = sorted(set(d) - set(_TOP) - set(_SECTIONS) - set(_OPTIONAL_SECTIONS))
  if unknown:
    known = sorted(_TOP + _SECTIONS + _OPTIONAL_SECTIONS)
    raise _err(unknown[0], f"unknown top-level key(s) {unknown}; known: {known}")
  for s in _SECTIONS:
    if s not in d:
      raise _err(s, "missing section")
  mesh_d = d["mesh"]
  try:
    mesh = _take(mesh_d, MeshConfig, "mesh")
  except TypeError as e:
    raise _err("mesh", str(e)) from None
  for f in dataclasses.fields(MeshConfig):
    v = getattr(mesh, f.name)
    if not isinstance(v, int) or (v < 1 and not (v == -1 and not f.name.startswith("dcn"))):
      raise _err(f"mesh.{f.name}", f"expected a positive int (or -1 for one ICI axis), got {v!r}")
  optim_d = dict(d["optim"])
  for k in ("trainable", "frozen"):
    if k in optim_d:
      optim_d[k] = _regexes(optim_d[k], f"optim.{k}")
  if "lr_scales" in optim_d:
    optim_d["lr_scales"] = tuple((_regexes(r, "optim.lr_scales")[0], s) for r, s in optim_d["lr_scales"])
  cfg = TrainConfig(
      model=model_config(d["model"]), mesh=mesh, data=_take(d["data"], DataConfig, "data"),
      optim=_take(optim_d, OptimConfig, "optim"), ckpt=_take(d["ckpt"], CheckpointConfig, "ckpt"),
      run=run_options(d.get("run", {}) or {}), **{k: d[k] for k in _TOP if k in d}, raw=d)
  cfg.data.validate()
  cfg.optim.validate()
  cfg.ckpt.validate()
  for f in ("seed", "total_steps", "log_every"):
    _int(cfg, f, 0 if f == "seed" else 1)
  _float(cfg, "peak_flops_per_device", 0.0)
  if not isinstance(cfg.stage, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.stage):
    raise _err("stage", f"expected a short name ([A-Za-z0-9_.-]+), got {cfg.stage!r}")
  if cfg.data.batch_size % cfg.optim.grad_accum:
    raise _err("optim.grad_accum", f"data.batch_size {cfg.data.batch_size} is not divisible by grad_accum "
               f"{cfg.optim.grad_accum}")
  cfg.run.check_for_training("run")
  if cfg.data.frame_size % cfg.model.vision.patch_size:
    raise _err("data.frame_size", f"{cfg.data.frame_size} is not a multiple of the patch size "
               f"{cfg.model.vision.patch_size}")
  return cfg


def validate_for_mesh(cfg: TrainConfig, mesh_shape: Mapping[str, int], num_processes: int) -> None:
  """The checks that need the resolved mesh: batch / sequence divisibility (all problems in one error)."""
  from kangaroo_jax.parallel.validate import validate_mesh_for_model
  if cfg.data.batch_size % num_processes:
    raise _err("data.batch_size", f"{cfg.data.batch_size} rows cannot be split over {num_processes} processes")
  validate_mesh_for_model(cfg.model, cfg.run, mesh_shape, batch=cfg.micro_batch, seq_len=cfg.data.seq_len,
                          frames_per_row=cfg.data.max_frames)
