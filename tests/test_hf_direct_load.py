"""from_pretrained on the released Hugging Face folder: straight onto the mesh, as import + Orbax load would.

The folder is the release's layout at the tiny preset's sizes (tools/convert_weights/synthetic.py): two
safetensors shards + model.safetensors.index.json, config.json, the tokenizer files and the vision
tower's EVA02-CLIP-L-14-448.json. The reference for every check is the converter: the same folder
imported (`tools.convert_weights import`) and restored with `from_pretrained` from Orbax.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tracemalloc
import warnings

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import kangaroo_jax
from kangaroo_jax import hf_direct
from kangaroo_jax.config import preset
from kangaroo_jax.pretrained import CheckpointError, load_config
from tests.test_tokenizer import build_bpe_tokenizer
from tools.convert_weights import safetensors_io
from tools.convert_weights.assemble import ConversionError
from tools.convert_weights.convert import import_checkpoint
from tools.convert_weights.synthetic import write_checkpoint

CFG = preset("tiny")
INDEX = "model.safetensors.index.json"


def _mesh(data: int, tensor: int):
  return jax.make_mesh(
      (data, 1, 1, tensor), ("data", "fsdp", "context", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 4
  )


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> str:
  folder = str(tmp_path_factory.mktemp("hf") / "released")
  write_checkpoint(folder, CFG, shards=2, vision_file=True)
  build_bpe_tokenizer(folder)
  return folder


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory) -> dict[str, str]:
  """{dtype: the folder imported by the converter in that dtype}."""
  root = tmp_path_factory.mktemp("converted")
  return {
      dtype: import_checkpoint(released, str(root / dtype), preset="tiny", dtype=dtype, progress=False).dst
      for dtype in ("float32", "bfloat16")
  }


def _params(model) -> dict:
  return {tuple(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _copy(folder: str, to) -> str:
  shutil.copytree(folder, to)
  return str(to)


def _rewrite(folder: str, change) -> None:
  """Applies `change` to the {key: array} of the shards (shard files and index rewritten alike)."""
  index = json.load(open(os.path.join(folder, INDEX)))
  tensors = {}
  for name in sorted(set(index["weight_map"].values())):
    infos, _ = safetensors_io.read_header(os.path.join(folder, name))
    tensors.update({k: np.array(safetensors_io.read_tensor(i)) for k, i in infos.items()})
    os.remove(os.path.join(folder, name))
  change(tensors)
  entries = [(k, v.shape, v.dtype) for k, v in sorted(tensors.items())]
  safetensors_io.write_file(
      os.path.join(folder, "model-00001-of-00001.safetensors"), entries, ((k, tensors[k]) for k, _, _ in entries)
  )
  index["weight_map"] = {k: "model-00001-of-00001.safetensors" for k in tensors}
  json.dump(index, open(os.path.join(folder, INDEX), "w"))


def test_direct_load_equals_import_then_load_bitwise(released, converted):
  """data=2 x tensor=4 mesh: same parameters bit for bit, placed the same way (and split), same logits;
  tokenizer and vision settings read from the folder."""
  mesh = _mesh(2, 4)
  lines = []
  direct, tokenizer, report = hf_direct.load_released(released, mesh, preset="tiny", warn=lines.append)
  via_orbax, orbax_tokenizer = kangaroo_jax.from_pretrained(converted["float32"], mesh)
  assert report.dtype == "float32"  # config.json's torch_dtype
  assert "vision from EVA02-CLIP-L-14-448.json" in report.config_source
  assert tokenizer is not None and tokenizer.stop_ids == orbax_tokenizer.stop_ids
  assert direct.cfg == via_orbax.cfg
  assert len(lines) == 2 and lines == report.unverified  # pt_hw_seq_len and TPE (the rope table shows head_width)
  want = _params(via_orbax)
  got = _params(direct)
  assert sorted(got) == sorted(want)
  split = 0
  for path, arr in got.items():
    ref = want[path]
    assert arr.dtype == ref.dtype and arr.sharding == ref.sharding, path
    assert np.array_equal(np.asarray(arr), np.asarray(ref)), path
    split += not arr.sharding.is_fully_replicated
  assert split >= 10
  kernel = got[("llm", "model", "layers", "mlp", "down_proj", "kernel")]  # stacked [layers, mlp, embed]
  assert {len(s.data) for s in kernel.addressable_shards} == {kernel.shape[0]}
  assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 4  # mlp split over tensor=4

  # Logits with frames (vision tower, projector and LLM), one compiled program for both models.
  rng = np.random.default_rng(0)
  frames = rng.normal(size=(1, 2, 56, 56, 3)).astype(np.float32)
  n_vis = direct.num_visual_tokens(2, 56, 56)
  ids = np.concatenate([[1, 17], np.full(n_vis, CFG.visual_token_id), [99, 7, 300]])[None].astype(np.int32)
  ts = np.array([[0.0, 0.5]], np.float32)
  forward = nnx.jit(lambda model: model(ids, frames, ts))
  assert np.array_equal(np.asarray(forward(direct)), np.asarray(forward(via_orbax)))


def test_direct_load_casts_like_the_converter(released, converted):
  """float32 shards loaded as bfloat16 equal the converter's bfloat16 import, bit for bit (one device)."""
  direct, _ = kangaroo_jax.from_pretrained(released, param_dtype="bfloat16", preset="tiny", warn=lambda s: None)
  via_orbax, _ = kangaroo_jax.from_pretrained(converted["bfloat16"])
  want = _params(via_orbax)
  for path, arr in _params(direct).items():
    assert arr.dtype == np.dtype(ml_dtypes.bfloat16), path
    assert np.array_equal(np.asarray(arr).view(np.uint16), np.asarray(want[path]).view(np.uint16)), path


