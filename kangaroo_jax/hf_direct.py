"""Loading the released Hugging Face folder straight onto the mesh, no conversion step.

`load_released(path, mesh)` does what `python -m tools.convert_weights import` + `from_pretrained` do,
with the converter's own pieces and without the Orbax folder in between:
  headers only -> config (config.json, the folder's vision settings, the preset) checked against the
  shapes -> every key classified and shape-checked (tools/convert_weights/assemble.py: the same
  unmapped / missing / mis-shaped report) -> tokenizer checked -> then parameter by parameter: each
  device's block of the released tensor is transposed and cast on the host, NaN/Inf-tested
  (finite.all_finite, as the converter tests what it writes) and put on its devices.

Host memory: one released tensor is mapped at a time and only one device block of it is materialised
at a time (per distinct block: devices holding the same replica share it). A stacked (scanned) parameter
[layers, ...] is built on the devices: allocated there once, then each layer's released tensor is put
in its slice by an in-place (donated) update, so neither the host nor the devices ever hold a second
copy of the stack. Nothing is cached: the Orbax conversion remains the faster way to load the same
checkpoint many times.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from kangaroo_jax.config import KangarooConfig, preset as get_preset
from kangaroo_jax.model_tree import abstract_model, shardings_of
from kangaroo_jax.pretrained import CheckpointError, PretrainedKangaroo, loaded_model
from kangaroo_jax.run_options import RunOptions
from kangaroo_jax.tokenizer import Tokenizer, check_fits_vocab, has_tokenizer, load_tokenizer
from tools.convert_weights.assemble import ConversionError
from tools.convert_weights.convert import check_unchanged, dtype_name, file_stamps, plan_import
from tools.convert_weights.finite import all_finite, describe
from tools.convert_weights.hf_config import ResolvedConfig, check_against_header, resolve, unverified_settings
from tools.convert_weights.mapping import to_ours, write_order
from tools.convert_weights.orbax_io import contiguous
from tools.convert_weights.sources import Source, SourceError, open_source

Path = tuple[str, ...]
_TORCH_DTYPES = ("bfloat16", "float32", "float16")


class UnverifiedSettingWarning(UserWarning):
  """A setting that changes the outputs but that no tensor shape of the checkpoint checks, or a NaN/Inf."""


@dataclasses.dataclass
class LoadReport:
  """What the direct load did, in the converter's terms (cf. conversion_report.json)."""

  config_source: str
  dtype: str
  mapped: int
  bytes_read: int
  ignored: dict[str, str]  # released key -> why it is not loaded
  defaulted: dict[str, str]  # absent optional key -> what was used
  nonfinite: dict[str, str]  # released key -> what is not finite (in the loaded dtype)
  unverified: list[str]  # one line per setting no tensor shape checks


def _default_warn(line: str) -> None:
  warnings.warn(line, UnverifiedSettingWarning, stacklevel=4)


def _checkpoint_error(path: str, e: Exception) -> CheckpointError:
  """The converter's message, naming the folder unless it already names a file in it."""
  text = str(e)
  return CheckpointError(text if text.startswith(path) else f"{path}: {text}")


def _param_dtype(path: str, requested: str | None, resolved: ResolvedConfig, hf_torch_dtype) -> str:
  if requested is not None:
    return dtype_name(requested)
  if resolved.exported and "param_dtype" in resolved.run_keys:  # an old export's kangaroo_config.json says
    return resolved.run_keys["param_dtype"]
  if isinstance(hf_torch_dtype, str) and hf_torch_dtype in _TORCH_DTYPES:
    return hf_torch_dtype
  return "bfloat16"


def _config(path: str, config: KangarooConfig | None, preset: str) -> tuple[ResolvedConfig, object]:
  """The resolved config and config.json's torch_dtype (None when absent).

  A `config` passed in replaces the folder's; the warnings still name the folder's file for each
  setting where the two agree (the CLIs pass the folder's own config back, from `load_config`).
  """
  from tools.convert_weights.hf_config import _read_json

  torch_dtype = _read_json(os.path.join(path, "config.json")).get("torch_dtype")
  resolved = resolve(path, get_preset(preset), preset_name=preset)
  if config is None:
    return resolved, torch_dtype

  def value(cfg, field):
    part, name = field.split(".")
    return getattr(getattr(cfg, part), name)

  def same(field):
    return value(config, field) == value(resolved.cfg, field)

  same_model = config.vision == resolved.cfg.vision and config.projector == resolved.cfg.projector
  origins = {f: o for f, o in resolved.origins.items() if same(f)}
  origins.update(
      {
          f: resolved.default_origin
          for f in ("vision.head_width", "vision.pt_hw_seq_len", "projector.tpe")
          if f not in resolved.origins and same(f)
      }
  )
  return (
      ResolvedConfig(
          config,
          "config passed to from_pretrained",
          origins,
          "the config passed in",
          resolved.notes,
          exported=resolved.exported and same_model,
          run_keys=resolved.run_keys,
      ),
      torch_dtype,
  )


