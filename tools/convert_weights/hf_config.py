"""The released config.json (Hugging Face Llama fields) <-> our KangarooConfig, and header-based checks.

The released config.json describes the LLM. The vision tower's settings come from the folder when it
has them (a `vision_config` block in config.json, else the release's EVA02-CLIP-L-14-448.json
`vision_cfg`), the rest from a preset (or a full KangarooConfig JSON); the sizes are verified against the
tensor shapes in the checkpoint header, so a wrong preset fails with a message naming the field, before
any weight is read. Settings no shape depends on (`unverified_settings`) are named in one warning each.
"""

from __future__ import annotations

import json
import math
import os
import dataclasses
import re
from typing import Mapping

from kangaroo_jax.config import ConfigError, KangarooConfig, LlamaConfig, RopeScaling, VisionConfig
from kangaroo_jax.pretrained import CONFIG_FILE as KANGAROO_CONFIG
from kangaroo_jax.run_options import split_legacy_keys
from tools.convert_weights.assemble import ConversionError
from tools.convert_weights.safetensors_io import TensorInfo

_MISSING = object()
_JSON_TYPES = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "an object",
}


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
    raise ConversionError(
        f"{where}: field {name!r} is {shown} ({_JSON_TYPES.get(type(value), type(value).__name__)})"
        f"; expected {expected}"
    )
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
    raise ConversionError(
        f"{where}: rope_scaling lacks {', '.join(map(repr, absent))}; a llama3 rope_scaling needs "
        f"{', '.join(_LLAMA3_SCALING)}"
    )
  at = f"{where} rope_scaling"
  return RopeScaling(
      factor=_float(scaling, "factor", at),
      low_freq_factor=_float(scaling, "low_freq_factor", at),
      high_freq_factor=_float(scaling, "high_freq_factor", at),
      original_max_position_embeddings=_int(scaling, "original_max_position_embeddings", at),
  )


def llama_from_hf(
    hf: Mapping,
    base: LlamaConfig,
    generation: Mapping | None = None,
    *,
    where: str = "config.json",
    generation_where: str = "generation_config.json",
) -> LlamaConfig:
  """LlamaConfig from a transformers Llama config.json (4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`).

  Stop ids: config `eos_token_id` + generation_config `eos_token_id` + the preset's stop ids when the
  vocab matches the preset's (Llama-3's `<|eot_id|>` 128009 is in neither released file; docs/model.md section 1).
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
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_int(hf, "intermediate_size", where),
        num_layers=_int(hf, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=_int(hf, "num_key_value_heads", where, heads),
        head_dim=_int(hf, "head_dim", where, hidden // heads),
        rms_norm_eps=_float(hf, "rms_norm_eps", where, base.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=_int(hf, "max_position_embeddings", where, base.max_position_embeddings),
        tie_word_embeddings=_field(hf, "tie_word_embeddings", (bool,), "true or false", where, False),
        bos_token_id=bos,
        eos_token_ids=_dedupe(eos) or base.eos_token_ids,
    )
  except ConfigError as e:
    raise ConversionError(f"{where} describes an LLM we cannot build: {e}") from None


def hf_from_llama(llm: LlamaConfig, torch_dtype: str) -> dict:
  """A config.json in the released layout (docs/model.md section 4) for our LlamaConfig."""
  scaling = None
  if llm.rope_scaling is not None:
    r = llm.rope_scaling
    scaling = {
        "rope_type": "llama3",
        "factor": r.factor,
        "low_freq_factor": r.low_freq_factor,
        "high_freq_factor": r.high_freq_factor,
        "original_max_position_embeddings": r.original_max_position_embeddings,
    }
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


VISION_FILE = "EVA02-CLIP-L-14-448.json"  # the release's EVA-CLIP model config; its `vision_cfg` is the tower

# Vision settings read from `vision_cfg` / `vision_config`: EVA-CLIP's names, ours, and Hugging Face
# CLIP-style names, each -> a VisionConfig field.
_VISION_INTS = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "width": "width",
    "layers": "num_layers",
    "head_width": "head_width",
    "pt_hw_seq_len": "pt_hw_seq_len",
    "num_layers": "num_layers",
    "mlp_hidden": "mlp_hidden",
    "num_channels": "num_channels",
    "hidden_size": "width",
    "num_hidden_layers": "num_layers",
    "intermediate_size": "mlp_hidden",
}
_VISION_FLOATS = {"layer_norm_eps": "layer_norm_eps", "rope_theta": "rope_theta"}
# EVA switches that change the architecture: the value our tower implements (any other is refused).
_VISION_FLAGS = {
    "rope": True,
    "subln": True,
    "naiveswiglu": True,
    "intp_freq": True,
    "qkv_bias": True,
    "postnorm": False,
    "use_rms_norm": False,
    "ls_init_value": None,
}
# EVA settings with no effect on the function: attention / LayerNorm kernels, training-only, names.
_VISION_RUNTIME = (
    "xattn",
    "fusedLN",
    "drop_path_rate",
    "patch_dropout",
    "eva_model_name",
    "timm_model_name",
    "grad_checkpointing",
)


@dataclasses.dataclass
class ResolvedConfig:
  """resolve_config's answer with what `unverified_settings` needs: where each setting came from."""

  cfg: KangarooConfig
  note: str  # one line: where the config came from
  origins: dict[str, str]  # "vision.head_width" -> "EVA02-CLIP-L-14-448.json vision_cfg.head_width"; else `default`
  default_origin: str
  notes: list[str] = dataclasses.field(default_factory=list)  # one-line warnings (e.g. ignored vision keys)
  # The folder's own kangaroo_config.json, which `export` wrote next to these very weights: nothing to warn.
  exported: bool = False
  # Run-option keys an old kangaroo_config.json holds (kangaroo_jax.run_options.split_legacy_keys).
  run_keys: dict = dataclasses.field(default_factory=dict)

  def origin(self, field: str) -> str:
    return self.origins.get(field, self.default_origin)


