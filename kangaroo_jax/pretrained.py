"""Loading a checkpoint: `model, tokenizer = kangaroo_jax.from_pretrained(path)`.

Two layouts are read. The released Hugging Face folder (config.json, model.safetensors[.index.json] or
pytorch_model.bin, tokenizer files, the vision tower's EVA02-CLIP-L-14-448.json when present) is loaded
directly, tensor by tensor, with the converter's key accounting (kangaroo_jax/hf_direct.py). The
converted folder, faster to load again and again, is the layout written by
`python -m tools.convert_weights import SRC DST`:
  DST/kangaroo_config.json       KangarooConfig.to_json(): shapes only (how to run is RunOptions, chosen at load)
  DST/state/                     Orbax PyTree checkpoint (OCDBT): nested dict of parameter arrays,
                                 keys = the NNX parameter path (llm/model/layers/self_attn/q_proj/kernel)
  DST/tokenizer.json, ...        tokenizer files copied from the release (optional)
  DST/conversion_report.json     what was mapped / ignored / defaulted, from where

Each parameter is restored straight onto its shards (NamedSharding from the logical-axis rules,
kangaroo_jax.parallel.sharding.param_shardings) on the given mesh, else on the mesh set with
`jax.set_mesh`, else on one device. No full host copy and no replicated copy is made.

What it returns is a `PretrainedKangaroo`: the Kangaroo module itself (same parameters and paths; nnx.state,
nnx.jit, Engine and Chat take it as any Kangaroo) holding the tokenizer it was loaded with, so the release's
`answer, history = model.chat(video_path=..., query=..., history=...)` works on it.

Run options at load (`run_defaults`): the weights' stored dtype for both `param_dtype` and `compute_dtype`
(a converted release computes in bf16, a float32 export in float32), the other fields RunOptions' defaults;
a kangaroo_config.json written before the split also holds run-option keys at its top level, and those are
that folder's defaults (`split_legacy_keys`; retired keys, run_options.DROPPED_KEYS, are dropped). `run=` replaces the
defaults, `**run_overrides` change fields on top.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kangaroo_jax.config import ConfigError, KangarooConfig
from kangaroo_jax.inference.chat import Chat, released_num_frames
from kangaroo_jax.model_tree import abstract_model, param_tree, shardings_of, unflatten, with_values
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.parallel.rules import current_mesh
from kangaroo_jax.run_options import RunOptions, dtype_name, split_legacy_keys
from kangaroo_jax.tokenizer import Tokenizer, check_fits_vocab, has_tokenizer, load_tokenizer

CONFIG_FILE = "kangaroo_config.json"
STATE_DIR = "state"
REPORT_FILE = "conversion_report.json"
_EXPECTED = (
    f"a from_pretrained folder ({CONFIG_FILE}, {STATE_DIR}/, tokenizer files): a converted release or " "WORKDIR/export"
)


class CheckpointError(ValueError):
  """A path that is not a readable `from_pretrained` folder; the message names the path and what was expected."""


def _use_export(workdir: str) -> str:
  export = os.path.join(workdir, "export")
  if os.path.isfile(os.path.join(export, CONFIG_FILE)):
    return f"pass the run's export {export}"
  return (
      f"pass the run's export {export} once it exists (the trainer writes it when the run ends), or a "
      "release converted with `python -m tools.convert_weights import`"
  )


def _not_a_checkpoint(path: str) -> CheckpointError:
  """Why `path` (without kangaroo_config.json) is not a from_pretrained folder, and what to pass instead."""
  if not os.path.exists(path):
    return CheckpointError(f"{path}: no such folder; expected {_EXPECTED}")
  if not os.path.isdir(path):
    return CheckpointError(f"{path}: is a file; expected {_EXPECTED}")
  entries = set(os.listdir(path))
  here = os.path.abspath(path)
  parent = os.path.dirname(here)
  if {"state", "iter"} <= entries or (os.path.basename(parent) == "checkpoints" and os.path.basename(here).isdigit()):
    return CheckpointError(
        f"{path}: is a training checkpoint (WORKDIR/checkpoints/N), not a from_pretrained folder; "
        + _use_export(os.path.dirname(parent))
    )
  if os.path.basename(here) == "checkpoints" and any(e.isdigit() for e in entries):
    return CheckpointError(f"{path}: is the trainer's checkpoints folder; " + _use_export(parent))
  if "checkpoints" in entries:
    return CheckpointError(f"{path}: is a training run folder; " + _use_export(here))
  if "config.json" in entries and not any(name in entries for name in RELEASED_WEIGHTS):
    return CheckpointError(
        f"{path}: has a config.json but no weights; expected {RELEASED_WEIGHTS[0]}, "
        f"{RELEASED_WEIGHTS[1]} or {' / '.join(RELEASED_WEIGHTS[2:])} next to it, or "
        f"{_EXPECTED}"
    )
  return CheckpointError(f"{path}: no {CONFIG_FILE}; expected {_EXPECTED}")


def _read_config_file(path: str) -> tuple[str, dict]:
  """(file, its JSON object) of a converted folder; CheckpointError (one line, naming the file) otherwise."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise _not_a_checkpoint(path)
  try:
    with open(file) as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file}: not a readable JSON file ({e})") from None
  if not isinstance(data, dict):
    raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
  return file, data


