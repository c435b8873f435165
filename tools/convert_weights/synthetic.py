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

CLIP_EMBED_DIM = 768  # EVA02-CLIP-L head output (docs/model.md section 4)


def _param_shapes(cfg: KangarooConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  from flax import nnx
  from kangaroo_jax.model_tree import abstract_model

  abstract = abstract_model(cfg)
  return {tuple(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def released_entries(
    cfg: KangarooConfig, *, extras: bool = True, head_dim: int = CLIP_EMBED_DIM
) -> list[tuple[str, tuple[int, ...]]]:
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
    rope = (v.trained_grid**2, v.head_width)
    out += [
        ("vision_tower.rope.freqs_cos", rope),
        ("vision_tower.rope.freqs_sin", rope),
        ("vision_tower.head.weight", (head_dim, v.width)),
        ("vision_tower.head.bias", (head_dim,)),
    ]
  return out


def random_tensor(key: str, shape: tuple[int, ...], rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
  """Plausible random values: norm scales around 1, everything else small."""
  if key.endswith(
      ("norm.weight", "layernorm.weight", "norm1.weight", "norm2.weight", "ffn_ln.weight", "inner_attn_ln.weight")
  ):
    x = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
  else:
    x = 0.05 * rng.standard_normal(shape, dtype=np.float32)
  return x.astype(dtype)


def write_checkpoint(
    folder: str,
    cfg: KangarooConfig,
    *,
    dtype=np.float32,
    seed: int = 0,
    extras: bool = True,
    shards: int = 1,
    vision_file: bool = False,
) -> dict:
  """Writes folder/model.safetensors + folder/config.json; returns {"bytes", "largest_tensor_bytes", "tensors"}.

  `shards` > 1: the release's sharded layout instead, model-0000i-of-0000n.safetensors (keys dealt out
  in turn) + model.safetensors.index.json. `vision_file`: also the release's EVA02-CLIP-L-14-448.json,
  holding `cfg.vision` as EVA-CLIP's `vision_cfg`. Sharded, every value is drawn up front (small test
  checkpoints only).
  """
  from tools.convert_weights.hf_config import VISION_FILE, vision_to_hf

  os.makedirs(folder, exist_ok=True)
  entries = [(k, s, np.dtype(dtype)) for k, s in sorted(released_entries(cfg, extras=extras))]
  rng = np.random.default_rng(seed)
  values = {}

  def tensors(part) -> Iterator[tuple[str, np.ndarray]]:
    for key, shape, dt in part:
      yield key, values.pop(key) if key in values else random_tensor(key, shape, rng, dt)

  if shards == 1:
    path = os.path.join(folder, "model.safetensors")
    written = safetensors_io.write_file(path, entries, tensors(entries), metadata={"format": "pt"})
  else:
    # The same values as one file holds (drawn in key order), whatever the shard count.
    values = {k: random_tensor(k, s, rng, dt) for k, s, dt in entries}
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map, written = {}, 0
    for i, name in enumerate(names):
      part = entries[i::shards]
      written += safetensors_io.write_file(os.path.join(folder, name), part, tensors(part), metadata={"format": "pt"})
      weight_map.update({k: name for k, _, _ in part})
    path = os.path.join(folder, "model.safetensors.index.json")
    with open(path, "w") as f:
      json.dump({"metadata": {"total_size": written}, "weight_map": weight_map}, f, indent=2)
  torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np.dtype(dtype).name]
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_from_llama(cfg.llm, torch_dtype), f, indent=2)
  if vision_file:
    with open(os.path.join(folder, VISION_FILE), "w") as f:
      json.dump({"embed_dim": CLIP_EMBED_DIM, "vision_cfg": vision_to_hf(cfg.vision)}, f, indent=2)
  largest = max(math.prod(s) * np.dtype(d).itemsize for _, s, d in entries)
  return {"bytes": written, "largest_tensor_bytes": largest, "tensors": len(entries), "path": path}
