"""Fill our parameter arrays from released tensors, one tensor at a time, with strict key accounting.

Each target array is allocated once (in the target dtype) and written slice by slice, so peak memory
is one copy of the model plus the tensor in flight. All problems are collected and reported together.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import numpy as np
from flax import nnx

from tools.convert_weights.mapping import (RULES, Ignored, Mapped, Path, Rule, classify, released_shape,
                                           strip_prefix, to_ours)


class ConversionError(ValueError):
  """The released checkpoint does not match the model config; the message lists every problem."""


@dataclasses.dataclass
class Report:
  mapped: int = 0
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> reason
  bytes_read: int = 0


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
  """Collects released tensors into our flat state {path: np.ndarray}.

  Args:
    targets: our flat parameter shapes/dtypes {path: (shape, dtype)} (e.g. from nnx.eval_shape).
    prefix: path prefix of `targets` inside the full Kangaroo model (("llm",) for a bare Llama).
    rules: mapping rules (default: the released Kangaroo naming).
  """

  def __init__(self, targets: Mapping[Path, tuple[tuple[int, ...], np.dtype]], prefix: Path = (),
               rules: Iterable[Rule] = RULES):
    self.targets = dict(targets)
    self.prefix = prefix
    self.rules = tuple(r for r in rules if strip_prefix(r.path, prefix) in self.targets)
    self.arrays: dict[Path, np.ndarray] = {}
    self.filled: dict[Path, set] = {}
    self.report = Report()
    self.unmapped: list[str] = []
    self.errors: list[str] = []

  def add(self, key: str, value: np.ndarray) -> None:
    what = classify(key, self.rules)
    if isinstance(what, Ignored):
      self.report.ignored[key] = what.reason
      return
    if what is None:
      self.unmapped.append(f"{key} {tuple(value.shape)} {value.dtype} (hint: {_hint(key)})")
      return
    self._place(key, what, value)

  def _place(self, key: str, what: Mapped, value: np.ndarray) -> None:
    path = strip_prefix(what.rule.path, self.prefix)
    shape, dtype = self.targets[path]
    slice_shape = shape[1:] if what.rule.stacked else shape
    expected = released_shape(slice_shape, what.rule)
    if tuple(value.shape) != expected:
      self.errors.append(f"{key}: expected shape {expected}, found {tuple(value.shape)}")
      return
    if what.rule.stacked and not 0 <= what.layer < shape[0]:
      self.errors.append(f"{key}: layer index {what.layer} out of range for {shape[0]} layers")
      return
    converted = to_ours(value, what.rule.transform).astype(dtype, copy=False)
    if path not in self.arrays:
      self.arrays[path] = np.empty(shape, dtype)
      self.filled[path] = set()
    slot = what.layer if what.rule.stacked else None
    if slot in self.filled[path]:
      self.errors.append(f"{key}: given twice")
      return
    if what.rule.stacked:
      self.arrays[path][what.layer] = converted
    else:
      self.arrays[path][...] = converted
    self.filled[path].add(slot)
    self.report.mapped += 1
    self.report.bytes_read += value.nbytes

  def missing(self) -> list[str]:
    out = []
    for rule in self.rules:
      path = strip_prefix(rule.path, self.prefix)
      shape = self.targets[path][0]
      have = self.filled.get(path, set())
      if rule.stacked:
        out += [f"{rule.key.format(i=i)} {released_shape(shape[1:], rule)}" for i in range(shape[0]) if i not in have]
      elif None not in have:
        out.append(f"{rule.key} {released_shape(shape, rule)}")
    covered = {strip_prefix(r.path, self.prefix) for r in self.rules}
    out += [f"(no released key maps to our parameter {'.'.join(p)})" for p in self.targets if p not in covered]
    return out

  def finish(self) -> dict[Path, np.ndarray]:
    """Returns the complete flat state, or raises ConversionError listing every problem."""
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
    return self.arrays


def param_targets(model: nnx.Module) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """{path: (shape, dtype)} of a (possibly abstract) model's parameters."""
  return {tuple(map(str, p)): (tuple(v.shape), np.dtype(v.dtype))
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_released_tensors(model: nnx.Module, tensors: Mapping[str, np.ndarray], prefix: Path = ()) -> Report:
  """Loads a released-format {key: array} dict into `model` in place (tests, small models)."""
  asm = Assembler(param_targets(model), prefix)
  for key, value in tensors.items():
    asm.add(key, np.asarray(value))
  arrays = asm.finish()
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  nnx.update(model, nnx.from_flat_state([(p, v.replace(arrays[tuple(map(str, p))])) for p, v in flat]))
  return asm.report