def load_config(path: str, preset: str = "kangaroo-8b") -> KangarooConfig:
  """The KangarooConfig (shapes) of a from_pretrained folder; CheckpointError (one line, naming the file) otherwise.

  A released Hugging Face folder (no kangaroo_config.json) gets the config `from_pretrained` would load it
  with: config.json's LLM, the folder's vision settings, `preset` for the rest.
  """
  if not os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(path) and is_released_folder(path):
    from kangaroo_jax.hf_direct import released_config

    return released_config(path, preset)
  file, data = _read_config_file(path)
  shapes, _ = split_legacy_keys(data)
  try:
    return KangarooConfig.from_dict(shapes)
  except (ValueError, TypeError, KeyError) as e:
    raise CheckpointError(f"{file}: {e}") from None


def stored_dtype(state_dir: str) -> str:
  """The dtype most of the bytes in an Orbax `state/` are stored in (from its metadata; no weight is read)."""
  import orbax.checkpoint as ocp

  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(state_dir)
  except Exception as e:  # Orbax raises many types for a missing or damaged checkpoint
    lines = str(e).strip().splitlines()
    raise CheckpointError(
        f"{state_dir}: cannot restore the weights (no readable metadata: {type(e).__name__}: "
        f"{lines[0][:300] if lines else ''})"
    ) from e
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  nbytes: dict[str, int] = {}
  for leaf in jax.tree.leaves(tree):
    name = np.dtype(leaf.dtype).name
    nbytes[name] = nbytes.get(name, 0) + int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  if not nbytes:
    raise CheckpointError(f"{state_dir}: cannot restore the weights (its metadata lists no arrays)")
  try:
    return dtype_name(max(nbytes, key=nbytes.get))
  except ConfigError as e:
    raise CheckpointError(f"{state_dir}: {e}") from None


def run_defaults(path: str, preset: str = "kangaroo-8b") -> RunOptions:
  """The RunOptions a folder loads with when the caller passes none (see the module docstring)."""
  if not os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(path) and is_released_folder(path):
    from kangaroo_jax.hf_direct import released_run_defaults

    return released_run_defaults(path, preset)
  file, data = _read_config_file(path)
  _, legacy = split_legacy_keys(data)
  stored = legacy.get("param_dtype") or stored_dtype(os.path.abspath(os.path.join(path, STATE_DIR)))
  try:
    return RunOptions.from_dict({"param_dtype": stored, "compute_dtype": stored, **legacy}, where=file)
  except (ConfigError, TypeError) as e:
    raise CheckpointError(str(e) if file in str(e) else f"{file}: {e}") from None


