"""The released config.json (Hugging Face Llama fields) <-> our KangarooConfig, and header-based checks.

The released config.json only describes the LLM. The vision tower and projector come from a preset
(or a full KangarooConfig JSON) and are verified against the tensor shapes in the checkpoint header,
so a wrong preset fails with a message naming the field, before any weight is read.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Mapping

from kangaroo_jax.config import ConfigError, KangarooConfig, LlamaConfig, RopeScaling
from kangaroo_jax.pretrained import CONFIG_FILE as KANGAROO_CONFIG
from tools.convert_weights.assemble import ConversionError
from tools.convert_weights.safetensors_io import TensorInfo


_MISSING = object()
_JSON_TYPES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
               dict: "an object"}


def _field(obj: Mapping, name: str, kinds: tuple[type, ...], expected: str, where: str, default=_MISSING):
  """obj[name] checked against `kinds` (JSON null or absent: `default`, or an error when required).

  Raises ConversionError naming the file (`where`), the field and what was expected: a string where
  a number belongs ("hidden_size": "4096") is refused, not converted.
  """
  value = obj.get(name)
  if value is None:
    if default is _MISSING:
      raise ConversionError(f"{where}: required field {name!r} is missing")
    return default
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise ConversionError(f"{where}: field {name!r} is {shown} ({_JSON_TYPES.get(type(value), type(value).__name__)})"
                          f"; expected {expected}")
  return value


def _int(obj, name, where, default=_MISSING) -> int:
  return _field(obj, name, (int,), "an integer", where, default)


def _float(obj, name, where, default=_MISSING) -> float | None:
  value = _field(obj, name, (int, float), "a number", where, default)
  return None if value is None else float(value)


def _ids(obj, name, where) -> list[int]:
  """A token id or a list of them (`eos_token_id` is either)."""
  value = _field(obj, name, (int, list), "a token id or a list of token ids", where, [])
  ids = value if isinstance(value, list) else [value]
  for v in ids:
    if not isinstance(v, int) or isinstance(v, bool):
      raise ConversionError(f"{where}: field {name!r} holds {json.dumps(v)}; expected integer token ids")
  return ids


def _dedupe(ids) -> tuple[int, ...]:
  return tuple(dict.fromkeys(ids))


_LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_scaling(scaling: Mapping, where: str) -> RopeScaling:
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind != "llama3":
    raise ConversionError(f"{where}: rope scaling type {kind!r} is not supported (only 'llama3' or none)")
  absent = [f for f in _LLAMA3_SCALING if scaling.get(f) is None]
  if absent:
    raise ConversionError(f"{where}: rope_scaling lacks {', '.join(map(repr, absent))}; a llama3 rope_scaling needs "
                          f"{', '.join(_LLAMA3_SCALING)}")
  at = f"{where} rope_scaling"
  return RopeScaling(factor=_float(scaling, "factor", at), low_freq_factor=_float(scaling, "low_freq_factor", at),
                     high_freq_factor=_float(scaling, "high_freq_factor", at),
                     original_max_position_embeddings=_int(scaling, "original_max_position_embeddings", at))


def llama_from_hf(hf: Mapping, base: LlamaConfig, generation: Mapping | None = None, *,
                  where: str = "config.json", generation_where: str = "generation_config.json") -> LlamaConfig:
  """LlamaConfig from a transformers Llama config.json (4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`).

  Stop ids: config `eos_token_id` + generation_config `eos_token_id` + the preset's stop ids when the
  vocab matches the preset's (Llama-3's `<|eot_id|>` 128009 is in neither released file; spec section 12).
  Every field is type-checked; `where` / `generation_where` name the files in the errors.
  """
  for flag in ("attention_bias", "mlp_bias"):
    if _field(hf, flag, (bool,), "true or false", where, False):
      raise ConversionError(f"{where}: {flag}=true is not supported by LlamaConfig (Kangaroo has no biases)")
  act = _field(hf, "hidden_act", (str,), "a string", where, "silu")
  if act != "silu":
    raise ConversionError(f"{where}: hidden_act={act!r}; only 'silu' is implemented")
  tp = _int(hf, "pretraining_tp", where, 1)
  if tp != 1:
    raise ConversionError(f"{where}: pretraining_tp={tp} (sliced matmuls) is not supported")
  rope = _field(hf, "rope_parameters", (dict,), "an object", where, {})
  theta = _float(rope, "rope_theta", f"{where} rope_parameters", None)
  theta = _float(hf, "rope_theta", where, base.rope_theta) if theta is None else theta
  scaling = _field(hf, "rope_scaling", (dict,), "an object or null", where, None)
  scaling = scaling or (rope if rope.get("rope_type", "default") != "default" else None)
  rope_scaling = _rope_scaling(scaling, where) if scaling else None
  generation = generation or {}
  hidden, heads = _int(hf, "hidden_size", where), _int(hf, "num_attention_heads", where)
  vocab = _int(hf, "vocab_size", where)
  eos = _ids(hf, "eos_token_id", where) + _ids(generation, "eos_token_id", generation_where)
  if vocab == base.vocab_size:
    eos += list(base.eos_token_ids)
  bos = _int(hf, "bos_token_id", where, None)
  bos = _int(generation, "bos_token_id", generation_where, base.bos_token_id) if bos is None else bos
  if heads <= 0:
    raise ConversionError(f"{where}: field 'num_attention_heads' is {heads}; expected a positive integer")
  try:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=_int(hf, "intermediate_size", where),
        num_layers=_int(hf, "num_hidden_layers", where), num_heads=heads,
        num_kv_heads=_int(hf, "num_key_value_heads", where, heads),
        head_dim=_int(hf, "head_dim", where, hidden // heads),
        rms_norm_eps=_float(hf, "rms_norm_eps", where, base.rms_norm_eps), rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=_int(hf, "max_position_embeddings", where, base.max_position_embeddings),
        tie_word_embeddings=_field(hf, "tie_word_embeddings", (bool,), "true or false", where, False),
        bos_token_id=bos, eos_token_ids=_dedupe(eos) or base.eos_token_ids)
  except ConfigError as e:
    raise ConversionError(f"{where} describes an LLM we cannot build: {e}") from None


def hf_from_llama(llm: LlamaConfig, torch_dtype: str) -> dict:
  """A config.json in the released layout (spec section 4.1) for our LlamaConfig."""
  scaling = None
  if llm.rope_scaling is not None:
    r = llm.rope_scaling
    scaling = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
               "high_freq_factor": r.high_freq_factor,
               "original_max_position_embeddings": r.original_max_position_embeddings}
  return {
      "architectures": ["KangarooForCausalLM"],
      "auto_map": {"AutoModelForCausalLM": "modeling_kangaroo.KangarooForCausalLM"},
      "model_type": "llama",
      "vocab_size": llm.vocab_size,
      "hidden_size": llm.hidden_size,
      "intermediate_size": llm.intermediate_size,
      "num_hidden_layers": llm.num_layers,
      "num_attention_heads": llm.num_heads,
      "num_key_value_heads": llm.num_kv_heads,
      "head_dim": llm.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": llm.rms_norm_eps,
      "rope_theta": llm.rope_theta,
      "rope_scaling": scaling,
      "max_position_embeddings": llm.max_position_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
      "tie_word_embeddings": llm.tie_word_embeddings,
      "bos_token_id": llm.bos_token_id,
      "eos_token_id": llm.eos_token_ids[0],  # released layout: one id; the full stop list is in kangaroo_config.json
      "torch_dtype": torch_dtype,
      "pretraining_tp": 1,
      "initializer_range": 0.02,
      "attention_dropout": 0.0,
  }


def transformers_llama_config(llm: LlamaConfig, **overrides):
  """`transformers.LlamaConfig` read from the config.json we would write for `llm` (`hf_from_llama`):
  the reference LLM of the parity tests and benchmarks, built the way a released config is read.
  Needs transformers (imported here). `overrides`, e.g. attn_implementation="eager", win."""
  import transformers
  return transformers.LlamaConfig(**{**hf_from_llama(llm, "float32"), **overrides})


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      obj = json.load(f)
  except ValueError as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from None
  except OSError as e:
    raise ConversionError(f"{path}: cannot be read ({e.strerror})") from None
  if not isinstance(obj, dict):
    raise ConversionError(f"{path}: expected a JSON object, found {_JSON_TYPES.get(type(obj), type(obj).__name__)}")
  return obj


def resolve_config(src_dir: str | None, preset_cfg: KangarooConfig,
                   config_json: str | None = None) -> tuple[KangarooConfig, str]:
  """The KangarooConfig to import into, and a one-line note of where it came from.

  Priority: `config_json` (a full KangarooConfig) > `<src>/kangaroo_config.json` (written by `export`)
  > preset vision/projector + LLM fields from `<src>/config.json`.
  """
  hf_path = os.path.join(src_dir, "config.json") if src_dir else None
  hf = _read_json(hf_path) if hf_path and os.path.exists(hf_path) else None
  ours = config_json or (os.path.join(src_dir, KANGAROO_CONFIG) if src_dir else None)
  if ours and os.path.exists(ours):
    try:
      cfg = KangarooConfig.from_dict(_read_json(ours))
    except (ConfigError, TypeError) as e:
      raise ConversionError(f"{ours}: not a valid KangarooConfig: {e}") from None
    if hf is not None:
      from_hf = llama_from_hf(hf, cfg.llm, where=hf_path)
      shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim")
      diff = [f"{f}: {getattr(cfg.llm, f)} vs {getattr(from_hf, f)}" for f in shape_fields
              if getattr(cfg.llm, f) != getattr(from_hf, f)]
      if diff:
        raise ConversionError(f"{ours} and {hf_path} disagree on the LLM ({'; '.join(diff)})")
    return cfg, f"config from {ours}"
  if config_json:
    raise ConversionError(f"--config-json {config_json}: no such file")
  if hf is None:
    raise ConversionError(f"{src_dir}: no config.json (the released LLM config) and no {KANGAROO_CONFIG}; "
                          "pass --config-json with a KangarooConfig")
  gen_path = os.path.join(src_dir, "generation_config.json")
  generation = _read_json(gen_path) if os.path.exists(gen_path) else None
  llm = llama_from_hf(hf, preset_cfg.llm, generation, where=hf_path, generation_where=gen_path)
  return preset_cfg.replace(llm=llm), "LLM from config.json, vision/projector from the preset"


_BLOCK = re.compile(r"^vision_tower\.blocks\.(\d+)\.")


def check_against_header(cfg: KangarooConfig, infos: Mapping[str, TensorInfo], source: str) -> None:
  """Compares the vision/projector/LLM sizes of `cfg` with what the header's shapes imply.

  Raises ConversionError naming each config field that disagrees, the key it was read from and
  the value the checkpoint implies. Keys that are absent are left to the strict key accounting.
  """
  v, llm = cfg.vision, cfg.llm
  found: list[tuple[str, object, object, str]] = []  # (field, ours, checkpoint, evidence)

  def shape(key):
    return tuple(infos[key].shape) if key in infos else None

  pe = shape("vision_tower.patch_embed.proj.weight")
  if pe is not None and len(pe) == 4:
    found += [("vision.width", v.width, pe[0], f"vision_tower.patch_embed.proj.weight {pe}"),
              ("vision.num_channels", v.num_channels, pe[1], f"vision_tower.patch_embed.proj.weight {pe}"),
              ("vision.patch_size", v.patch_size, pe[2], f"vision_tower.patch_embed.proj.weight {pe}")]
  pos = shape("vision_tower.pos_embed")
  if pos is not None and len(pos) == 3:
    grid = math.isqrt(max(pos[1] - 1, 0))
    if grid * grid == pos[1] - 1:
      found.append(("vision.image_size", v.image_size, grid * v.patch_size, f"vision_tower.pos_embed {pos}"))
  blocks = {int(m.group(1)) for k in infos if (m := _BLOCK.match(k))}
  if blocks:
    found.append(("vision.num_layers", v.num_layers, max(blocks) + 1, f"vision_tower.blocks.0..{max(blocks)}"))
  w1 = shape("vision_tower.blocks.0.mlp.w1.weight")
  if w1 is not None:
    found.append(("vision.mlp_hidden", v.mlp_hidden, w1[0], f"vision_tower.blocks.0.mlp.w1.weight {w1}"))
  rope = shape("vision_tower.rope.freqs_cos")
  if rope is not None and len(rope) == 2:
    found.append(("vision.head_width", v.head_width, rope[1], f"vision_tower.rope.freqs_cos {rope}"))
  p0 = shape("mm_projector.0.weight")
  if p0 is not None and len(p0) == 2:
    found += [("vision.width (projector input)", v.width, p0[1], f"mm_projector.0.weight {p0}"),
              ("llm.hidden_size (projector output)", llm.hidden_size, p0[0], f"mm_projector.0.weight {p0}")]
  emb = shape("model.embed_tokens.weight")
  if emb is not None and len(emb) == 2:
    found += [("llm.vocab_size", llm.vocab_size, emb[0], f"model.embed_tokens.weight {emb}"),
              ("llm.hidden_size", llm.hidden_size, emb[1], f"model.embed_tokens.weight {emb}")]
  layers = {int(m.group(1)) for k in infos if (m := re.match(r"^model\.layers\.(\d+)\.", k))}
  if layers:
    found.append(("llm.num_layers", llm.num_layers, max(layers) + 1, f"model.layers.0..{max(layers)}"))
  bad = [f"{field} = {ours} but the checkpoint has {theirs} ({evidence})"
         for field, ours, theirs, evidence in found if ours != theirs]
  if bad:
    raise ConversionError(f"the model config ({source}) does not match the checkpoint:\n  " + "\n  ".join(bad) +
                          "\nhint: pick another --preset, or pass --config-json with a KangarooConfig whose "
                          "vision/projector fields match")
