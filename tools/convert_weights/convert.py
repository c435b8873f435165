"""import / export / inspect: the converter's three operations (the CLI in __main__.py is a thin wrapper).

import:  headers only -> config resolved and checked against shapes -> every key classified and every
         shape checked (Assembler.accept/check) -> nothing wrong? then tensor by tensor: read (the
         kernel reads ahead), transform (transpose / conv layout / reshape), cast, write chunk by
         chunk into the Orbax checkpoint, the stages overlapping with bounded memory (orbax_io) ->
         config, report and tokenizer files -> every file fsynced (most already in the background)
         -> the temp folder is renamed to DST (output_dir: what DST may be, how it is replaced).
         Any failure removes the temp folder: DST is either the complete result or as it was.
         Every written block is tested for NaN/Inf (finite.py); the report names each tensor that has
         them (in the source, or float32 values overflowing the stored dtype). A warning, not an error.
export:  the converted checkpoint -> model.safetensors + config.json in the released naming (with the
         vision settings as `vision_config`, which import reads back), again one (layer) slice at a time.
The released folder can also be loaded without this step: kangaroo_jax/hf_direct.py runs the same plan
and checks and puts each tensor straight onto the devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import time

import numpy as np

from kangaroo_jax.config import KangarooConfig, preset as get_preset
from kangaroo_jax.model_tree import unflatten
from kangaroo_jax.pretrained import CONFIG_FILE, REPORT_FILE, STATE_DIR, load_config
from kangaroo_jax.tokenizer import TOKENIZER_FILES
from tools.convert_weights import safetensors_io
from tools.convert_weights.assemble import Assembler, ConversionError, param_targets
from tools.convert_weights.finite import all_finite, describe
from tools.convert_weights.hf_config import (
    check_against_header,
    hf_from_llama,
    resolve,
    unverified_settings,
    vision_to_hf,
)
from tools.convert_weights.mapping import (
    OPTIONAL_WHEN_UNUSED,
    RULES,
    Ignored,
    Mapped,
    Path,
    classify,
    released_shape,
    to_ours,
    to_released,
    write_order,
)
from tools.convert_weights.orbax_io import (
    DEFAULT_CHUNK_BYTES,
    BackgroundSync,
    LazyParam,
    StoredParams,
    return_large_frees_to_os,
    save_streaming,
)
from tools.convert_weights.output_dir import atomic_output_dir, check_destination
from tools.convert_weights.progress import Progress
from tools.convert_weights.sources import Source, open_source

DTYPE_ALIASES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
}
_TORCH_DTYPE_NAMES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def dtype_name(name: str) -> str:
  try:
    return DTYPE_ALIASES[name.lower()]
  except KeyError:
    raise ConversionError(f"unknown dtype {name!r}; expected one of {sorted(set(DTYPE_ALIASES))}") from None


def _np_dtype(name: str) -> np.dtype:
  import ml_dtypes

  return np.dtype({"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[name])


def _copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    path = os.path.join(src_dir, name)
    if os.path.isfile(path):
      shutil.copyfile(path, os.path.join(dst_dir, name))
      copied.append(name)
  return copied


@dataclasses.dataclass
class ImportResult:
  dst: str
  config: KangarooConfig
  config_source: str
  mapped: int
  ignored: dict[str, str]
  defaulted: dict[str, str]
  bytes_read: int
  seconds: float
  tokenizer_files: list[str]
  nonfinite: dict[str, str] = dataclasses.field(default_factory=dict)  # released key -> what is not finite
  unverified: list[str] = dataclasses.field(default_factory=list)  # settings no tensor shape checks, one line each
  dtype: str = "bfloat16"  # the dtype the weights were written in (kangaroo_config.json holds shapes only)


@contextlib.contextmanager
def _gc_paused():
  """No cyclic GC while streaming: its passes over the interpreter's objects (jax, orbax, ... loaded)
  ran on the event-loop thread that feeds the copy threads, ~0.1 s of a 2.4 s conversion of 1.1 GB;
  the conversion itself makes few reference cycles."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


