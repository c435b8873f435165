"""Experiment config (an ml_collections ConfigDict file) -> a validated, frozen `TrainConfig`.

Every field is checked once, before anything is traced: a typo or an impossible value fails with the
dotted name of the field (`optim.warmup_steps: ...`), never as an XLA error later. Each section checks
itself in `__post_init__` with the shared kangaroo_jax/checks.py helpers; `from_configdict` adds the checks
that span sections. Unknown keys are errors too, so a misspelt override cannot be silently ignored.

Config file sections (see configs/common.py for the defaults):
  stage, seed, total_steps, log_every, init_from, export, peak_flops_per_device,
  sharding_rules ((logical axis, mesh axes), ... over kangaroo_jax.parallel.rules), max_replicated_fraction,
  sharding_check ("warn" | "error" | "off": the trainer's sufficiently-sharded check on the placed state)
  model:  preset, overrides (nested dict applied onto the preset's KangarooConfig.to_dict(): shapes only)
  run:    how the model runs: RunOptions fields (compute_dtype, attention_impl, remat_policy, ...);
          optional, default RunOptions() (kangaroo_jax/run_options.py); training needs param_dtype float32
  mesh:   data, fsdp, context, tensor, dcn_*          (kangaroo_jax.parallel.mesh.MeshConfig)
  data:   source, batch_size (global rows), seq_len, frame_size, max_frames, ... (kangaroo_jax.data.config.DataConfig,
          the pipeline's own config: every pipeline option can be set here)
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

from kangaroo_jax.checks import check, check_bool, check_float, check_int
from kangaroo_jax.config import ConfigError, KangarooConfig, preset
from kangaroo_jax.data.config import DataConfig
from kangaroo_jax.parallel.mesh import MeshConfig
from kangaroo_jax.parallel.rules import merge_rules
from kangaroo_jax.run_options import RunOptions


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
class OptimConfig:
  lr: float = 1e-3
  warmup_steps: int = 10
  min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio at total_steps
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0  # decoupled; applied to kernels and embeddings only
  clip_norm: float = 1.0  # global norm over trainable grads; 0 disables
  grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
  trainable: tuple[str, ...] = (".*",)  # a param trains iff its path matches one of these ...
  frozen: tuple[str, ...] = ()  # ... and none of these (paths like llm/model/layers/mlp/up_proj/kernel)
  lr_scales: tuple[tuple[str, float], ...] = ()  # (regex, factor): first match scales that param's lr
  max_nonfinite: int = 5  # stop after this many non-finite steps in a row (each one is skipped)

  def __post_init__(self):
    w = "optim"
    for f in ("trainable", "frozen"):  # a single regex is a one-element tuple
      object.__setattr__(self, f, _regexes(getattr(self, f), f"{w}.{f}"))
    check_float(self, w, "lr", 0.0, open_lo=True)
    check_int(self, w, "warmup_steps", 0)
    check_float(self, w, "min_lr_ratio", 0.0, 1.0)
    check_float(self, w, "b1", 0.0, 1.0)
    check_float(self, w, "b2", 0.0, 1.0)
    check_float(self, w, "eps", 0.0, open_lo=True)
    check_float(self, w, "weight_decay", 0.0)
    check_float(self, w, "clip_norm", 0.0)
    check_int(self, w, "grad_accum", 1)
    check_int(self, w, "max_nonfinite", 1)
    check(bool(self.trainable), w, "trainable", "empty: nothing would train")
    scales = tuple(tuple(item) if isinstance(item, list) else item for item in self.lr_scales)
    for i, item in enumerate(scales):
      check(
          isinstance(item, tuple)
          and len(item) == 2
          and isinstance(item[1], (int, float))
          and not isinstance(item[1], bool)
          and math.isfinite(item[1])
          and item[1] >= 0,
          w,
          f"lr_scales[{i}]",
          f"expected (regex, finite factor >= 0), got {item!r}",
      )
    object.__setattr__(self, "lr_scales", tuple((_regexes(r, f"{w}.lr_scales")[0], f) for r, f in scales))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 100  # save every N steps (and at the end, and on SIGTERM)
  keep: int = 3  # keep the last K ...
  keep_best: int = 1  # ... plus the best K by mean training loss since the previous save
  async_save: bool = True

  def __post_init__(self):
    check_int(self, "ckpt", "every", 1)
    check_int(self, "ckpt", "keep", 1)
    check_int(self, "ckpt", "keep_best", 0)
    check_bool(self, "ckpt", "async_save")


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
  init_from: str = ""  # previous stage's export folder (params only; optimizer starts fresh)
  export: bool = True  # write WORKDIR/export at the end
  peak_flops_per_device: float = 0.0  # for MFU where the device kind is not in metrics.PEAK_FLOPS
  # ((logical axis, mesh axes), ...) laid over kangaroo_jax.parallel.rules.LOGICAL_AXIS_RULES for this run
  sharding_rules: tuple = ()
  max_replicated_fraction: float = 0.02  # of parameter bytes held whole on every device, before the check speaks
  sharding_check: str = "warn"  # over that: "warn" (one line naming the largest), "error" (MeshError), "off"
  run: RunOptions = dataclasses.field(default_factory=RunOptions)  # how the model runs (not stored in exports)
  raw: dict = dataclasses.field(default_factory=dict, compare=False)  # the plain config, saved with checkpoints

  @property
  def micro_batch(self) -> int:
    return self.data.batch_size // self.optim.grad_accum

  @property
  def rules(self) -> tuple:
    """The full logical-axis rules table of this run: `sharding_rules` merged over the default."""
    return merge_rules(self.sharding_rules)


_TOP = (
    "stage",
    "seed",
    "total_steps",
    "log_every",
    "init_from",
    "export",
    "peak_flops_per_device",
    "sharding_rules",
    "max_replicated_fraction",
    "sharding_check",
)
SHARDING_CHECKS = ("warn", "error", "off")
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
  cfg = TrainConfig(
      model=model_config(d["model"]),
      mesh=mesh,
      data=_take(d["data"], DataConfig, "data"),
      optim=_take(d["optim"], OptimConfig, "optim"),
      ckpt=_take(d["ckpt"], CheckpointConfig, "ckpt"),
      run=run_options(d.get("run", {}) or {}),
      **{k: d[k] for k in _TOP if k in d},
      raw=d,
  )
  for f in ("seed", "total_steps", "log_every"):
    check_int(cfg, "", f, 0 if f == "seed" else 1)
  check_float(cfg, "", "peak_flops_per_device", 0.0)
  check_float(cfg, "", "max_replicated_fraction", 0.0, 1.0)
  check(
      cfg.sharding_check in SHARDING_CHECKS,
      "",
      "sharding_check",
      f"got {cfg.sharding_check!r}, expected one of {SHARDING_CHECKS}",
  )
  merge_rules(cfg.sharding_rules)  # RulesError (a ConfigError) names the entry and its logical axis
  check(
      isinstance(cfg.data.frame_size, int),
      "data",
      "frame_size",
      f"expected an int (the trainer takes square frames), got {cfg.data.frame_size!r}",
  )
  if not isinstance(cfg.stage, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.stage):
    raise _err("stage", f"expected a short name ([A-Za-z0-9_.-]+), got {cfg.stage!r}")
  if cfg.data.batch_size % cfg.optim.grad_accum:
    raise _err(
        "optim.grad_accum",
        f"data.batch_size {cfg.data.batch_size} is not divisible by grad_accum " f"{cfg.optim.grad_accum}",
    )
  cfg.run.check_for_training("run")
  if cfg.data.frame_size % cfg.model.vision.patch_size:
    raise _err(
        "data.frame_size",
        f"{cfg.data.frame_size} is not a multiple of the patch size " f"{cfg.model.vision.patch_size}",
    )
  return cfg


def validate_for_mesh(cfg: TrainConfig, mesh_shape: Mapping[str, int], num_processes: int) -> None:
  """The checks that need the resolved mesh: batch / sequence divisibility (all problems in one error)."""
  from kangaroo_jax.parallel.validate import validate_mesh_for_model

  if cfg.data.batch_size % num_processes:
    raise _err("data.batch_size", f"{cfg.data.batch_size} rows cannot be split over {num_processes} processes")
  validate_mesh_for_model(
      cfg.model,
      cfg.run,
      mesh_shape,
      batch=cfg.micro_batch,
      seq_len=cfg.data.seq_len,
      frames_per_row=cfg.data.max_frames,
  )
