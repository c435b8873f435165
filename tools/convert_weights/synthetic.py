"""Random checkpoints in the exact released naming, for tests and the conversion benchmark.

`released_entries(cfg)` lists every tensor a released Kangaroo checkpoint of config `cfg` holds:
the mapped ones (from the same rules table the converter uses) plus the extras the converter
ignores (EVA `rope.freqs_cos/sin` buffers, the CLIP `head`). `write_checkpoint` streams random
values for them into a model.safetensors (one tensor in memory at a time) with a matching config.json.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterator

import numpy as np

from kangaroo_jax.config import KangarooConfig
from tools.convert_weights import safetensors_io
from tools.convert_weights.hf_config import hf_from_llama
from tools.convert_weights.mapping import RULES, released_shape

CLIP_EMBED_DIM = 768  # EVA02-CLIP-L head output (spec section 2.4)


def _param_shapes(cfg: KangarooConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  from flax import nnx
  from kangaroo_jax.models import Kangaroo
  abstract = nnx.eval_shape(lambda: Kangaroo(cfg, rngs=nnx.Rngs(0)))
  return {tuple(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def released_entries(cfg: KangarooConfig, *, extras: bool = True,
                     head_dim: int = CLIP_EMBED_DIM) -> list[tuple[str, tuple[int, ...]]]:
  """[(key, shape)] of a released checkpoint for `cfg` (mapped keys, plus ignored extras if `extras`)."""
  shapes = _param_shapes(cfg)
  out = []
  for rule in RULES:
    if rule.path not in shapes:
      continue
    shape = shapes[rule.path]
    if rule.stacked:
      out += [(rule.key.format(i=i), released_shape(shape[1:], rule)) for i in range(shape[0])]
    else:
      out.append((rule.key, released_shape(shape, rule)))
  if extras:
    v = cfg.vision
    rope = (v.trained_grid ** 2, v.head_width)
    out += [("vision_tower.rope.freqs_cos", rope), ("vision_tower.rope.freqs_sin", rope),
            ("vision_tower.head.weight", (head_dim, v.width)), ("vision_tower.head.bias", (head_dim,))]
  return out


def random_tensor(key: str, shape: tuple[int, ...], rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
  """Plausible random values: norm scales around 1, everything else small."""
  if key.endswith(("norm.weight", "layernorm.weight", "norm1.weight", "norm2.weight", "ffn_ln.weight",
                   "inner_attn_ln.weight")):
    x = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
  else:
    x = 0.05 * rng.standard_normal(shape, dtype=np.float32)
  return x.astype(dtype)


def write_checkpoint(folder: str, cfg: KangarooConfig, *, dtype=np.float32, seed: int = 0,
                     extras: bool = True) -> dict:
  """Writes folder/model.safetensors + folder/config.json; returns {"bytes", "largest_tensor_bytes", "tensors"}."""
  os.makedirs(folder, exist_ok=True)
  entries = [(k, s, np.dtype(dtype)) for k, s in sorted(released_entries(cfg, extras=extras))]
  rng = np.random.default_rng(seed)

  def tensors() -> Iterator[tuple[str, np.ndarray]]:
    for key, shape, dt in entries:
      yield key, random_tensor(key, shape, rng, dt)

  path = os.path.join(folder, "model.safetensors")
  written = safetensors_io.write_file(path, entries, tensors(), metadata={"format": "pt"})
  torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np.dtype(dtype).name]
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_from_llama(cfg.llm, torch_dtype), f, indent=2)
  largest = max(math.prod(s) * np.dtype(d).itemsize for _, s, d in entries)
  return {"bytes": written, "largest_tensor_bytes": largest, "tensors": len(entries), "path": path}
