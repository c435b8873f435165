"""Fill our parameter arrays from released tensors, one tensor at a time, with strict key accounting.

Two uses of one accounting object (`Assembler`):
  * in memory (`add` + `finish`, via `load_released_tensors`): each target array is allocated once in
    the target dtype and written slice by slice (tests, small models);
  * planning from headers only (`accept` + `check`): every key is classified and shape-checked and the
    source key of every parameter slice is recorded in `sources`, before a single weight is read; the
    streaming converter (tools/convert_weights/convert.py) then reads and writes one tensor at a time.
All problems are collected and reported together.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

import numpy as np
from flax import nnx

from tools.convert_weights.mapping import (
    RULES,
    Ignored,
    Mapped,
    Path,
    Rule,
    classify,
    released_shape,
    strip_prefix,
    to_ours,
)


class ConversionError(ValueError):
  """The released checkpoint does not match the model config; the message lists every problem."""


@dataclasses.dataclass
class Report:
  mapped: int = 0
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> reason
  bytes_read: int = 0
  defaulted: dict[str, str] = dataclasses.field(default_factory=dict)  # absent optional key -> what was used


_HINTS = (
    ("vision_tower.head.", "the CLIP head is normally ignored; check the key spelling"),
    ("vision_tower.", "a vision tower variant (VisionConfig: width/num_layers/head_width, or a different EVA naming)"),
    ("mm_projector.", "ProjectorConfig.projector_type or patchify='conv3d'/tpe='learned' parameters"),
    ("model.layers.", "LlamaConfig.num_layers / attention_bias / mlp_bias"),
)


def _hint(key: str) -> str:
  for prefix, hint in _HINTS:
    if key.startswith(prefix):
      return hint
  return "no config option known to produce this key"


class Assembler:
  """Collects released tensors into our flat state {path: np.ndarray}, or only plans that (headers only).

  Args:
    targets: our flat parameter shapes/dtypes {path: (shape, dtype)} (e.g. from nnx.eval_shape).
    prefix: path prefix of `targets` inside the full Kangaroo model (("llm",) for a bare Llama).
    rules: mapping rules (default: the released Kangaroo naming).
    optional: released keys that may be absent, {key: (fill, reason)} with fill "ones" or "zeros"
      (e.g. the final vision `norm`, which the default feature tap never uses).
  """

  def __init__(
      self,
      targets: Mapping[Path, tuple[tuple[int, ...], np.dtype]],
      prefix: Path = (),
      rules: Iterable[Rule] = RULES,
      optional: Mapping[str, tuple[str, str]] | None = None,
  ):
    self.targets = dict(targets)
    self.prefix = prefix
    self.rules = tuple(r for r in rules if strip_prefix(r.path, prefix) in self.targets)
    self.optional = dict(optional or {})
    self.arrays: dict[Path, np.ndarray] = {}
    self.filled: dict[Path, set] = {}
    # path -> {layer (None if not stacked): released key}: where each slice of each parameter comes from.
    self.sources: dict[Path, dict[int | None, str]] = {}
    self.report = Report()
    self.unmapped: list[str] = []
    self.errors: list[str] = []

  def accept(self, key: str, shape: tuple[int, ...], dtype) -> tuple[Path, Mapped] | None:
    """Accounts for one released tensor from its header entry. Returns where it goes, or None."""
    what = classify(key, self.rules)
    if isinstance(what, Ignored):
      self.report.ignored[key] = what.reason
      return None
    if what is None:
      self.unmapped.append(f"{key} {tuple(shape)} {np.dtype(dtype)} (hint: {_hint(key)})")
      return None
    path = strip_prefix(what.rule.path, self.prefix)
    target_shape, _ = self.targets[path]
    slice_shape = target_shape[1:] if what.rule.stacked else target_shape
    expected = released_shape(slice_shape, what.rule)
    if tuple(shape) != expected:
      self.errors.append(f"{key}: expected shape {expected}, found {tuple(shape)}")
      return None
    if np.dtype(dtype).kind in "iub":
      self.errors.append(f"{key}: expected a floating-point tensor, found dtype {np.dtype(dtype)}")
      return None
    if what.rule.stacked and not 0 <= what.layer < target_shape[0]:
      self.errors.append(f"{key}: layer index {what.layer} out of range for {target_shape[0]} layers")
      return None
    slot = what.layer if what.rule.stacked else None
    if slot in self.filled.setdefault(path, set()):
      self.errors.append(f"{key}: given twice")
      return None
    self.filled[path].add(slot)
    self.sources.setdefault(path, {})[slot] = key
    self.report.mapped += 1
    self.report.bytes_read += math.prod(shape) * np.dtype(dtype).itemsize
    return path, what

  def add(self, key: str, value: np.ndarray) -> None:
    placed = self.accept(key, tuple(value.shape), value.dtype)
    if placed is None:
      return
    path, what = placed
    shape, dtype = self.targets[path]
    converted = to_ours(value, what.rule.transform).astype(dtype, copy=False)
    if path not in self.arrays:
      self.arrays[path] = np.empty(shape, dtype)
    if what.rule.stacked:
      self.arrays[path][what.layer] = converted
    else:
      self.arrays[path][...] = converted

  def defaults(self) -> dict[Path, tuple[str, str, str]]:
    """Unstacked parameters whose optional released key is absent: {path: (key, fill, reason)}."""
    out = {}
    for rule in self.rules:
      path = strip_prefix(rule.path, self.prefix)
      if rule.key in self.optional and not rule.stacked and None not in self.filled.get(path, set()):
        fill, reason = self.optional[rule.key]
        out[path] = (rule.key, fill, reason)
    return out

  def missing(self) -> list[str]:
    out = []
    defaulted = self.defaults()
    for rule in self.rules:
      path = strip_prefix(rule.path, self.prefix)
      shape = self.targets[path][0]
      have = self.filled.get(path, set())
      if rule.stacked:
        out += [f"{rule.key.format(i=i)} {released_shape(shape[1:], rule)}" for i in range(shape[0]) if i not in have]
      elif None not in have and path not in defaulted:
        out.append(f"{rule.key} {released_shape(shape, rule)}")
    covered = {strip_prefix(r.path, self.prefix) for r in self.rules}
    out += [f"(no released key maps to our parameter {'.'.join(p)})" for p in self.targets if p not in covered]
    return out

  def check(self) -> None:
    """Raises ConversionError listing every unmapped key, shape/layout error and missing key."""
    problems = []
    if self.unmapped:
      problems.append(f"{len(self.unmapped)} unmapped key(s):\n  " + "\n  ".join(sorted(self.unmapped)))
    if self.errors:
      problems.append(f"{len(self.errors)} shape/layout error(s):\n  " + "\n  ".join(self.errors))
    missing = self.missing()
    if missing:
      problems.append(f"{len(missing)} missing key(s):\n  " + "\n  ".join(missing))
    if problems:
      raise ConversionError("checkpoint does not match the model config:\n" + "\n".join(problems))
    for path, (key, fill, reason) in self.defaults().items():
      self.report.defaulted[key] = f"filled with {fill}: {reason}"

  def finish(self) -> dict[Path, np.ndarray]:
    """Returns the complete flat state, or raises ConversionError listing every problem."""
    self.check()
    for path, (_, fill, _) in self.defaults().items():
      shape, dtype = self.targets[path]
      self.arrays[path] = (np.ones if fill == "ones" else np.zeros)(shape, dtype)
    return self.arrays


def param_targets(model: nnx.Module) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """{path: (shape, dtype)} of a (possibly abstract) model's parameters."""
  return {
      tuple(map(str, p)): (tuple(v.shape), np.dtype(v.dtype)) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def load_released_tensors(model: nnx.Module, tensors: Mapping[str, np.ndarray], prefix: Path = ()) -> Report:
  """Loads a released-format {key: array} dict into `model` in place (tests, small models)."""
  asm = Assembler(param_targets(model), prefix)
  for key, value in tensors.items():
    asm.add(key, np.asarray(value))
  arrays = asm.finish()
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  nnx.update(model, nnx.from_flat_state([(p, v.replace(arrays[tuple(map(str, p))])) for p, v in flat]))
  return asm.report
