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


def _as_list(v) -> list[int]:
  if v is None:
    return []
  return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def _dedupe(ids) -> tuple[int, ...]:
  return tuple(dict.fromkeys(ids))


def llama_from_hf(hf: Mapping, base: LlamaConfig, generation: Mapping | None = None) -> LlamaConfig:
  """LlamaConfig from a transformers Llama config.json (4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`).

  Stop ids: config `eos_token_id` + generation_config `eos_token_id` + the preset's stop ids when the
  vocab matches the preset's (Llama-3's `<|eot_id|>` 128009 is in neither released file; spec section 12).
  """
  def get(name, default=None):
    return hf.get(name, default)

  for flag in ("attention_bias", "mlp_bias"):
    if get(flag):
      raise ConversionError(f"config.json: {flag}=true is not supported by LlamaConfig (Kangaroo has no biases)")
  act = get("hidden_act", "silu")
  if act != "silu":
    raise ConversionError(f"config.json: hidden_act={act!r}; only 'silu' is implemented")
  if get("pretraining_tp", 1) not in (1, None):
    raise ConversionError(f"config.json: pretraining_tp={get('pretraining_tp')} (sliced matmuls) is not supported")
  rope = dict(get("rope_parameters") or {})
  theta = rope.get("rope_theta", get("rope_theta", base.rope_theta))
  scaling = get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
  rope_scaling = None
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
      raise ConversionError(f"config.json: rope scaling type {kind!r} is not supported (only 'llama3' or none)")
    rope_scaling = RopeScaling(factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                               high_freq_factor=float(scaling["high_freq_factor"]),
                               original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
  try:
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    vocab = int(hf["vocab_size"])
    eos = _as_list(get("eos_token_id")) + _as_list((generation or {}).get("eos_token_id"))
    if vocab == base.vocab_size:
      eos += list(base.eos_token_ids)
    bos = get("bos_token_id", (generation or {}).get("bos_token_id", base.bos_token_id))
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(get("num_key_value_heads") or heads), head_dim=int(get("head_dim") or hidden // heads),
        rms_norm_eps=float(get("rms_norm_eps", base.rms_norm_eps)), rope_theta=float(theta),
        rope_scaling=rope_scaling, max_position_embeddings=int(get("max_position_embeddings",
                                                                   base.max_position_embeddings)),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        bos_token_id=int(bos if bos is not None else base.bos_token_id),
        eos_token_ids=_dedupe(eos) or base.eos_token_ids)
  except KeyError as e:
    raise ConversionError(f"config.json: required field {e.args[0]!r} is missing") from None
  except ConfigError as e:
    raise ConversionError(f"config.json describes an LLM we cannot build: {e}") from None


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
      return json.load(f)
  except ValueError as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from None


def resolve_config(src_dir: str | None, preset_cfg: KangarooConfig, config_json: str | None = None) -> tuple[KangarooConfig, str]:
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
      from_hf = llama_from_hf(hf, cfg.llm)
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
  llm = llama_from_hf(hf, preset_cfg.llm, generation)
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
