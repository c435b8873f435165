"""The converter (and the direct load) take the vision tower's settings from the released folder.

A `vision_config` block in config.json, or the release's EVA02-CLIP-L-14-448.json `vision_cfg`, used
to be ignored in favour of `--preset`, so a fine-tuned checkpoint with another tower width failed with a
shape error. Settings no tensor shape checks (head_width without the RoPE table, pt_hw_seq_len, the
TPE) are named in one warning line each; `export` writes the vision settings back into config.json.
Checkpoints are random, in the released naming (tools/convert_weights/synthetic.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

import kangaroo_jax
from kangaroo_jax.config import preset
from tools.convert_weights.__main__ import main as cli
from tools.convert_weights.assemble import ConversionError
from tools.convert_weights.convert import export_checkpoint, import_checkpoint
from tools.convert_weights.hf_config import VISION_FILE, resolve, vision_to_hf
from tools.convert_weights.orbax_io import StoredParams
from tools.convert_weights.synthetic import write_checkpoint

TINY = preset("tiny")
# A fine-tuned tower the tiny preset does not describe: wider, deeper, another MLP width.
WIDE = TINY.replace(vision=dataclasses.replace(TINY.vision, width=48, num_layers=3, head_width=16, mlp_hidden=128))
# EVA-CLIP's own names and switches, as the release's EVA02-CLIP-L-14-448.json holds them.
WIDE_EVA = {
    "image_size": 56,
    "layers": 3,
    "width": 48,
    "drop_path_rate": 0,
    "head_width": 16,
    "mlp_ratio": 2.6667,
    "patch_size": 14,
    "eva_model_name": "eva-clip-l-14-448",
    "xattn": True,
    "fusedLN": True,
    "rope": True,
    "pt_hw_seq_len": 2,
    "intp_freq": True,
    "naiveswiglu": True,
    "subln": True,
}


def _folder(root, *, extras: bool = True, vision_config: dict | None = None, eva: dict | None = None) -> str:
  """WIDE's tensors in the released naming; the vision settings only where asked for."""
  src = str(root)
  write_checkpoint(src, WIDE, extras=extras)
  if vision_config is not None:
    path = os.path.join(src, "config.json")
    hf = json.load(open(path))
    json.dump({**hf, "vision_config": vision_config}, open(path, "w"))
  if eva is not None:
    json.dump({"embed_dim": 768, "vision_cfg": eva}, open(os.path.join(src, VISION_FILE), "w"))
  return src


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> str:
  return _folder(tmp_path_factory.mktemp("wide") / "src", vision_config=WIDE_EVA)


def test_preset_alone_still_fails_on_another_width(tmp_path):
  """Without the folder's vision settings the preset's width is checked against the shapes (as before)."""
  src = _folder(tmp_path / "src")
  with pytest.raises(ConversionError, match=r"vision.width = 32 but the checkpoint has 48"):
    import_checkpoint(src, str(tmp_path / "out"), preset="tiny", progress=False)


def test_vision_config_with_another_width_imports_and_loads(wide, tmp_path):
  result = import_checkpoint(wide, str(tmp_path / "out"), preset="tiny", dtype="float32", progress=False)
  assert result.config.vision == WIDE.vision  # mlp_ratio 2.6667 floors to 128 as in EVA (int(48 * 2.6667))
  assert result.config_source == (
      "LLM from config.json, vision from config.json vision_config, projector from " "the preset"
  )
  converted, _ = kangaroo_jax.from_pretrained(str(tmp_path / "out"))
  direct, _ = kangaroo_jax.from_pretrained(wide, preset="tiny", warn=lambda s: None)
  assert direct.cfg == converted.cfg and direct.cfg.vision.width == 48
  want = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(converted, nnx.Param))}
  for path, var in nnx.to_flat_state(nnx.state(direct, nnx.Param)):
    assert np.array_equal(np.asarray(var[...]), np.asarray(want[path])), path
  assert direct.vision_tower.blocks.mlp.w1.kernel[...].shape == (3, 48, 128)


def test_release_eva_json_is_read_and_config_json_wins(tmp_path):
  """EVA02-CLIP-L-14-448.json's vision_cfg gives the tower; a vision_config in config.json overrides it
  where both name a setting, and each setting's origin is recorded for the warnings."""
  src = _folder(tmp_path / "src", eva=WIDE_EVA)
  r = resolve(src, TINY, preset_name="tiny")
  assert r.cfg.vision == WIDE.vision and r.notes == []  # every EVA key is known (switches, kernels, names)
  assert r.note == "LLM from config.json, vision from EVA02-CLIP-L-14-448.json, projector from the preset"
  assert r.origin("vision.head_width") == "EVA02-CLIP-L-14-448.json vision_cfg.head_width"
  assert r.origin("projector.tpe") == "preset 'tiny'"
  hf = json.load(open(os.path.join(src, "config.json")))
  json.dump({**hf, "vision_config": {"pt_hw_seq_len": 4}}, open(os.path.join(src, "config.json"), "w"))
  r = resolve(src, TINY, preset_name="tiny")
  assert r.cfg.vision == dataclasses.replace(WIDE.vision, pt_hw_seq_len=4)
  assert r.origin("vision.pt_hw_seq_len") == "config.json vision_config.pt_hw_seq_len"
  assert r.origin("vision.width") == "EVA02-CLIP-L-14-448.json vision_cfg.width"


def _stderr_lines(capsys) -> list[str]:
  return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


