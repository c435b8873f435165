"""tools.convert_weights: import / export / inspect on a tiny random checkpoint in the exact released naming.

The checkpoint is built the way the release is: the LLM weights are a transformers `LlamaForCausalLM`'s
state dict (`model.*` + `lm_head.weight`), saved with torch (`pytorch_model.bin`) and with the
safetensors library (`model.safetensors`); the vision tower and projector are random arrays under the
EVA-CLIP names (`vision_tower.*`, incl. the `rope.freqs_cos/sin` buffers - per block as well in the
.bin, sharing storage as EVA's module sharing produces - and the CLIP `head`) and `mm_projector.0/.2`.

References: text-only logits are compared with transformers on the same weights. A torch reference of
the vision path (EVA02 + Kangaroo's patchify/TPE) is not available here, so the with-frames logits are
compared with our own model loaded in memory from the same tensors (`load_released_tensors`); the EVA
and projector math itself is covered by the model's parity tests.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import re
import shutil
import sys
import time
import types

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

import kangaroo_jax
from kangaroo_jax.config import preset
from kangaroo_jax.models import Kangaroo
from tests.helpers import max_rel_error
from tests.test_tokenizer import build_bpe_tokenizer
from tools.convert_weights import safetensors_io, sources
from tools.convert_weights.__main__ import main as cli
from tools.convert_weights.assemble import ConversionError, load_released_tensors
from tools.convert_weights.convert import import_checkpoint, inspect_checkpoint, plan_import
from tools.convert_weights.hf_config import check_against_header, resolve_config, transformers_llama_config
from tools.convert_weights.orbax_io import StoredParams, contiguous
from tools.convert_weights.progress import Progress
from tools.convert_weights.safetensors_io import TensorInfo
from tools.convert_weights.sources import SourceError
from tools.convert_weights.synthetic import random_tensor, released_entries

TOL = 1e-4
CFG = preset("tiny")


def _hf_config_json(llm) -> dict:
  """config.json as released (transformers 4.41 layout, docs/model.md section 4), tiny sizes."""
  return {
      "architectures": ["KangarooForCausalLM"],
      "model_type": "llama",
      "vocab_size": llm.vocab_size,
      "hidden_size": llm.hidden_size,
      "intermediate_size": llm.intermediate_size,
      "num_hidden_layers": llm.num_layers,
      "num_attention_heads": llm.num_heads,
      "num_key_value_heads": llm.num_kv_heads,
      "hidden_act": "silu",
      "rms_norm_eps": llm.rms_norm_eps,
      "rope_theta": llm.rope_theta,
      "rope_scaling": None,
      "max_position_embeddings": llm.max_position_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
      "tie_word_embeddings": False,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "torch_dtype": "bfloat16",
      "pretraining_tp": 1,
      "use_flash_attention_2": True,
  }


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """{'dir': folder with config.json, model.safetensors, pytorch_model.bin, tokenizer; 'hf': torch model;
  'tensors': the float32 numpy tensors of the file}."""
  root = tmp_path_factory.mktemp("released")
  llm = CFG.llm
  hf_cfg = transformers_llama_config(llm, attn_implementation="eager")
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
  rng = np.random.default_rng(1)
  for key, shape in released_entries(CFG):
    if key.startswith(("vision_tower.", "mm_projector.")):
      state[key] = torch.from_numpy(random_tensor(key, shape, rng))
  save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
  # The .bin keeps EVA's per-block copies of the rope buffers (one shared storage), as torch.save writes them.
  with_blocks = dict(state)
  for i in range(CFG.vision.num_layers):
    for name in ("freqs_cos", "freqs_sin"):
      with_blocks[f"vision_tower.blocks.{i}.attn.rope.{name}"] = state[f"vision_tower.rope.{name}"]
  torch.save(with_blocks, root / "pytorch_model.bin")
  with open(root / "config.json", "w") as f:
    json.dump(_hf_config_json(llm), f)
  build_bpe_tokenizer(str(root))
  return {"dir": str(root), "hf": hf, "tensors": {k: v.numpy() for k, v in state.items()}}


def _variant(released, tmp_path, files=("model.safetensors",)) -> str:
  """A copy of the released folder with only `files` of the weights (plus config/tokenizer)."""
  out = tmp_path / "src"
  os.makedirs(out)
  for name in os.listdir(released["dir"]):
    if name.endswith((".json",)) or name in files:
      shutil.copy(os.path.join(released["dir"], name), out / name)
  return str(out)


def _no_output(dst) -> None:
  dst = str(dst)
  assert not os.path.exists(dst)
  assert not glob.glob(os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.*")), "temp folder left"


@pytest.fixture(scope="module")
def imported_f32(released, tmp_path_factory):
  dst = tmp_path_factory.mktemp("imported") / "f32"
  assert cli(["import", released["dir"], str(dst), "--preset", "tiny", "--dtype", "float32", "--quiet"]) == 0
  return str(dst)


def _visual_inputs(model, rng):
  frames = rng.normal(size=(1, 2, 56, 56, 3)).astype(np.float32)
  n_vis = model.num_visual_tokens(2, 56, 56)
  ids = np.concatenate([[1, 17, 42], np.full(n_vis, CFG.visual_token_id), [99, 7, 300]])[None].astype(np.int32)
  return ids, frames, np.array([[0.0, 0.5]], np.float32)


def test_safetensors_import_matches_references(released, imported_f32):
  model, tokenizer = kangaroo_jax.from_pretrained(imported_f32)
  assert tokenizer is not None and tokenizer.stop_ids == (1, 4)
  report = json.load(open(os.path.join(imported_f32, "conversion_report.json")))
  assert report["mapped"] == len(released_entries(CFG, extras=False))
  assert sorted(report["ignored"]) == [
      "vision_tower.head.bias",
      "vision_tower.head.weight",
      "vision_tower.rope.freqs_cos",
      "vision_tower.rope.freqs_sin",
  ]
  ids = np.random.RandomState(0).randint(0, CFG.llm.vocab_size, size=(2, 12))
  with torch.no_grad():
    ref = released["hf"](torch.from_numpy(ids)).logits.numpy()
  err = max_rel_error(np.asarray(model(ids)), ref)
  print(f"text-only logits vs transformers: max rel err {err:.2e}")
  assert err <= TOL

  reference = Kangaroo(CFG, rngs=nnx.Rngs(0))
  load_released_tensors(
      reference, {k: v for k, v in released["tensors"].items() if ".rope." not in k and ".head." not in k}
  )
  ids, frames, ts = _visual_inputs(model, np.random.default_rng(0))
  got = np.asarray(model(ids, frames, ts))
  want = np.asarray(reference(ids, frames, ts))
  err = max_rel_error(got, want)
  print(f"with-frames logits vs in-memory load: max rel err {err:.2e}")
  assert err <= TOL


def test_bin_import_matches_safetensors_import(released, imported_f32, tmp_path):
  src = _variant(released, tmp_path, files=("pytorch_model.bin",))
  dst = tmp_path / "from_bin"
  result = import_checkpoint(src, str(dst), preset="tiny", dtype="float32", progress=False)
  # The per-block rope copies of the .bin are ignored too, each with its reason.
  assert len(result.ignored) == 4 + 2 * CFG.vision.num_layers
  a, b = StoredParams(os.path.join(imported_f32, "state")), StoredParams(os.path.join(dst, "state"))
  assert sorted(a.paths) == sorted(b.paths)
  for path in a.paths:
    assert np.array_equal(a.read(path), b.read(path)), path
  model, _ = kangaroo_jax.from_pretrained(str(dst))
  ids = np.random.RandomState(1).randint(0, CFG.llm.vocab_size, size=(1, 9))
  with torch.no_grad():
    ref = released["hf"](torch.from_numpy(ids)).logits.numpy()
  assert max_rel_error(np.asarray(model(ids)), ref) <= TOL


def test_bin_tensors_are_mapped_unless_not_contiguous(released, imported_f32, tmp_path, monkeypatch):
  """.bin tensors are read (without torch) through a map of their own bytes; a non-contiguous one (a
  view saved with its whole storage) is copied out of a map of that storage. Either way the stored
  values are the released ones."""
  src = _variant(released, tmp_path, files=())
  tensors = {k: torch.from_numpy(v.copy()) for k, v in released["tensors"].items()}
  key = "model.layers.0.mlp.down_proj.weight"
  tensors[key] = tensors[key].t().contiguous().t()  # same values, column-major storage
  assert not tensors[key].is_contiguous()
  torch.save(tensors, os.path.join(src, "pytorch_model.bin"))
  mapped = {}
  real = sources._mapped
  monkeypatch.setattr(sources, "_mapped", lambda info, fds: (mapped.update({info.key: info.shape}), real(info, fds))[1])
  dst = tmp_path / "out"
  import_checkpoint(src, str(dst), preset="tiny", dtype="float32", progress=False)
  assert len(mapped) == len(tensors) - 2 - 2  # all but the CLIP head and the rope tables (ignored, never read)
  assert mapped[key] == (tensors[key].numel(),)  # its storage, mapped whole; the view is copied out of it
  assert all(shape == tuple(tensors[k].shape) for k, shape in mapped.items() if k != key)
  a, b = StoredParams(os.path.join(imported_f32, "state")), StoredParams(os.path.join(dst, "state"))
  for path in a.paths:
    assert np.array_equal(a.read(path), b.read(path)), path


def test_early_readahead_predicts_the_writers_order(released, tmp_path, monkeypatch):
  """The read-ahead hint given before planning (from the keys alone) is the order the writer then reads in."""
  from tools.convert_weights import sources

  hints = []
  real = sources.SafetensorsSource.prefetch
  monkeypatch.setattr(
      sources.SafetensorsSource, "prefetch", lambda self, order: (hints.append(list(order)), real(self, order))[1]
  )
  result = import_checkpoint(released["dir"], str(tmp_path / "out"), preset="tiny", progress=False)
  assert len(hints) == 2 and hints[0] == hints[1] and len(hints[0]) == result.mapped


def test_round_trip_is_bit_identical_bf16(released, tmp_path):
  """bf16 .bin -> import (bf16) -> export -> import: every stored array bit-identical."""
  src = tmp_path / "bf16src"
  os.makedirs(src)
  shutil.copy(os.path.join(released["dir"], "config.json"), src / "config.json")
  torch.save(
      {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in released["tensors"].items()}, src / "pytorch_model.bin"
  )
  first, exported, second = tmp_path / "a", tmp_path / "exp", tmp_path / "b"
  import_checkpoint(str(src), str(first), preset="tiny", progress=False)
  assert cli(["export", str(first), str(exported), "--quiet"]) == 0
  infos, _ = safetensors_io.read_header(str(exported / "model.safetensors"))
  assert sorted(infos) == sorted(k for k, _ in released_entries(CFG, extras=False))
  assert {i.dtype for i in infos.values()} == {np.dtype(ml_dtypes.bfloat16)}
  # Exported tensors are the released ones (rounded to bf16 as torch rounds).
  for key, info in infos.items():
    want = torch.from_numpy(released["tensors"][key]).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(safetensors_io.read_tensor(info).view(np.int16), want), key
  assert json.load(open(exported / "config.json"))["num_hidden_layers"] == CFG.llm.num_layers
  import_checkpoint(str(exported), str(second), progress=False)  # config from the exported kangaroo_config.json
  a, b = StoredParams(str(first / "state")), StoredParams(str(second / "state"))
  assert sorted(a.paths) == sorted(b.paths)
  for path in a.paths:
    x, y = a.read(path), b.read(path)
    assert x.dtype == y.dtype == np.dtype(ml_dtypes.bfloat16)
    assert np.array_equal(x.view(np.uint16), y.view(np.uint16)), path
  # Restoring with a cast: bf16 values upcast exactly.
  model, _ = kangaroo_jax.from_pretrained(str(second), param_dtype="float32")
  kernel = model.llm.model.layers.mlp.down_proj.kernel[...]
  assert kernel.dtype == np.float32
  assert np.array_equal(
      np.asarray(kernel), b.read(("llm", "model", "layers", "mlp", "down_proj", "kernel")).astype(np.float32)
  )


def _write_modified(released, tmp_path, change) -> str:
  src = _variant(released, tmp_path, files=())
  tensors = {k: torch.from_numpy(v.copy()) for k, v in released["tensors"].items()}
  change(tensors)
  save_file(tensors, os.path.join(src, "model.safetensors"))
  return src


@pytest.mark.parametrize(
    "case", ["extra_key", "missing_key", "wrong_shape", "truncated", "corrupt_header", "truncated_bin"]
)
def test_bad_checkpoints_fail_clearly_and_leave_nothing(released, tmp_path, case):
  if case == "extra_key":
    src = _write_modified(
        released, tmp_path, lambda t: t.update({"vision_tower.time_embed.weight": torch.zeros(7, 32)})
    )
    error, match = ConversionError, r"1 unmapped key\(s\):\n  vision_tower.time_embed.weight \(7, 32\) float32 \(hint:"
  elif case == "missing_key":
    src = _write_modified(released, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    error, match = ConversionError, r"1 missing key\(s\):\n  model.layers.1.mlp.up_proj.weight \(160, 64\)"
  elif case == "wrong_shape":
    src = _write_modified(released, tmp_path, lambda t: t.update({"mm_projector.2.bias": torch.zeros(65)}))
    error, match = ConversionError, r"mm_projector.2.bias: expected shape \(64,\), found \(65,\)"
  elif case in ("truncated", "corrupt_header"):
    src = _variant(released, tmp_path)
    path = os.path.join(src, "model.safetensors")
    data = open(path, "rb").read()
    data = data[:-1000] if case == "truncated" else data[:8] + b"{not json" + data[17:]
    open(path, "wb").write(data)
    error, match = SourceError, ("truncated file: tensor" if case == "truncated" else "header is not valid JSON")
  else:
    src = _variant(released, tmp_path, files=("pytorch_model.bin",))
    path = os.path.join(src, "pytorch_model.bin")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    error, match = SourceError, "pytorch_model.bin: not a \\(complete\\) torch zip checkpoint"
  dst = tmp_path / "out"
  with pytest.raises(error, match=match):
    import_checkpoint(src, str(dst), preset="tiny", progress=False)
  _no_output(dst)
  assert cli(["import", src, str(dst), "--preset", "tiny", "--quiet"]) == 2
  _no_output(dst)


@pytest.mark.parametrize("change", ["rewritten", "replaced"])
def test_source_changed_during_conversion_leaves_nothing(released, tmp_path, monkeypatch, change):
  src = _variant(released, tmp_path)
  path = os.path.join(src, "model.safetensors")
  calls = {"n": 0}
  real = sources.SafetensorsSource.read

  def meddle(self, key):  # another process rewrites (same size) or replaces the file mid-conversion
    calls["n"] += 1
    if calls["n"] == 5:
      if change == "rewritten":
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
      else:
        shutil.copy(path, path + ".new")
        os.replace(path + ".new", path)
    return real(self, key)

  monkeypatch.setattr(sources.SafetensorsSource, "read", meddle)
  dst = tmp_path / "out"
  what = "modification time" if change == "rewritten" else r"file \(replaced\)"
  with pytest.raises(ConversionError, match=f"model.safetensors: changed during the conversion \\({what}"):
    import_checkpoint(src, str(dst), preset="tiny", progress=False)
  _no_output(dst)


def test_failure_while_writing_leaves_nothing(released, tmp_path, monkeypatch):
  src = _variant(released, tmp_path)
  calls = {"n": 0}
  real = sources.SafetensorsSource.read

  def flaky(self, key):
    calls["n"] += 1
    if calls["n"] == 20:
      raise OSError("simulated I/O error")
    return real(self, key)

  monkeypatch.setattr(sources.SafetensorsSource, "read", flaky)
  dst = tmp_path / "out"
  with pytest.raises(Exception, match="simulated I/O error"):
    import_checkpoint(src, str(dst), preset="tiny", progress=False)
  _no_output(dst)
  time.sleep(0.5)  # nothing reappears from a writer that was still running
  _no_output(dst)


def test_wrong_preset_names_the_fields(released, tmp_path):
  dst = tmp_path / "out"
  with pytest.raises(
      ConversionError,
      match=r"vision.width = 1024 but the checkpoint has 32 "
      r"\(vision_tower.patch_embed.proj.weight \(32, 3, 14, 14\)\)",
  ):
    import_checkpoint(released["dir"], str(dst), preset="kangaroo-8b", progress=False)
  _no_output(dst)


def test_absent_vision_norm_is_defaulted_only_when_unused(released, tmp_path):
  src = _write_modified(
      released, tmp_path, lambda t: [t.pop(k) for k in ("vision_tower.norm.weight", "vision_tower.norm.bias")]
  )
  r = import_checkpoint(src, str(tmp_path / "ok"), preset="tiny", progress=False)
  assert sorted(r.defaulted) == ["vision_tower.norm.bias", "vision_tower.norm.weight"]
  stored = StoredParams(str(tmp_path / "ok" / "state"))
  assert np.all(stored.read(("vision_tower", "norm", "scale")) == 1)
  cfg = CFG.replace(vision=dataclasses.replace(CFG.vision, feature_tap="last_postnorm"))
  cfg_path = tmp_path / "postnorm.json"
  cfg_path.write_text(cfg.to_json())
  with pytest.raises(ConversionError, match=r"2 missing key\(s\):\n  vision_tower.norm.weight \(32,\)"):
    import_checkpoint(src, str(tmp_path / "bad"), config_json=str(cfg_path), progress=False)
  _no_output(tmp_path / "bad")


def test_sharded_safetensors_with_index(released, imported_f32, tmp_path):
  src = _variant(released, tmp_path, files=())
  keys = sorted(released["tensors"])
  shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
  for name, ks in shards.items():
    save_file({k: torch.from_numpy(released["tensors"][k]) for k in ks}, os.path.join(src, name))
  index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
  with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  dst = tmp_path / "out"
  import_checkpoint(src, str(dst), preset="tiny", dtype="float32", progress=False)
  a, b = StoredParams(os.path.join(imported_f32, "state")), StoredParams(str(dst / "state"))
  for path in a.paths:
    assert np.array_equal(a.read(path), b.read(path)), path
  # An index that names a key its shard does not hold is an error.
  index["weight_map"][keys[0]] = "model-00002-of-00002.safetensors"
  with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  with pytest.raises(SourceError, match="does not match the shard files"):
    import_checkpoint(src, str(tmp_path / "bad"), preset="tiny", progress=False)
  _no_output(tmp_path / "bad")


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp", "context", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 4)


@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (1, 2, 1, 4)], ids=["fsdp8", "fsdp2_tp4"])
def test_restore_onto_other_meshes(imported_f32, shape):
  single, _ = kangaroo_jax.from_pretrained(imported_f32)
  mesh = _mesh(shape)
  sharded, _ = kangaroo_jax.from_pretrained(imported_f32, mesh=mesh)
  with jax.set_mesh(mesh):
    ambient, _ = kangaroo_jax.from_pretrained(imported_f32)
  want = dict(nnx.to_flat_state(nnx.state(single, nnx.Param)))
  n_split = 0
  for model in (sharded, ambient):
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      arr = var[...]
      assert arr.sharding.mesh.shape == mesh.shape, path
      assert np.array_equal(np.asarray(arr), np.asarray(want[path][...])), path
      n_split += not arr.sharding.is_fully_replicated
  assert n_split > 0
  emb = sharded.llm.model.embed_tokens.embedding[...]
  assert not emb.sharding.is_fully_replicated
  assert emb.addressable_shards[0].data.size < emb.size


def test_inspect_reads_headers_only(released, tmp_path, monkeypatch, capsys):
  def boom(*a, **k):
    raise AssertionError("inspect must not read tensor data")

  monkeypatch.setattr(safetensors_io, "read_tensor", boom)
  monkeypatch.setattr(safetensors_io, "map_tensor", boom)
  monkeypatch.setattr(sources, "map_tensor", boom)  # the readers' path to tensor data (.bin too)
  src = _variant(released, tmp_path)
  result = inspect_checkpoint(src)
  assert result["counts"] == {"mapped": len(released_entries(CFG, extras=False)), "ignored": 4, "unmapped": 0}
  assert result["total_bytes"] == sum(v.nbytes for v in released["tensors"].values())
  assert cli(["inspect", src]) == 0
  out = capsys.readouterr().out
  assert re.search(
      r"\nmodel\.layers\.1\.self_attn\.k_proj\.weight +F32 +\(32, 64\) +8,192 +"
      r"llm\.model\.layers\.self_attn\.k_proj\.kernel\[1\]\n",
      out,
  ), out
  assert "ignored: CLIP projection head" in out
  bin_result = inspect_checkpoint(_variant(released, tmp_path / "b", files=("pytorch_model.bin",)))
  assert bin_result["counts"]["ignored"] == 4 + 2 * CFG.vision.num_layers


def test_existing_output_needs_overwrite(released, imported_f32, tmp_path):
  with pytest.raises(ConversionError, match="already exists"):
    import_checkpoint(released["dir"], imported_f32, preset="tiny", progress=False)
  src = _variant(released, tmp_path)
  dst = tmp_path / "out"
  import_checkpoint(src, str(dst), preset="tiny", progress=False)
  before = os.stat(dst / "state").st_ino
  import_checkpoint(src, str(dst), preset="tiny", overwrite=True, progress=False)
  assert (dst / "state").is_dir() and os.stat(dst / "state").st_ino != before
  assert os.stat(dst).st_mode & 0o077  # not left with mkdtemp's 0700
  # A folder this tool did not write is never replaced, even with --overwrite (tests/test_convert_safety.py).
  (dst / "stale.txt").write_text("mine")
  with pytest.raises(ConversionError, match=r"out: not replaced: it holds stale.txt, which this tool does not write"):
    import_checkpoint(src, str(dst), preset="tiny", overwrite=True, progress=False)
  assert (dst / "stale.txt").read_text() == "mine"


def test_released_8b_layout_plans_cleanly(tmp_path):
  """The full-size released key set (docs/model.md section 4, with EVA's per-block rope copies) against
  the kangaroo-8b preset and the released config.json: headers only, nothing is allocated."""
  cfg8 = preset("kangaroo-8b")
  hf = {**_hf_config_json(cfg8.llm), "bos_token_id": 128000, "eos_token_id": 128001, "rope_theta": 500000.0}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  cfg, note = resolve_config(str(tmp_path), cfg8)
  assert cfg.llm == cfg8.llm and cfg.llm.eos_token_ids == (128001, 128009)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  entries = released_entries(cfg8)
  entries += [
      (f"vision_tower.blocks.{i}.attn.rope.{n}", (1024, 64)) for i in range(24) for n in ("freqs_cos", "freqs_sin")
  ]
  infos = {k: TensorInfo(k, tuple(s), bf16, "model.safetensors") for k, s in entries}
  check_against_header(cfg, infos, note)
  asm = plan_import(types.SimpleNamespace(infos=infos), cfg, dtype="bfloat16")
  assert asm.report.mapped == 805 and len(asm.report.ignored) == 4 + 48
  # Parameter counts of docs/model.md section 5: Llama-3-8B + EVA-L@448 (no head) + projector.
  assert asm.report.bytes_read == 2 * (8_030_261_248 + 304_104_384 + 20_979_712)


def test_progress_bar_counts_tensors_and_bytes():
  out = io.StringIO()
  bar = Progress(4, 4000, "import", stream=out)
  for _ in range(4):
    bar.update(1, 1000)
  bar.close()
  lines = out.getvalue().splitlines()
  assert lines[-1].startswith("import [##############################] 4/4 tensors 3.9 KB/3.9 KB")


@pytest.mark.parametrize("cols", [53, 50, 48])  # source columns: odd (plain tiles), even, a multiple of 8 (grouped)
def test_contiguous_transpose_is_exact(cols):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((37, cols), dtype=np.float32)
  # NaNs with payloads: grouped items are copied as raw bytes, never as floats. Casting them warns
  # (numpy / ml_dtypes) in both `contiguous` and the reference: expected here.
  x.view(np.uint32)[0, :4] = [0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000]
  with np.errstate(invalid="ignore"):
    views = (x.T, x.T[3:30, 5:20], x.T[:, 1:], x.astype(ml_dtypes.bfloat16).T, x.astype(np.float16).T[:, 2:])
    for a in views:
      for dtype in (a.dtype, np.dtype(ml_dtypes.bfloat16)):
        want = np.array(a, dtype=dtype, order="C").view(np.uint8)
        # No scratch, a scratch of a few rows (many column blocks) and one of 16 bytes (too small: replaced).
        for scratch in (None, np.empty(37 * 16 * 3, np.uint8), np.empty(16, np.uint8)):
          out = np.empty(a.nbytes + 7, np.uint8)
          got = contiguous(a, dtype, out, scratch)
          assert got.flags.c_contiguous and got.dtype == dtype and got.shape == a.shape
          assert np.array_equal(got.view(np.uint8), want)


def test_streaming_writer_overlaps_within_the_memory_bound(tmp_path):
  """Parallel copies + writes give the same bytes as the serial path, and the source arrays alive at
  any read stay within the largest one (the bound the peak-RSS target relies on)."""
  import weakref

  from tools.convert_weights.orbax_io import LazyParam, save_streaming

  rng = np.random.default_rng(0)
  layers = [rng.standard_normal((48, 40), dtype=np.float32) for _ in range(5)]
  big = rng.standard_normal((96, 80), dtype=np.float32)
  alive: list = []
  worst = {"bytes": 0}

  def source(a):  # a fresh array per read, like the real readers
    worst["bytes"] = max(worst["bytes"], sum(r().nbytes for r in alive if r() is not None))
    out = a.copy()
    alive.append(weakref.ref(out))
    return out

  def tree():
    bf16 = np.dtype(ml_dtypes.bfloat16)
    return {
        "stacked": LazyParam(
            (5, 40, 48),
            bf16,
            lambda: ((i, source(x).T) for i, x in enumerate(layers)),
            stacked=True,
            slice_bytes=layers[0].nbytes,
            reads=("a",),
        ),
        "big": LazyParam(
            (80, 96), np.float32, lambda: iter([(None, source(big).T)]), stacked=False, slice_bytes=big.nbytes
        ),
        "id": LazyParam(
            (48, 40), np.float32, lambda: iter([(None, source(layers[1]))]), stacked=False, slice_bytes=layers[1].nbytes
        ),
    }

  order = []
  # 2 KB chunks: several blocks per tensor, so copies and writes of one tensor overlap the next read.
  save_streaming(str(tmp_path / "par"), tree(), chunk_bytes=2048, workers=2, on_order=order.extend)
  assert order == ["a"]
  assert worst["bytes"] <= big.nbytes
  save_streaming(str(tmp_path / "ser"), tree(), chunk_bytes=2048, workers=0, max_pending=1)
  a, b = StoredParams(str(tmp_path / "par")), StoredParams(str(tmp_path / "ser"))
  for path in a.paths:
    assert np.array_equal(a.read(path).view(np.uint8), b.read(path).view(np.uint8)), path
  want = np.stack([x.T for x in layers]).astype(ml_dtypes.bfloat16)
  assert np.array_equal(a.read(("stacked",)).view(np.uint16), want.view(np.uint16))
  assert np.array_equal(a.read(("big",)), big.T)


def test_background_sync_then_final_pass_covers_changed_files(tmp_path, monkeypatch):
  from tools.convert_weights import orbax_io

  root = tmp_path / "out"
  (root / "d").mkdir(parents=True)
  (root / "d" / "early").write_bytes(b"x" * 100)
  (root / "d" / "kept").write_bytes(b"k")  # synced in the background and unchanged: skipped at the end
  (root / "d" / "late.__lock").write_bytes(b"y")
  synced = []
  real = orbax_io._fsync
  monkeypatch.setattr(orbax_io, "_fsync", lambda p: (synced.append(os.path.relpath(p, root)), real(p)))
  with orbax_io.BackgroundSync(str(root), interval=0.01, settle=0.0) as sync:
    deadline = time.time() + 5
    while not {"d/early", "d/kept"} <= set(synced) and time.time() < deadline:
      time.sleep(0.01)
    assert {"d/early", "d/kept"} <= set(synced) and "d/late.__lock" not in synced
    sync.stop()
    (root / "d" / "early").write_bytes(b"z" * 101)  # changed after its background fsync
    os.rename(root / "d" / "late.__lock", root / "d" / "late")
    synced.clear()
    (root / "meta").write_text("{}")
    sync.finish()
  assert sorted(synced) == [".", "d", "d/early", "d/late", "meta"]


def test_unsharded_drops_only_a_one_chunk_sharding_codec():
  from tools.convert_weights.orbax_io import _unsharded

  inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
  index = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]

  def spec(grid, inner_chunk):
    return {
        "driver": "zarr3",
        "metadata": {
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": grid}},
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {"chunk_shape": inner_chunk, "codecs": inner, "index_codecs": index},
                }
            ],
        },
    }

  one = spec([1, 64, 32], [1, 64, 32])
  assert _unsharded(one)["metadata"]["codecs"] == inner
  assert one["metadata"]["codecs"][0]["name"] == "sharding_indexed"  # the input is not modified
  several = spec([1, 64, 32], [1, 16, 32])  # several chunks per shard: the shard index is needed
  assert _unsharded(several) == several
  plain = {"driver": "zarr", "metadata": {"chunks": [4, 4]}}
  assert _unsharded(plain) == plain


def test_buffer_pool_reuses_best_fit_within_its_byte_budget():
  from tools.convert_weights.orbax_io import _BufferPool

  pool = _BufferPool(keep_bytes=100)
  a, b = pool.take(40), pool.take(60)
  pool.give(a)
  pool.give(b)
  assert [x.nbytes for x in pool.free] == [40, 60]
  assert pool.take(35) is a  # smallest that fits
  assert pool.take(20).nbytes == 20 and len(pool.free) == 1  # 60 is more than twice 20: a fresh buffer
  pool.give(a)
  held = pool.take(50)  # the 60-byte buffer, still referenced below
  view = held[:10]
  pool.give(held)  # a view is alive: not taken back
  assert [x.nbytes for x in pool.free] == [40]
  del view
  c = np.empty(70, np.uint8)
  pool.give(c)  # 40 + 70 > 100: the oldest free buffer goes
  assert [x.nbytes for x in pool.free] == [70]


def test_bin_reader_needs_no_torch_and_refuses_what_is_not_a_state_dict(released, tmp_path, monkeypatch):
  src = _variant(released, tmp_path, files=("pytorch_model.bin",))
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  with sources.open_source(src) as source:
    key = "model.layers.1.self_attn.k_proj.weight"
    assert np.array_equal(source.read(key), released["tensors"][key])
  monkeypatch.undo()

  def saved(obj, name):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)

  with pytest.raises(SourceError, match=r"entry 'step' is a int, not a tensor"):
    sources.open_source(saved({"w": torch.zeros(2), "step": 3}, "step.bin"))
  with pytest.raises(SourceError, match=r"refers to torch\.nn\.modules\.linear\.Linear, which a state dict"):
    sources.open_source(saved({"layer": torch.nn.Linear(2, 2)}, "module.bin"))