@pytest.mark.parametrize("case", ["extra_key", "missing_key", "wrong_shape"])
def test_key_problems_are_reported_as_the_converter_reports_them(released, tmp_path, case):
  src = _copy(released, tmp_path / "src")
  if case == "extra_key":
    _rewrite(src, lambda t: t.update({"vision_tower.time_embed.weight": np.zeros((7, 32), np.float32)}))
    expected = r"1 unmapped key\(s\):\n  vision_tower.time_embed.weight \(7, 32\) float32 \(hint:"
  elif case == "missing_key":
    _rewrite(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expected = r"1 missing key\(s\):\n  model.layers.1.mlp.up_proj.weight \(160, 64\)"
  else:
    _rewrite(src, lambda t: t.update({"mm_projector.2.bias": np.zeros(65, np.float32)}))
    expected = r"mm_projector.2.bias: expected shape \(64,\), found \(65,\)"
  with pytest.raises(ConversionError, match=expected) as by_converter:
    import_checkpoint(src, str(tmp_path / "out"), preset="tiny", progress=False)
  with pytest.raises(CheckpointError) as direct:
    kangaroo_jax.from_pretrained(src, preset="tiny", warn=lambda s: None)
  assert str(direct.value) == f"{src}: {by_converter.value}"


def test_non_finite_tensors_are_reported_as_the_converter_reports_them(released, tmp_path, capsys):
  """A NaN in the source and a float32 value that overflows bfloat16: the same report, and one
  `<key>: <what>` warning line each, as the converter's CLI prints them."""
  src = _copy(released, tmp_path / "src")

  def spoil(t):
    t["model.layers.0.self_attn.q_proj.weight"][3, 5] = np.nan
    t["mm_projector.0.bias"][1] = 3.4e38  # finite in float32, beyond bfloat16's largest

  _rewrite(src, spoil)
  result = import_checkpoint(src, str(tmp_path / "out"), preset="tiny", dtype="bfloat16", progress=False)
  assert sorted(result.nonfinite) == ["mm_projector.0.bias", "model.layers.0.self_attn.q_proj.weight"]
  lines = []
  model, _, report = hf_direct.load_released(src, param_dtype="bfloat16", preset="tiny", warn=lines.append)
  assert report.nonfinite == result.nonfinite
  assert [f"{k}: {v}" for k, v in sorted(result.nonfinite.items())] == lines[-2:]
  assert "1 NaN in the source" in report.nonfinite["model.layers.0.self_attn.q_proj.weight"]
  assert "overflows to Inf in bfloat16" in report.nonfinite["mm_projector.0.bias"]
  # The default `warn`: Python warnings, one line each.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    kangaroo_jax.from_pretrained(src, param_dtype="bfloat16", preset="tiny")
  assert [str(w.message) for w in caught if w.category is hf_direct.UnverifiedSettingWarning] == lines


def test_unreadable_weights_are_one_line_errors(released, tmp_path):
  src = _copy(released, tmp_path / "src")
  shard = os.path.join(src, "model-00002-of-00002.safetensors")
  data = open(shard, "rb").read()
  open(shard, "wb").write(data[:-1000])
  with pytest.raises(CheckpointError, match=r"truncated file: tensor") as e:
    kangaroo_jax.from_pretrained(src, preset="tiny")
  assert str(e.value).startswith(f"{src}: ") and "\n" not in str(e.value)
  os.remove(shard)
  with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002.safetensors listed in the index is missing"):
    kangaroo_jax.from_pretrained(src, preset="tiny")


def test_host_memory_stays_per_tensor(tmp_path):
  """numpy's allocations at the peak of a direct load (tracemalloc: the host copies the loader makes; the
  source is memory-mapped and the devices' buffers are XLA's) stay within a few released tensors, far
  below the parameters' total; a full host copy of the stacked MLP kernels alone would exceed it."""
  cfg = CFG.replace(
      llm=dataclasses.replace(
          CFG.llm, hidden_size=128, intermediate_size=1024, num_layers=6, num_heads=4, num_kv_heads=2, head_dim=32
      )
  )
  info = write_checkpoint(str(tmp_path / "src"), cfg, shards=2)
  total = info["bytes"]
  largest = info["largest_tensor_bytes"]
  mesh = _mesh(2, 4)
  hf_direct.load_released(str(tmp_path / "src"), mesh, preset="tiny", warn=lambda s: None)  # compiles
  tracemalloc.start()
  try:
    model, _, _ = hf_direct.load_released(str(tmp_path / "src"), mesh, preset="tiny", warn=lambda s: None)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  stacked_mlp = 3 * cfg.llm.num_layers * cfg.llm.hidden_size * cfg.llm.intermediate_size * 4
  print(
      f"direct load: peak numpy host memory {peak / 1e6:.2f} MB; parameters {total / 1e6:.2f} MB, largest "
      f"tensor {largest / 1e6:.2f} MB, stacked MLP kernels {stacked_mlp / 1e6:.2f} MB"
  )
  assert peak <= 2 * largest + (1 << 20)
  assert peak < stacked_mlp / 4 and peak < total / 5
  assert model.llm.model.layers.mlp.up_proj.kernel[...].shape == (6, 128, 1024)


def test_a_converted_folder_still_loads_from_orbax(converted, monkeypatch):
  """The Orbax folder (fast repeated loads) does not go through the direct loader."""
  monkeypatch.setattr(hf_direct, "load_released", lambda *a, **k: pytest.fail("direct load of a converted folder"))
  model, tokenizer = kangaroo_jax.from_pretrained(converted["float32"])
  assert model.run.param_dtype == "float32" and tokenizer is not None


def test_load_config_of_a_released_folder_is_what_from_pretrained_loads(released, converted):
  """The CLIs check the folder with `load_config` and pass its config back (kangaroo_jax/inference/loading.py):
  a released folder gets the config the direct load uses, the warnings still name where each setting came
  from, and the ambient mesh of `jax.set_mesh` is used as for a converted folder."""
  cfg = load_config(released, preset="tiny")
  assert cfg == kangaroo_jax.from_pretrained(converted["float32"])[0].cfg
  said = []
  mesh = _mesh(2, 4)
  with jax.set_mesh(mesh):
    model, _ = kangaroo_jax.from_pretrained(released, config=cfg, preset="tiny", warn=said.append)
  assert model.cfg == cfg
  assert said[0].startswith("vision.pt_hw_seq_len = 2 (EVA02-CLIP-L-14-448.json vision_cfg.pt_hw_seq_len)")
  emb = model.llm.model.embed_tokens.embedding[...]
  assert emb.sharding.mesh.shape == mesh.shape and not emb.sharding.is_fully_replicated
  broken = _copy(released, released + "_broken")
  json.dump({}, open(os.path.join(broken, "config.json"), "w"))
  with pytest.raises(CheckpointError, match=r"config.json: required field 'hidden_size' is missing"):
    load_config(broken)
