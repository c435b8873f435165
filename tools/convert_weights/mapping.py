"""The released checkpoint's tensor names <-> our NNX parameter paths, both directions, from one table.

Every released key is either mapped by a rule, deliberately ignored with a stated reason, or
reported as unmapped: nothing is dropped silently (docs/model.md section 4). Layer-indexed keys
(`model.layers.{i}.…`, `vision_tower.blocks.{i}.…`) land in slice i of the scanned parameter.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Iterator

import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """One released key template (with `{i}` for the layer index) and where it lives in our state."""

  key: str
  path: Path
  transform: str  # "id" | "linear" (transpose) | "conv2d" | "cls" | "pos"

  @property
  def stacked(self) -> bool:
    return "{i}" in self.key

  @property
  def regex(self) -> re.Pattern:
    return re.compile("^" + re.escape(self.key).replace(r"\{i\}", r"(\d+)") + "$")


def _p(s: str) -> Path:
  return tuple(s.split("."))


def _llama_rules() -> list[Rule]:
  L = "model.layers.{i}."
  P = "llm.model.layers."
  rules = [
      Rule("model.embed_tokens.weight", _p("llm.model.embed_tokens.embedding"), "id"),
      Rule("model.norm.weight", _p("llm.model.norm.scale"), "id"),
      Rule("lm_head.weight", _p("llm.lm_head.kernel"), "linear"),
      Rule(L + "input_layernorm.weight", _p(P + "input_layernorm.scale"), "id"),
      Rule(L + "post_attention_layernorm.weight", _p(P + "post_attention_layernorm.scale"), "id"),
  ]
  rules += [
      Rule(L + f"self_attn.{n}.weight", _p(P + f"self_attn.{n}.kernel"), "linear")
      for n in ("q_proj", "k_proj", "v_proj", "o_proj")
  ]
  rules += [
      Rule(L + f"mlp.{n}.weight", _p(P + f"mlp.{n}.kernel"), "linear") for n in ("gate_proj", "up_proj", "down_proj")
  ]
  return rules


def _vision_rules() -> list[Rule]:
  V, B, P = "vision_tower.", "vision_tower.blocks.{i}.", "vision_tower.blocks."
  rules = [
      Rule(V + "patch_embed.proj.weight", _p(V + "patch_embed_kernel"), "conv2d"),
      Rule(V + "patch_embed.proj.bias", _p(V + "patch_embed_bias"), "id"),
      Rule(V + "cls_token", _p(V + "cls_token"), "cls"),
      Rule(V + "pos_embed", _p(V + "pos_embed"), "pos"),
      Rule(V + "norm.weight", _p(V + "norm.scale"), "id"),
      Rule(V + "norm.bias", _p(V + "norm.bias"), "id"),
      Rule(B + "attn.q_bias", _p(P + "attn.q_bias"), "id"),
      Rule(B + "attn.v_bias", _p(P + "attn.v_bias"), "id"),
  ]
  for ln in ("norm1", "norm2", "attn.inner_attn_ln", "mlp.ffn_ln"):
    rules += [Rule(B + f"{ln}.weight", _p(P + f"{ln}.scale"), "id"), Rule(B + f"{ln}.bias", _p(P + f"{ln}.bias"), "id")]
  rules += [Rule(B + f"attn.{n}.weight", _p(P + f"attn.{n}.kernel"), "linear") for n in ("q_proj", "k_proj", "v_proj")]
  for n in ("attn.proj", "mlp.w1", "mlp.w2", "mlp.w3"):
    rules += [
        Rule(B + f"{n}.weight", _p(P + f"{n}.kernel"), "linear"),
        Rule(B + f"{n}.bias", _p(P + f"{n}.bias"), "id"),
    ]
  return rules


def _projector_rules() -> list[Rule]:
  return [
      Rule(f"mm_projector.{i}.{w}", _p(f"mm_projector.{name}.{t}"), tr)
      for i, name in (("0", "linear_1"), ("2", "linear_2"))
      for w, t, tr in (("weight", "kernel", "linear"), ("bias", "bias", "id"))
  ]


RULES: tuple[Rule, ...] = tuple(_llama_rules() + _vision_rules() + _projector_rules())

# Released tensors we do not load, and why.
IGNORED: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"(^|\.)rope\.freqs_(cos|sin)$"), "EVA 2-D RoPE table: recomputed from the config"),
    (re.compile(r"rotary_emb\.inv_freq$"), "Llama RoPE inverse frequencies: recomputed from the config"),
    (re.compile(r"^vision_tower\.head\.(weight|bias)$"), "CLIP projection head: unused by the video-language model"),
)


# Released keys that may be absent, with the value to use and why that is harmless. Only offered to the
# assembler when the config does not use the parameter (see tools/convert_weights/convert.py).
OPTIONAL_WHEN_UNUSED: dict[str, tuple[str, str]] = {
    "vision_tower.norm.weight": ("ones", "final vision norm, unused unless VisionConfig.feature_tap='last_postnorm'"),
    "vision_tower.norm.bias": ("zeros", "final vision norm, unused unless VisionConfig.feature_tap='last_postnorm'"),
}


@dataclasses.dataclass(frozen=True)
class Mapped:
  rule: Rule
  layer: int | None


@dataclasses.dataclass(frozen=True)
class Ignored:
  reason: str


def classify(key: str, rules: Iterable[Rule] = RULES) -> Mapped | Ignored | None:
  """What happens to released tensor `key`: mapped by a rule, ignored with a reason, or None (unmapped)."""
  for rule in rules:
    m = rule.regex.match(key)
    if m:
      return Mapped(rule, int(m.group(1)) if rule.stacked else None)
  for pattern, reason in IGNORED:
    if pattern.search(key):
      return Ignored(reason)
  return None


def write_order(keys: Iterable[str], rules: Iterable[Rule] = RULES) -> list[str]:
  """The mapped ones among `keys` in the order the converter reads them: by parameter path (the
  order Orbax writes a nested dict's leaves in), then layer. Known from the keys alone, before the
  model's shapes are traced, so the source can start reading ahead early."""
  rules = tuple(rules)
  rows = []
  for key in keys:
    what = classify(key, rules)
    if isinstance(what, Mapped):
      rows.append((what.rule.path, -1 if what.layer is None else what.layer, key))
  return [key for _, _, key in sorted(rows)]


def to_ours(value: np.ndarray, transform: str) -> np.ndarray:
  """Released layout -> our layout for one tensor (one layer's slice for stacked params)."""
  if transform == "id":
    return value
  if transform == "linear":  # torch Linear [out, in] -> kernel [in, out]
    return value.T
  if transform == "conv2d":  # torch Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
    return value.transpose(2, 3, 1, 0)
  if transform == "cls":  # [1, 1, d] -> [d]
    return value.reshape(value.shape[-1])
  if transform == "pos":  # [1, n, d] -> [n, d]
    return value.reshape(value.shape[-2:])
  raise ValueError(f"unknown transform {transform!r}")


def to_released(value: np.ndarray, transform: str) -> np.ndarray:
  """Inverse of `to_ours`."""
  if transform == "id":
    return value
  if transform == "linear":
    return value.T
  if transform == "conv2d":
    return value.transpose(3, 2, 0, 1)
  if transform == "cls":
    return value.reshape(1, 1, -1)
  if transform == "pos":
    return value.reshape(1, *value.shape)
  raise ValueError(f"unknown transform {transform!r}")


def released_shape(our_shape: tuple[int, ...], rule: Rule) -> tuple[int, ...]:
  """The released tensor shape expected for one (layer slice of a) parameter of shape `our_shape`."""
  return to_released(np.empty(our_shape, dtype=np.uint8), rule.transform).shape


def strip_prefix(path: Path, prefix: Path) -> Path | None:
  """`path` relative to `prefix` (e.g. ("llm",) for a standalone LlamaForCausalLM), or None if outside."""
  return path[len(prefix) :] if path[: len(prefix)] == prefix else None


def released_items(
    flat_state: dict[Path, np.ndarray], rules: Iterable[Rule] = RULES, prefix: Path = ()
) -> Iterator[tuple[str, np.ndarray]]:
  """Our flat {path: array} state -> (released key, tensor) pairs, one layer slice at a time."""
  for rule in rules:
    path = strip_prefix(rule.path, prefix)
    if path is None or path not in flat_state:
      continue
    value = np.asarray(flat_state[path])
    if rule.stacked:
      for i in range(value.shape[0]):
        yield rule.key.format(i=i), to_released(value[i], rule.transform)
    else:
      yield rule.key, to_released(value, rule.transform)