def resolve_run(path: str, run: RunOptions | None, overrides: dict, preset: str = "kangaroo-8b") -> RunOptions:
  """`run` (else the folder's `run_defaults`) with `overrides` applied; ConfigError naming an unknown field."""
  base = run if run is not None else run_defaults(path, preset)
  if not overrides:
    return base
  given = {k: v for k, v in overrides.items() if v is not None}  # CLI flags left unset mean "as the folder says"
  return RunOptions.from_dict({**base.to_dict(), **given}, where="from_pretrained")


# Weight files of a released Hugging Face folder (tools.convert_weights.sources.open_source reads them all).
RELEASED_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def is_released_folder(path: str) -> bool:
  """A Hugging Face folder to load directly: config.json and weight files, no converted `state/`."""
  return (
      os.path.isfile(os.path.join(path, "config.json"))
      and not os.path.isdir(os.path.join(path, STATE_DIR))
      and any(os.path.exists(os.path.join(path, name)) for name in RELEASED_WEIGHTS)
  )


class PretrainedKangaroo(Kangaroo):
  """A Kangaroo that holds the tokenizer it was loaded with and, once used, its Chat (compiled engine, last
  decoded video), so that `model.chat(...)` needs no tokenizer and its follow-ups reuse the cache.

  Both are plain (static) attributes: the parameters, their paths and every nnx transform are Kangaroo's.
  """

  tokenizer: Tokenizer | None = None
  _chat: Chat | None = None

  def chat_session(self, tokenizer: Tokenizer | None = None) -> Chat:
    """The Chat `chat()` uses: made on first use (or for another tokenizer), then kept on this model."""
    tokenizer = tokenizer if tokenizer is not None else self.tokenizer
    current = self._chat
    # `current.model is not self`: a copy (nnx.merge / clone) shares the static attribute, not the weights.
    if current is None or current.model is not self or (tokenizer is not None and current.tokenizer is not tokenizer):
      self._chat = None  # the engine splits this model: it must not hold the Chat it replaces
      current = Chat(self, tokenizer)
      self._chat = current
    return current

  def chat(
      self,
      video_path: str | None = None,
      query: str | None = None,
      tokenizer: Tokenizer | None = None,
      history=None,
      num_frames: int | None = None,
      num_segments: int | None = None,
      **kwargs,
  ):
    """The released API: `answer, history = model.chat(video_path=..., query=..., history=None, num_frames=64,
    max_new_tokens=512, do_sample=True, temperature=0.6, top_p=0.9)` (`num_segments`: the release's name for
    num_frames); the rest as kangaroo_jax.inference.chat.Chat.chat."""
    n = released_num_frames(num_frames, num_segments)
    return self.chat_session(tokenizer).chat(video_path, query, history, num_frames=n, **kwargs)


def loaded_model(abstract: PretrainedKangaroo, value_of, tokenizer: Tokenizer | None) -> PretrainedKangaroo:
  """`abstract` (model_tree.abstract_model(..., cls=PretrainedKangaroo)) with every parameter replaced by
  `value_of(path)` (a jax.Array), holding `tokenizer`."""
  model = with_values(abstract, value_of)
  model.tokenizer = tokenizer
  return model