def test_settings_no_shape_checks_are_warned_one_line_each(tmp_path, capsys):
  no_rope = _folder(tmp_path / "no_rope", extras=False, vision_config=WIDE_EVA)
  assert cli(["import", no_rope, str(tmp_path / "a"), "--preset", "tiny", "--quiet"]) == 0
  lines = _stderr_lines(capsys)
  assert [line.split(" = ")[0] for line in lines] == [
      "warning: vision.head_width",
      "warning: vision.pt_hw_seq_len",
      "warning: projector.tpe",
  ]
  assert lines[0].startswith(
      "warning: vision.head_width = 16 (config.json vision_config.head_width) is not checked: "
      "only the vision_tower.rope.freqs_cos table shows it and this checkpoint has none"
  )
  assert lines[1].startswith(
      "warning: vision.pt_hw_seq_len = 2 (config.json vision_config.pt_hw_seq_len) is not " "checked"
  )
  assert lines[2].startswith("warning: projector.tpe = 'sinusoidal' (base 10000.0) (preset 'tiny') is not checked")
  report = json.load(open(tmp_path / "a" / "conversion_report.json"))
  assert ["warning: " + line for line in report["unverified"]] == lines
  # The direct load warns with the same lines.
  said = []
  kangaroo_jax.from_pretrained(no_rope, preset="tiny", warn=said.append)
  assert ["warning: " + line for line in said] == lines
  # With EVA's RoPE table in the checkpoint, head_width is checked by its shape: no warning for it.
  with_rope = _folder(tmp_path / "rope", vision_config=WIDE_EVA)
  assert cli(["import", with_rope, str(tmp_path / "b"), "--preset", "tiny", "--quiet"]) == 0
  assert [line.split(" = ")[0] for line in _stderr_lines(capsys)] == [
      "warning: vision.pt_hw_seq_len",
      "warning: projector.tpe",
  ]


def test_wrong_head_width_is_refused_by_the_rope_table_and_only_warned_without_it(tmp_path):
  """Why the warning: without EVA's RoPE table nothing shows a wrong head_width, and it loads (another head
  count: the issue measured logits 1e-3 off)."""
  wrong = {**WIDE_EVA, "head_width": 8}
  with pytest.raises(
      ConversionError, match=r"vision.head_width = 8 but the checkpoint has 16 " r"\(vision_tower.rope.freqs_cos"
  ):
    import_checkpoint(
        _folder(tmp_path / "rope", vision_config=wrong), str(tmp_path / "x"), preset="tiny", progress=False
    )
  said = []
  bad, _ = kangaroo_jax.from_pretrained(
      _folder(tmp_path / "wrong", extras=False, vision_config=wrong), preset="tiny", warn=said.append
  )
  assert bad.cfg.vision.num_heads == 6  # 48 / 8 instead of 48 / 16
  assert said[0].startswith("vision.head_width = 8 (config.json vision_config.head_width) is not checked")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope": False}, "config.json vision_config: rope=false is not supported (the EVA tower here has rope=true)"),
        ({"width": "48"}, "config.json vision_config: field 'width' is \"48\" (a string); expected an integer"),
        (
            {"head_width": 20},
            "describe a tower we cannot build: VisionConfig.head_width: width (48) must be a multiple",
        ),
    ],
)
def test_unusable_vision_settings_are_one_line_errors(tmp_path, capsys, change, message):
  src = _folder(tmp_path / "src", vision_config={**WIDE_EVA, **change})
  assert cli(["import", src, str(tmp_path / "out"), "--preset", "tiny", "--quiet"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and message in err, err
  assert not os.path.exists(tmp_path / "out")


def test_unknown_vision_key_is_ignored_with_a_warning(tmp_path, capsys):
  src = _folder(tmp_path / "src", vision_config={**WIDE_EVA, "use_fancy_pool": True})
  assert cli(["import", src, str(tmp_path / "out"), "--preset", "tiny", "--quiet"]) == 0
  assert _stderr_lines(capsys)[0] == (
      "warning: config.json vision_config.use_fancy_pool = true is not a setting the " "converter knows: ignored"
  )


def test_export_writes_the_vision_config_and_reimport_matches(wide, tmp_path, capsys):
  first = import_checkpoint(wide, str(tmp_path / "a"), preset="tiny", progress=False)
  export_checkpoint(first.dst, str(tmp_path / "exp"), progress=False)
  exported = json.load(open(tmp_path / "exp" / "config.json"))
  assert exported["vision_config"] == vision_to_hf(WIDE.vision)
  # Without kangaroo_config.json only config.json speaks for the tower: the same config, the same bits.
  bare = tmp_path / "bare"
  shutil.copytree(tmp_path / "exp", bare)
  os.remove(bare / "kangaroo_config.json")
  again = import_checkpoint(str(bare), str(tmp_path / "b"), preset="tiny", progress=False)
  assert again.config.vision == WIDE.vision and again.dtype == first.dtype
  a, b = StoredParams(str(tmp_path / "a" / "state")), StoredParams(str(tmp_path / "b" / "state"))
  assert sorted(a.paths) == sorted(b.paths)
  for path in a.paths:
    assert np.array_equal(a.read(path).view(np.uint16), b.read(path).view(np.uint16)), path
  # The export's own kangaroo_config.json was written with these weights: nothing to warn about.
  assert import_checkpoint(str(tmp_path / "exp"), str(tmp_path / "c"), progress=False).unverified == []
  said = []
  direct, _ = kangaroo_jax.from_pretrained(str(tmp_path / "exp"), warn=said.append)
  assert said == [] and direct.cfg.vision == WIDE.vision and direct.run.param_dtype == "bfloat16"