def released_config(path: str, preset: str = "kangaroo-8b") -> KangarooConfig:
  """The config (shapes) `load_released(path)` loads with; CheckpointError naming the file."""
  try:
    resolved, _ = _config(path, None, preset)
  except ConversionError as e:
    raise _checkpoint_error(path, e) from None
  return resolved.cfg


def _run_options(
    path: str, resolved: ResolvedConfig, torch_dtype, run: RunOptions | None, overrides: dict
) -> RunOptions:
  """`run`, else the folder's defaults (weights and compute in the stored dtype, the rest as an old
  export's kangaroo_config.json says or RunOptions' defaults), with `overrides` (None: unset) on top."""
  if run is None:
    stored = _param_dtype(path, None, resolved, torch_dtype)
    run = RunOptions.from_dict(
        {"param_dtype": stored, "compute_dtype": stored, **resolved.run_keys},
        where=os.path.join(path, "kangaroo_config.json"),
    )
  given = {k: v for k, v in overrides.items() if v is not None}
  if "param_dtype" in given:
    given["param_dtype"] = dtype_name(given["param_dtype"])
  return RunOptions.from_dict({**run.to_dict(), **given}, where="from_pretrained") if given else run


def released_run_defaults(path: str, preset: str = "kangaroo-8b") -> RunOptions:
  """The RunOptions `load_released(path)` loads with when given none; CheckpointError naming the file."""
  try:
    resolved, torch_dtype = _config(path, None, preset)
  except ConversionError as e:
    raise _checkpoint_error(path, e) from None
  return _run_options(path, resolved, torch_dtype, None, {})


@functools.lru_cache(maxsize=None)
def _zeros(shape: tuple[int, ...], dtype: str, sharding: Sharding):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _set_layer(sharding: Sharding):
  """stacked[i] = layer, in place (the stack is donated): one layer's worth of device memory in flight."""
  return jax.jit(
      lambda stacked, layer, i: jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0),
      donate_argnums=0,
      out_shardings=sharding,
  )


def _layer_sharding(sharding: Sharding) -> Sharding:
  """The sharding of one layer [...] of a stacked parameter [layers, ...] with `sharding`."""
  if not isinstance(sharding, NamedSharding):
    return sharding  # one device
  spec = tuple(sharding.spec)
  if spec and spec[0] is not None:
    raise ValueError(
        f"direct loading builds stacked parameters layer by layer and needs their layers axis "
        f"unsharded (kangaroo_jax.parallel.rules: layers -> ()), got {sharding.spec}"
    )
  return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))