def file_stamps(files: list[str]) -> dict[str, tuple[int, int, int]]:
  out = {}
  for path in files:
    st = os.stat(path)
    out[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
  return out


def check_unchanged(before: dict[str, tuple[int, int, int]]) -> None:
  """Raises if a source file was replaced, resized or rewritten since `before` (its data may then be
  a mix of two versions; the caller discards the output)."""
  for path, stamp in before.items():
    try:
      now = file_stamps([path])[path]
    except OSError as e:
      raise ConversionError(f"{path}: disappeared during the conversion ({e}); the output was discarded") from None
    if now != stamp:
      what = "size" if now[1] != stamp[1] else "file (replaced)" if now[0] != stamp[0] else "modification time"
      raise ConversionError(
          f"{path}: changed during the conversion ({what}: {stamp} -> {now} as (inode, bytes, "
          "mtime ns)); the output was discarded: convert again from a file nothing writes to"
      )


def plan_import(source: Source, cfg: KangarooConfig, abstract=None, dtype: str = "float32") -> Assembler:
  """Classifies every key and checks every shape from the headers; raises ConversionError on any problem.

  `abstract`: the model's shapes (`kangaroo_jax.model_tree.abstract_model(cfg, run)`), traced here with
  parameters in `dtype` when not given.
  """
  from kangaroo_jax.model_tree import abstract_model
  from kangaroo_jax.run_options import RunOptions

  targets = param_targets(abstract if abstract is not None else abstract_model(cfg, RunOptions(param_dtype=dtype)))
  optional = OPTIONAL_WHEN_UNUSED if cfg.vision.feature_tap != "last_postnorm" else {}
  asm = Assembler(targets, optional=optional)
  for key in sorted(source.infos):
    info = source.infos[key]
    asm.accept(key, info.shape, info.dtype)
  asm.check()
  return asm


def import_checkpoint(
    src: str,
    dst: str,
    *,
    dtype: str = "bfloat16",
    preset: str = "kangaroo-8b",
    config_json: str | None = None,
    fmt: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    sync: bool = True,
) -> ImportResult:
  """Converts a released checkpoint folder `src` into `dst` (see the module docstring).

  `sync`: flush the written files to disk before the final rename. Chunks are written without an
  fsync each; a background thread fsyncs finished files during the conversion, and one durable pass
  before the rename covers every file and folder, so the guarantee at the rename is the same.
  """
  t0 = time.perf_counter()
  dtype = dtype_name(dtype)
  dst = check_destination(dst, overwrite, protect=(src,))
  src_dir = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
  with open_source(src, fmt) as source:
    stamps = file_stamps(source.files)
    # Tracing the model's shapes for the plan takes ~0.3 s: let the disk start on the first tensors
    # meanwhile (the writer replaces this hint with its exact order).
    source.prefetch(write_order(source.infos))
    resolved = resolve(src_dir, get_preset(preset), config_json, preset_name=preset)
    cfg, cfg_note = resolved.cfg, resolved.note
    check_against_header(cfg, source.infos, cfg_note)
    unverified = unverified_settings(cfg, source.infos, resolved)
    asm = plan_import(source, cfg, dtype=dtype)

    rule_of = {rule.path: rule for rule in asm.rules}
    defaults = asm.defaults()
    flagged: set[str] = set()  # released keys with a written block that is not all finite (any thread)

    def scan(keys: dict[int | None, str]):
      def test(layer: int | None, block: np.ndarray) -> None:
        if not all_finite(block):
          flagged.add(keys[layer])

      return test

    bar = Progress(asm.report.mapped + len(defaults), asm.report.bytes_read, "import", enabled=progress)

    def lazy(path: Path) -> LazyParam:
      shape, target_dtype = asm.targets[path]
      if path in defaults:
        fill = defaults[path][1]
        return LazyParam(
            shape,
            target_dtype,
            lambda: iter([(None, (np.ones if fill == "ones" else np.zeros)(shape, target_dtype))]),
            stacked=False,
            slice_bytes=math.prod(shape) * np.dtype(target_dtype).itemsize,
            on_written=lambda n: bar.update(1, 0),
        )
      rule = rule_of[path]
      keys = asm.sources[path]
      slots = sorted(keys, key=lambda s: -1 if s is None else s)

      def slices():
        for slot in slots:
          yield slot, to_ours(source.read(keys[slot]), rule.transform)

      return LazyParam(
          shape,
          target_dtype,
          slices,
          stacked=rule.stacked,
          on_written=lambda n: bar.update(1, n),
          slice_bytes=max(source.infos[k].nbytes for k in keys.values()),
          reads=tuple(keys[slot] for slot in slots),
          scan=scan(keys),
      )

    tree = unflatten({path: lazy(path) for path in asm.targets})
    return_large_frees_to_os()  # keeps the peak RSS at what is in flight (see the function)
    with (
        atomic_output_dir(dst, overwrite, protect=(src,)) as tmp,
        BackgroundSync(tmp) if sync else contextlib.nullcontext() as syncer,
        _gc_paused(),
    ):
      save_streaming(os.path.join(tmp, STATE_DIR), tree, chunk_bytes, on_order=source.prefetch)
      bar.close()
      # Only the flagged tensors are read again, to say what is wrong with them.
      nonfinite = {
          key: describe(source.read(key), _np_dtype(dtype)) or "not finite after conversion" for key in sorted(flagged)
      }
      with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        f.write(cfg.to_json() + "\n")
      copied = _copy_tokenizer_files(src_dir, tmp)
      report = {
          "source": source.describe(),
          "config": cfg_note,
          "dtype": dtype,
          "mapped": asm.report.mapped,
          "bytes_read": asm.report.bytes_read,
          "ignored": asm.report.ignored,
          "defaulted": asm.report.defaulted,
          "tokenizer_files": copied,
          "nonfinite": nonfinite,
          "unverified": unverified,
      }
      with open(os.path.join(tmp, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
      check_unchanged(stamps)
      if sync:
        syncer.finish()
  return ImportResult(
      dst,
      cfg,
      cfg_note,
      asm.report.mapped,
      asm.report.ignored,
      asm.report.defaulted,
      asm.report.bytes_read,
      time.perf_counter() - t0,
      copied,
      nonfinite,
      unverified,
      dtype,
  )


def export_checkpoint(
    ckpt: str, out: str, *, dtype: str | None = None, overwrite: bool = False, progress: bool = True
) -> dict:
  """Writes `out/model.safetensors` + `out/config.json` (released naming) from a converted checkpoint.

  `dtype`: the stored dtype by default, so import -> export -> import is bit-identical.
  Returns {"out", "tensors", "bytes", "tokenizer_files", "nonfinite": {released key: what is not finite}}.
  """
  if not os.path.isfile(os.path.join(ckpt, CONFIG_FILE)) or not os.path.isdir(os.path.join(ckpt, STATE_DIR)):
    raise ConversionError(
        f"{ckpt}: not a converted checkpoint (expected {CONFIG_FILE} and {STATE_DIR}/ written by "
        "`python -m tools.convert_weights import`)"
    )
  out = check_destination(out, overwrite, protect=(ckpt,))
  try:
    cfg = load_config(ckpt)
  except (ValueError, TypeError, AttributeError) as e:  # bad JSON, or fields of the wrong type / unknown
    file = os.path.join(ckpt, CONFIG_FILE)
    raise ConversionError(str(e) if file in str(e) else f"{file}: not a valid KangarooConfig ({e})") from None
  try:
    stored = StoredParams(os.path.join(ckpt, STATE_DIR))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConversionError(f"{os.path.join(ckpt, STATE_DIR)}: not a checkpoint written by `import` ({e})") from None
  have = set(stored.paths)

  def read(path, layer=None):
    try:
      return stored.read(path, layer)
    except ValueError as e:  # TensorStore: a damaged or incomplete state/
      raise ConversionError(f"{os.path.join(ckpt, STATE_DIR)}: cannot read {'.'.join(path)}: " f"{_short(e)}") from None

  plan = []
  for rule in RULES:
    if rule.path not in have:
      continue
    try:
      shape, stored_dtype = stored.shape_dtype(rule.path)
    except ValueError as e:
      raise ConversionError(
          f"{os.path.join(ckpt, STATE_DIR)}: cannot open {'.'.join(rule.path)}: " f"{_short(e)}"
      ) from None
    out_dtype = _np_dtype(dtype_name(dtype)) if dtype else stored_dtype
    if rule.stacked:
      for i in range(shape[0]):
        plan.append((rule.key.format(i=i), rule, i, released_shape(shape[1:], rule), out_dtype))
    else:
      plan.append((rule.key, rule, None, released_shape(shape, rule), out_dtype))
  covered = {r.path for r in RULES}
  unexported = sorted(".".join(p) for p in have if p not in covered)
  if unexported:
    raise ConversionError(f"parameters with no released name cannot be exported: {unexported}")
  plan.sort(key=lambda e: e[0])
  entries = [(key, shape, dt) for key, _, _, shape, dt in plan]
  total = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in entries)
  bar = Progress(len(entries), total, "export", enabled=progress)
  nonfinite: dict[str, str] = {}

  def tensors():
    for key, rule, layer, _, out_dtype in plan:
      stored_value = read(rule.path, layer)
      with np.errstate(over="ignore", invalid="ignore"):  # reported below, by tensor
        value = np.ascontiguousarray(to_released(stored_value, rule.transform).astype(out_dtype, copy=False))
      if not all_finite(value):
        nonfinite[key] = describe(stored_value, out_dtype) or "not finite after conversion"
      bar.update(1, value.nbytes)
      yield key, value

  names = sorted({np.dtype(d).name for _, _, d in entries})
  torch_dtype = names[0] if len(names) == 1 else "float32"
  with atomic_output_dir(out, overwrite, protect=(ckpt,)) as tmp:
    written = safetensors_io.write_file(
        os.path.join(tmp, "model.safetensors"), entries, tensors(), metadata={"format": "pt"}
    )
    bar.close()
    with open(os.path.join(tmp, "config.json"), "w") as f:
      released = hf_from_llama(cfg.llm, _TORCH_DTYPE_NAMES.get(torch_dtype, torch_dtype))
      json.dump({**released, "vision_config": vision_to_hf(cfg.vision)}, f, indent=2)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      f.write(cfg.to_json() + "\n")
    copied = _copy_tokenizer_files(ckpt, tmp)
  return {"out": out, "tensors": len(entries), "bytes": written, "tokenizer_files": copied, "nonfinite": nonfinite}


def _short(e: Exception) -> str:
  """A TensorStore error without its spec dump (the spec JSON alone is often 1,000+ characters)."""
  text = str(e).split(" [tensorstore_spec=")[0].strip()
  return text if len(text) <= 300 else text[:297] + "..."


def inspect_checkpoint(src: str, fmt: str = "auto") -> dict:
  """Keys, shapes, dtypes, sizes and what the converter would do with each, from headers only."""
  with open_source(src, fmt) as source:
    rows = []
    counts = {"mapped": 0, "ignored": 0, "unmapped": 0}
    for key in sorted(source.infos):
      info = source.infos[key]
      what = classify(key, RULES)
      if isinstance(what, Mapped):
        action = ".".join(what.rule.path) + (f"[{what.layer}]" if what.rule.stacked else "")
        counts["mapped"] += 1
      elif isinstance(what, Ignored):
        action = f"ignored: {what.reason}"
        counts["ignored"] += 1
      else:
        action = "UNMAPPED"
        counts["unmapped"] += 1
      rows.append(
          {
              "key": key,
              "dtype": safetensors_io._NAMES.get(info.dtype, str(info.dtype)),
              "shape": list(info.shape),
              "bytes": info.nbytes,
              "action": action,
          }
      )
    return {
        "source": source.describe(),
        "tensors": len(rows),
        "total_bytes": source.total_bytes,
        "parameters": int(sum(np.prod(r["shape"]) for r in rows)),
        "counts": counts,
        "rows": rows,
    }


def format_inspect(result: dict) -> str:
  width = max((len(r["key"]) for r in result["rows"]), default=10)
  lines = [
      f"{r['key']:<{width}}  {r['dtype']:<5} {str(tuple(r['shape'])):<22} {r['bytes']:>14,d}  {r['action']}"
      for r in result["rows"]
  ]
  c = result["counts"]
  lines.append(
      f"{result['source']}: {result['tensors']} tensors, {result['parameters']:,d} parameters, "
      f"{result['total_bytes'] / 1e9:.3f} GB; mapped {c['mapped']}, ignored {c['ignored']}, "
      f"unmapped {c['unmapped']}"
  )
  return "\n".join(lines)


__all__ = [
    "ConversionError",
    "ImportResult",
    "atomic_output_dir",
    "export_checkpoint",
    "format_inspect",
    "import_checkpoint",
    "inspect_checkpoint",
    "plan_import",
]