def _vision_fields(block: Mapping, where: str, width: int, notes: list[str]) -> dict[str, tuple[object, str]]:
  """{VisionConfig field: (value, "where.key")} from one vision settings block (EVA `vision_cfg` or
  config.json `vision_config`). Unknown keys are named in `notes` and ignored; a switch our tower does not
  implement (e.g. "rope": false) is a ConversionError naming the file and key. `width`: the tower width
  when the block names none (for `mlp_ratio` / `num_attention_heads`)."""
  out: dict[str, tuple[object, str]] = {}
  for key in block:
    at = f"{where}.{key}"
    if key in _VISION_INTS:
      value = _int(block, key, where, None)
      if value is not None:
        out[_VISION_INTS[key]] = (value, at)
    elif key in _VISION_FLOATS:
      value = _float(block, key, where, None)
      if value is not None:
        out[_VISION_FLOATS[key]] = (value, at)
    elif key in _VISION_FLAGS:
      value, want = block[key], _VISION_FLAGS[key]
      if value is not None and value != want:
        raise ConversionError(
            f"{where}: {key}={json.dumps(value)} is not supported (the EVA tower here has " f"{key}={json.dumps(want)})"
        )
    elif key not in ("mlp_ratio", "num_attention_heads") + _VISION_RUNTIME:
      notes.append(f"{at} = {json.dumps(block[key])[:40]} is not a setting the converter knows: ignored")
  width = out.get("width", (width, ""))[0]
  ratio = _float(block, "mlp_ratio", where, None)
  if ratio is not None and "mlp_hidden" not in out:
    out["mlp_hidden"] = (int(width * ratio), f"{where}.mlp_ratio")  # EVA: int(dim * mlp_ratio), a floor
  heads = _int(block, "num_attention_heads", where, None)
  if heads is not None and "head_width" not in out:
    if heads <= 0 or width % heads:
      raise ConversionError(f"{where}: num_attention_heads={heads} does not divide the width {width}")
    out["head_width"] = (width // heads, f"{where}.num_attention_heads")
  return out


def vision_from_folder(
    src_dir: str, base: VisionConfig, hf: Mapping | None, hf_path: str, notes: list[str]
) -> tuple[VisionConfig, dict[str, str], list[str]]:
  """The vision settings of a released folder over `base`: EVA02-CLIP-L-14-448.json `vision_cfg`, then
  config.json `vision_config` (which wins where both name a setting).

  Returns (VisionConfig, {"vision.<field>": where it was read}, names of the files read).
  """
  fields: dict[str, tuple[object, str]] = {}
  used = []
  eva_path = os.path.join(src_dir, VISION_FILE)
  if os.path.exists(eva_path):
    eva = _read_json(eva_path)
    block = _field(eva, "vision_cfg", (dict,), "an object", eva_path, None)
    if block is None:
      notes.append(f"{eva_path} has no vision_cfg object: not used")
    else:
      fields.update(_vision_fields(block, f"{VISION_FILE} vision_cfg", base.width, notes))
      used.append(VISION_FILE)
  block = _field(hf, "vision_config", (dict,), "an object", hf_path, None) if hf is not None else None
  if block is not None:
    width = fields.get("width", (base.width, ""))[0]
    fields.update(_vision_fields(block, "config.json vision_config", width, notes))
    used.append("config.json vision_config")
  try:
    vision = dataclasses.replace(base, **{k: v for k, (v, _) in fields.items()})
  except ConfigError as e:
    raise ConversionError(
        f"{src_dir}: the vision settings of {' + '.join(used)} describe a tower we cannot " f"build: {e}"
    ) from None
  return vision, {f"vision.{k}": at for k, (_, at) in fields.items()}, used


def vision_to_hf(v: VisionConfig) -> dict:
  """config.json's `vision_config` for `v`, in EVA-CLIP `vision_cfg` names (what `vision_from_folder`
  reads back), plus the settings EVA has no name for."""
  return {
      "image_size": v.image_size,
      "patch_size": v.patch_size,
      "width": v.width,
      "layers": v.num_layers,
      "head_width": v.head_width,
      "mlp_ratio": (v.mlp_hidden + 0.5) / v.width,  # EVA floors width * mlp_ratio: this floors to mlp_hidden
      "mlp_hidden": v.mlp_hidden,
      "pt_hw_seq_len": v.pt_hw_seq_len,
      "num_channels": v.num_channels,
      "layer_norm_eps": v.layer_norm_eps,
      "rope_theta": v.rope_theta,
      "rope": True,
      "subln": True,
      "naiveswiglu": True,
      "intp_freq": True,
      "qkv_bias": True,
  }


def resolve_config(
    src_dir: str | None, preset_cfg: KangarooConfig, config_json: str | None = None
) -> tuple[KangarooConfig, str]:
  """The KangarooConfig to import into, and a one-line note of where it came from (see `resolve`)."""
  r = resolve(src_dir, preset_cfg, config_json)
  return r.cfg, r.note


def resolve(
    src_dir: str | None, preset_cfg: KangarooConfig, config_json: str | None = None, preset_name: str | None = None
) -> ResolvedConfig:
  """The KangarooConfig to import into, with where each setting came from.

  Priority: `config_json` (a full KangarooConfig) > `<src>/kangaroo_config.json` (written by `export`)
  > LLM fields from `<src>/config.json`, vision settings from the folder (`vision_from_folder`), the rest
  from the preset.
  """
  hf_path = os.path.join(src_dir, "config.json") if src_dir else None
  hf = _read_json(hf_path) if hf_path and os.path.exists(hf_path) else None
  ours = config_json or (os.path.join(src_dir, KANGAROO_CONFIG) if src_dir else None)
  if ours and os.path.exists(ours):
    try:
      shapes, run_keys = split_legacy_keys(_read_json(ours))
      cfg = KangarooConfig.from_dict(shapes)
    except (ConfigError, TypeError) as e:
      raise ConversionError(f"{ours}: not a valid KangarooConfig: {e}") from None
    if hf is not None:
      from_hf = llama_from_hf(hf, cfg.llm, where=hf_path)
      shape_fields = (
          "vocab_size",
          "hidden_size",
          "intermediate_size",
          "num_layers",
          "num_heads",
          "num_kv_heads",
          "head_dim",
      )
      diff = [
          f"{f}: {getattr(cfg.llm, f)} vs {getattr(from_hf, f)}"
          for f in shape_fields
          if getattr(cfg.llm, f) != getattr(from_hf, f)
      ]
      if diff:
        raise ConversionError(f"{ours} and {hf_path} disagree on the LLM ({'; '.join(diff)})")
    return ResolvedConfig(cfg, f"config from {ours}", {}, f"from {ours}", exported=not config_json, run_keys=run_keys)
  if config_json:
    raise ConversionError(f"--config-json {config_json}: no such file")
  if hf is None:
    raise ConversionError(
        f"{src_dir}: no config.json (the released LLM config) and no {KANGAROO_CONFIG}; "
        "pass --config-json with a KangarooConfig"
    )
  gen_path = os.path.join(src_dir, "generation_config.json")
  generation = _read_json(gen_path) if os.path.exists(gen_path) else None
  llm = llama_from_hf(hf, preset_cfg.llm, generation, where=hf_path, generation_where=gen_path)
  notes: list[str] = []
  vision, origins, used = vision_from_folder(src_dir, preset_cfg.vision, hf, hf_path, notes)
  try:
    cfg = preset_cfg.replace(llm=llm, vision=vision)
  except ConfigError as e:
    raise ConversionError(f"{src_dir}: {' + '.join(used)} and the preset do not fit together: {e}") from None
  where_vision = f"vision from {' + '.join(used)}" if used else "vision from the preset"
  default = f"preset {preset_name!r}" if preset_name else "the preset"
  return ResolvedConfig(
      cfg, f"LLM from config.json, {where_vision}, projector from the preset", origins, default, notes
  )


def unverified_settings(cfg: KangarooConfig, infos: Mapping[str, TensorInfo], resolved: ResolvedConfig) -> list[str]:
  """One line per setting that changes the outputs but that no tensor shape of the checkpoint checks.

  `vision.head_width` is checked when the checkpoint holds EVA's `rope.freqs_cos` table ([grid^2, head_width]);
  without it a wrong value loads silently (the q/k/v kernels are [width, width] whatever the split).
  """
  if resolved.exported:
    return list(resolved.notes)
  v, p = cfg.vision, cfg.projector
  silent = "a wrong value loads without error and changes the outputs"
  out = []
  if "vision_tower.rope.freqs_cos" not in infos:
    out.append(
        f"vision.head_width = {v.head_width} ({resolved.origin('vision.head_width')}) is not checked: "
        f"only the vision_tower.rope.freqs_cos table shows it and this checkpoint has none; {silent}"
    )
  out.append(
      f"vision.pt_hw_seq_len = {v.pt_hw_seq_len} ({resolved.origin('vision.pt_hw_seq_len')}) is not checked: "
      f"it scales the 2-D RoPE frequencies and no tensor shape depends on it; {silent}"
  )
  if p.tpe != "learned":  # a learned table's rows are checked by shape
    what = f" (base {p.tpe_base})" if p.tpe == "sinusoidal" else ""
    out.append(
        f"projector.tpe = {p.tpe!r}{what} ({resolved.origin('projector.tpe')}) is not checked: the time "
        f"position embedding has no parameters in the checkpoint; {silent}"
    )
  return resolved.notes + out


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
    found += [
        ("vision.width", v.width, pe[0], f"vision_tower.patch_embed.proj.weight {pe}"),
        ("vision.num_channels", v.num_channels, pe[1], f"vision_tower.patch_embed.proj.weight {pe}"),
        ("vision.patch_size", v.patch_size, pe[2], f"vision_tower.patch_embed.proj.weight {pe}"),
    ]
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
    found += [
        ("vision.width (projector input)", v.width, p0[1], f"mm_projector.0.weight {p0}"),
        ("llm.hidden_size (projector output)", llm.hidden_size, p0[0], f"mm_projector.0.weight {p0}"),
    ]
  emb = shape("model.embed_tokens.weight")
  if emb is not None and len(emb) == 2:
    found += [
        ("llm.vocab_size", llm.vocab_size, emb[0], f"model.embed_tokens.weight {emb}"),
        ("llm.hidden_size", llm.hidden_size, emb[1], f"model.embed_tokens.weight {emb}"),
    ]
  layers = {int(m.group(1)) for k in infos if (m := re.match(r"^model\.layers\.(\d+)\.", k))}
  if layers:
    found.append(("llm.num_layers", llm.num_layers, max(layers) + 1, f"model.layers.0..{max(layers)}"))
  bad = [
      f"{field} = {ours} but the checkpoint has {theirs} ({evidence})"
      for field, ours, theirs, evidence in found
      if ours != theirs
  ]
  if bad:
    raise ConversionError(
        f"the model config ({source}) does not match the checkpoint:\n  "
        + "\n  ".join(bad)
        + "\nhint: pick another --preset, or pass --config-json with a KangarooConfig whose "
        "vision/projector fields match"
    )