def _put(
    view: np.ndarray, shape: tuple[int, ...], sharding: Sharding, dtype: np.dtype, scan: Callable[[np.ndarray], None]
) -> jax.Array:
  """`view` (our layout, any float dtype) cast to `dtype` and placed by `sharding`, one device block at a time."""
  if tuple(view.shape) != tuple(shape):
    raise AssertionError(f"produced shape {view.shape}, expected {shape}")
  by_block: dict[tuple, list] = {}
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    key = tuple((s.start, s.stop) for s in index)
    by_block.setdefault(key, []).append((device, index))
  arrays = []
  for placements in by_block.values():
    index = placements[0][1]
    with np.errstate(over="ignore", invalid="ignore"):  # a cast to Inf is `scan`'s to report, by tensor
      block = contiguous(view[index], dtype)
    if np.may_share_memory(block, view):  # never hand the devices a view of the memory-mapped file
      block = block.copy()
    scan(block)
    copies = [jax.device_put(block, device) for device, _ in placements]
    jax.block_until_ready(copies)  # the host block is dropped before the next one is made
    arrays += copies
    del block
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _load_params(source: Source, asm, rules, sharding_of, flagged: dict[str, np.dtype]) -> dict[Path, jax.Array]:
  """Every parameter of the plan `asm` as a jax.Array placed by `sharding_of(path)`; released keys with a
  block that is not all finite (in the loaded dtype) go into `flagged` {key: loaded dtype}."""
  defaults = asm.defaults()
  out: dict[Path, jax.Array] = {}
  for path in sorted(asm.targets):  # the converter's order, which the source's read-ahead follows
    shape, dtype = asm.targets[path]
    sharding = sharding_of(path)
    if path in defaults:
      fill = defaults[path][1]
      out[path] = jax.device_put((np.ones if fill == "ones" else np.zeros)(shape, dtype), sharding)
      continue
    rule, keys = rules[path], asm.sources[path]

    def scan(key, dtype=dtype):
      return lambda block: None if all_finite(block) else flagged.setdefault(key, np.dtype(dtype))

    if not rule.stacked:
      key = keys[None]
      out[path] = _put(to_ours(source.read(key), rule.transform), shape, sharding, dtype, scan(key))
      continue
    layer_sharding = _layer_sharding(sharding)
    stacked = _zeros(tuple(shape), np.dtype(dtype).name, sharding)()
    setter = _set_layer(sharding)
    for layer in sorted(keys):
      key = keys[layer]
      piece = _put(to_ours(source.read(key), rule.transform), shape[1:], layer_sharding, dtype, scan(key))
      stacked = setter(stacked, piece, np.int32(layer))
      del piece
      stacked.block_until_ready()  # at most one layer in flight on the devices
    out[path] = stacked
  return out


def load_released(
    path: str,
    mesh=None,
    *,
    config: KangarooConfig | None = None,
    run: RunOptions | None = None,
    preset: str = "kangaroo-8b",
    warn: Callable[[str], None] | None = None,
    **run_overrides,
) -> tuple[PretrainedKangaroo, Tokenizer | None, LoadReport]:
  """Loads a released Hugging Face folder onto `mesh` (None: one device); see the module docstring.

  `config`, `run`, `run_overrides` as in `kangaroo_jax.from_pretrained` (e.g. param_dtype="float32").

  Returns (model, tokenizer or None, LoadReport). `warn` is called with one line per setting no tensor
  shape checks and per tensor with NaN/Inf (`"<key>: <what>"`, as the converter prints them).
  Raises CheckpointError: an unreadable folder or config, or keys that do not match the config (the
  converter's report: every unmapped, missing and mis-shaped key); TokenizerError as `from_pretrained`.
  """
  warn = warn or _default_warn
  try:
    source = open_source(path)
  except SourceError as e:
    raise _checkpoint_error(path, e) from None
  with source:
    try:
      stamps = file_stamps(source.files)
      source.prefetch(write_order(source.infos))  # the disk starts while the shapes are traced
      resolved, torch_dtype = _config(path, config, preset)
      run = _run_options(path, resolved, torch_dtype, run, run_overrides)
      dtype, cfg = run.param_dtype, resolved.cfg
      check_against_header(cfg, source.infos, resolved.note)
      tokenizer = load_tokenizer(path) if has_tokenizer(path) else None
      if tokenizer is not None:
        check_fits_vocab(tokenizer, cfg.llm.vocab_size, f"llm.vocab_size in {os.path.join(path, 'config.json')}")
      abstract = abstract_model(cfg, run, cls=PretrainedKangaroo)
      asm = plan_import(source, cfg, abstract)
      unverified = unverified_settings(cfg, source.infos, resolved)
      for line in unverified:
        warn(line)
      rules = {rule.path: rule for rule in asm.rules}
      flagged: dict[str, np.dtype] = {}
      values = _load_params(source, asm, rules, shardings_of(abstract, mesh), flagged)
      # Only the flagged tensors are read again, to say what is wrong with them (as the converter does).
      nonfinite = {
          key: describe(source.read(key), flagged[key]) or "not finite after conversion" for key in sorted(flagged)
      }
      check_unchanged(stamps)
    except (ConversionError, SourceError) as e:
      raise _checkpoint_error(path, e) from None
  for key, what in nonfinite.items():
    warn(f"{key}: {what}")
  model = loaded_model(abstract, lambda p: values[tuple(map(str, p))], tokenizer)
  report = LoadReport(
      resolved.note,
      dtype,
      asm.report.mapped,
      asm.report.bytes_read,
      dict(asm.report.ignored),
      dict(asm.report.defaulted),
      nonfinite,
      unverified,
  )
  return model, tokenizer, report