def from_pretrained(
    path: str,
    mesh: Mesh | None = None,
    *,
    config: KangarooConfig | None = None,
    run: RunOptions | None = None,
    preset: str = "kangaroo-8b",
    warn=None,
    **run_overrides,
) -> tuple[PretrainedKangaroo, Tokenizer | None]:
  """Loads a released Hugging Face folder or a converted checkpoint onto `mesh`.

  Args:
    path: a released folder (config.json + safetensors shards or pytorch_model.bin, tokenizer files),
      loaded directly (kangaroo_jax.hf_direct), or the converter's output folder (Orbax).
    mesh: where to put the parameters; default: the mesh set with `jax.set_mesh`, else one device.
    config: use these shapes instead of the folder's; they must match the stored ones.
    run: the RunOptions to run with, instead of the folder's defaults (`run_defaults`: dtypes as stored,
      the dtype config.json names as `torch_dtype` for a released folder, bfloat16 when it names none).
    run_overrides: RunOptions fields to change on top, e.g. param_dtype="float32" (cast while loading),
      compute_dtype="bfloat16", attention_impl="ring"; None leaves a field as it is.
    preset: released folder only: the preset for what the folder does not say (projector, TPE, vision
      settings absent from its vision config), as `tools.convert_weights import --preset`.
    warn: released folder only: called with each one-line warning (non-finite tensors, settings no tensor
      shape checks); default: `warnings.warn`.
  Returns: (model, tokenizer or None when the folder holds no tokenizer files).
  Raises CheckpointError for a path that is not such a folder (or whose weights cannot be restored, or
  whose keys do not match the config: every unmapped, missing or mis-shaped key listed, as the converter
  lists them) and TokenizerError for unreadable tokenizer files or a tokenizer with ids beyond the model's
  vocabulary; both are checked before any weight is read.
  """
  mesh = mesh if mesh is not None else current_mesh(concrete=True)
  if not os.path.isfile(os.path.join(path, CONFIG_FILE)) or not os.path.isdir(os.path.join(path, STATE_DIR)):
    if os.path.isdir(path) and is_released_folder(path):
      from kangaroo_jax.hf_direct import load_released

      model, tokenizer, _ = load_released(path, mesh, config=config, run=run, preset=preset, warn=warn, **run_overrides)
      return model, tokenizer
  import orbax.checkpoint as ocp

  cfg = config or load_config(path)
  state_dir = os.path.abspath(os.path.join(path, STATE_DIR))
  if not os.path.isdir(state_dir):
    raise CheckpointError(f"{state_dir}: missing; expected the Orbax weights of {_EXPECTED}")
  tokenizer = load_tokenizer(path) if has_tokenizer(path) else None
  if tokenizer is not None:
    check_fits_vocab(tokenizer, cfg.llm.vocab_size, f"llm.vocab_size in {os.path.join(path, CONFIG_FILE)}")
  run = resolve_run(path, run, run_overrides)
  abstract = abstract_model(cfg, run, cls=PretrainedKangaroo)
  sharding_of = shardings_of(abstract, mesh)
  flat = nnx.to_flat_state(nnx.state(abstract))
  targets = {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_of(p)) for p, v in flat}
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(state_dir, unflatten(targets))
  except Exception as e:  # Orbax / tensorstore raise many types for a damaged or mismatched checkpoint
    lines = str(e).strip().splitlines()
    raise CheckpointError(
        f"{state_dir}: cannot restore the weights ({type(e).__name__}: " f"{lines[0][:300] if lines else ''})"
    ) from e

  def leaf(p):
    node = restored
    for k in map(str, p):
      node = node[k]
    return node

  return loaded_model(abstract, leaf, tokenizer), tokenizer


def save_pretrained(model: Kangaroo, tokenizer_dir: str | None, out_dir: str) -> str:
  """Writes `model` in the layout `from_pretrained` reads (config, Orbax `state/`, tokenizer files).

  Args:
    model: a Kangaroo whose parameters may be sharded (Orbax writes each shard from its device).
    tokenizer_dir: folder holding tokenizer files (tokenizer.json / tokenizer.model, configs) to copy,
      or None to write a checkpoint without a tokenizer.
    out_dir: created if missing; must not already hold a `state/` checkpoint.
  Returns: out_dir.
  """
  import shutil

  import orbax.checkpoint as ocp
  from kangaroo_jax.tokenizer import TOKENIZER_FILES

  state_dir = os.path.abspath(os.path.join(out_dir, STATE_DIR))
  if os.path.exists(state_dir):
    raise FileExistsError(f"{state_dir} already exists; save_pretrained does not overwrite checkpoints")
  if tokenizer_dir is not None and not has_tokenizer(tokenizer_dir):
    raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model to copy")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    f.write(model.cfg.to_json())  # shapes only: how to run it is chosen when it is loaded
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(state_dir, param_tree(model))
  if tokenizer_dir is not None:
    for name in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, name)
      if os.path.exists(src):
        shutil.copyfile(src, os.path.join(out_dir, name))
  return out_dir
