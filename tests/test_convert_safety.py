"""tools.convert_weights never destroys what it did not write, and every bad input ends in one line (issue 14).

Each test reproduces a failure of the earlier converter: `import SRC SRC --overwrite` deleted the
release; a Ctrl-C between the two renames of `--overwrite` left neither checkpoint at DST; NaN/Inf
went through unreported; a repeated key in a safetensors header was silently resolved; bad config
fields, a non-dict `__metadata__`, a damaged converted checkpoint, a read-only folder or a full
disk ended in a traceback. Checkpoints are the tiny preset's, from tools/convert_weights/synthetic.py.
"""

from __future__ import annotations

import builtins
import errno
import glob
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from kangaroo_jax.config import preset
from kangaroo_jax.pretrained import CONFIG_FILE, REPORT_FILE, stored_dtype
from tools.convert_weights import convert, output_dir, safetensors_io
from tools.convert_weights.__main__ import main as cli
from tools.convert_weights.convert import export_checkpoint, import_checkpoint
from tools.convert_weights.finite import all_finite, describe
from tools.convert_weights.safetensors_io import SafetensorsError
from tools.convert_weights.synthetic import write_checkpoint

CFG = preset("tiny")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """{'src': a tiny released-layout folder (float32 model.safetensors + config.json), 'out': its import}."""
  root = tmp_path_factory.mktemp("safety")
  write_checkpoint(str(root / "src"), CFG)
  import_checkpoint(str(root / "src"), str(root / "out"), preset="tiny", progress=False)
  return {"src": str(root / "src"), "out": str(root / "out")}


def _copy(folder: str, to) -> str:
  shutil.copytree(folder, to)
  return str(to)


def _digest(folder: str) -> dict[str, str]:
  """{relative path: sha256} of every file under `folder`."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def _hidden(dst) -> list[str]:
  dst = str(dst)
  return sorted(glob.glob(os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.*")))


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  return err


def _import(src, dst, *extra) -> int:
  return cli(["import", str(src), str(dst), "--preset", "tiny", "--quiet", *extra])


def _rewrite(path: str, change) -> None:
  """Rewrites a safetensors file with `change({key: array})` applied (any key, shape or value)."""
  infos, metadata = safetensors_io.read_header(path)
  tensors = {k: safetensors_io.read_tensor(i).copy() for k, i in infos.items()}
  change(tensors)
  items = sorted(tensors.items())
  safetensors_io.write_file(path, [(k, v.shape, v.dtype) for k, v in items], iter(items), metadata)


def _raw_safetensors(path, header: bytes, data: bytes) -> str:
  header += b" " * (-len(header) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + data)
  return str(path)


# ---- item 1: DST is never SRC, around it or inside it; --overwrite replaces only the tool's own output


@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink"])
def test_import_refuses_an_output_that_is_holds_or_lies_in_the_source(base, tmp_path, capsys, where):
  src = _copy(base["src"], tmp_path / "release")
  (tmp_path / "unrelated.txt").write_text("a file of the user's, beside the release")
  os.symlink(src, tmp_path / "link")
  dst = {
      "same": src,
      "parent": str(tmp_path),
      "inside": os.path.join(src, "converted"),
      "symlink": str(tmp_path / "link"),
  }[where]
  before = _digest(str(tmp_path))
  assert _import(src, dst, "--overwrite") == 2
  err = _one_error_line(capsys)
  assert {
      "same": "would replace the input",
      "parent": "contains the input",
      "inside": "is inside the input",
      "symlink": "would replace the input",
  }[where] in err
  assert _digest(str(tmp_path)) == before and sorted(os.listdir(tmp_path)) == ["link", "release", "unrelated.txt"]


def test_export_refuses_to_replace_its_own_input(base, tmp_path, capsys):
  ckpt = _copy(base["out"], tmp_path / "ckpt")
  before = _digest(ckpt)
  assert cli(["export", ckpt, ckpt, "--overwrite", "--quiet"]) == 2
  assert "would replace the input" in _one_error_line(capsys)
  assert cli(["export", ckpt, str(tmp_path), "--overwrite", "--quiet"]) == 2
  assert "contains the input" in _one_error_line(capsys)
  assert _digest(ckpt) == before


def test_overwrite_replaces_only_an_earlier_output_of_the_tool(base, tmp_path, capsys):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  (mine / "state").mkdir()
  for command in (["import", base["src"], str(mine), "--preset", "tiny"], ["export", base["out"], str(mine)]):
    assert cli([*command, "--overwrite", "--quiet"]) == 2
    err = _one_error_line(capsys)
    assert f"{mine}: not replaced: it holds notes.txt, which this tool does not write" in err
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "state").is_dir()
  afile = tmp_path / "afile"
  afile.write_text("x")
  assert _import(base["src"], afile, "--overwrite") == 2
  assert "exists and is not a folder" in _one_error_line(capsys) and afile.read_text() == "x"
  # An export result, then an import result, then an empty folder: all replaced.
  exported = tmp_path / "exported"
  assert cli(["export", base["out"], str(exported), "--quiet"]) == 0
  assert _import(base["src"], exported, "--overwrite") == 0
  assert (exported / "state").is_dir() and not (exported / "model.safetensors").exists()
  assert _import(base["src"], exported, "--overwrite", "--dtype", "float32") == 0
  assert stored_dtype(str(exported / "state")) == "float32"  # kangaroo_config.json holds shapes only
  (tmp_path / "empty").mkdir()
  assert _import(base["src"], tmp_path / "empty", "--overwrite") == 0
  assert not _hidden(exported) and not _hidden(tmp_path / "empty")


# ---- item 2: the swap of --overwrite is recoverable


def test_interrupt_between_the_swap_renames_restores_the_previous_output(base, tmp_path, monkeypatch, capsys):
  dst = _copy(base["out"], tmp_path / "out")  # bfloat16
  before = _digest(dst)
  real = os.rename

  def ctrl_c_before_the_second(a, b):
    if os.path.realpath(b) == os.path.realpath(dst) and ".partial-" in os.path.basename(a):
      raise KeyboardInterrupt  # as if Ctrl-C arrived after DST was moved aside
    real(a, b)

  monkeypatch.setattr(os, "rename", ctrl_c_before_the_second)
  try:
    rc = _import(base["src"], dst, "--overwrite", "--dtype", "float32")
  except KeyboardInterrupt:
    rc = "KeyboardInterrupt escaped"
  assert rc == 130 and "interrupted" in capsys.readouterr().err
  assert _digest(dst) == before and not _hidden(dst)


_KILL = """
import os, signal, sys
from tools.convert_weights import convert
from tools.convert_weights.__main__ import main
mode, dst = sys.argv[1], os.path.realpath(sys.argv[2])
real_rename = os.rename

def rename(a, b):
  if mode == "swap" and os.path.realpath(b) == dst and ".partial-" in os.path.basename(a):
    os.kill(os.getpid(), signal.SIGKILL)  # DST has been moved aside; the new output is not in place yet
  real_rename(a, b)

os.rename = rename
if mode == "write":  # killed while the output is being written
  convert._copy_tokenizer_files = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
sys.exit(main(sys.argv[3:]))
"""


def _killed_run(mode: str, src: str, dst: str) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [
          sys.executable,
          "-c",
          _KILL,
          mode,
          dst,
          "import",
          src,
          dst,
          "--preset",
          "tiny",
          "--quiet",
          "--overwrite",
          "--dtype",
          "float32",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_a_swap_killed_between_the_renames_is_restored_by_the_next_run(base, tmp_path, capsys):
  dst = _copy(base["out"], tmp_path / "out")
  before = _digest(dst)
  _killed_run("swap", base["src"], dst)
  assert not os.path.exists(dst)
  assert [os.path.basename(p).split("-")[0] for p in _hidden(dst)] == [".out.old", ".out.partial"]
  # The next run, even one that is refused (no --overwrite), first puts the previous output back.
  assert _import(base["src"], dst) == 2
  err = capsys.readouterr().err
  assert f"note: restored {dst} from {tmp_path}/.out.old-" in err and "removed" in err and "already exists" in err
  assert _digest(dst) == before and not _hidden(dst)
  assert _import(base["src"], dst, "--overwrite", "--dtype", "float32") == 0
  assert stored_dtype(os.path.join(dst, "state")) == "float32" and not _hidden(dst)


def test_a_run_killed_while_writing_leaves_a_partial_the_next_run_removes(base, tmp_path, capsys):
  dst = _copy(base["out"], tmp_path / "out")
  before = _digest(dst)
  _killed_run("write", base["src"], dst)
  assert _digest(dst) == before and len(_hidden(dst)) == 1 and ".out.partial-" in _hidden(dst)[0]
  assert _import(base["src"], dst, "--overwrite") == 0
  assert "note: removed" in capsys.readouterr().err and not _hidden(dst)


def test_leftovers_of_live_or_unknown_runs_are_reported_not_removed(base, tmp_path, capsys):
  dst = tmp_path / "out"
  host = output_dir._host()
  leftovers = [
      tmp_path / ".out.partial-k3j2_x9",  # an older converter's name: no owner in it
      tmp_path / f".out.partial-{host}-1-abc",  # pid 1 is alive
      tmp_path / ".out.old-otherhost.example-12345-abc",
  ]  # another host's
  for path in leftovers:
    path.mkdir()
    (path / "f").write_text("x")
  assert _import(base["src"], dst) == 0
  err = capsys.readouterr().err
  assert err.count("note: left ") == 3 and "process 1 on" in err and "cannot identify" in err
  assert all((p / "f").exists() for p in leftovers) and (dst / "state").is_dir()


# ---- item 7: NaN / Inf and bfloat16 overflow are reported by tensor; repeated header keys refused


def test_all_finite_agrees_with_isfinite():
  rng = np.random.default_rng(0)
  for dtype in (ml_dtypes.bfloat16, np.float16, np.float32, np.float64):
    x = rng.standard_normal(200_003).astype(dtype)
    assert all_finite(x) and all_finite(x[::3]) and all_finite(x[:0])
    for index in (0, 70_000, 200_002):  # in the first, a middle and the last piece
      for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[index] = bad
        assert not all_finite(y) and not all_finite(y.reshape(-1, 1)[:, 0])
  signalling = np.array([1.0, 0.0], np.float32)
  signalling.view(np.uint32)[1] = 0xFF800001  # a NaN with a payload and the sign bit set
  with np.errstate(invalid="ignore"):
    assert not all_finite(signalling) and not all_finite(signalling.astype(ml_dtypes.bfloat16))
  assert all_finite(np.arange(5)) and all_finite(np.array([65504.0], np.float16))


def test_describe_says_what_is_not_finite():
  x = np.array([1.0, np.nan, np.inf, -np.inf, 3.4e38, -3.4e38], np.float32)
  assert describe(x, np.float32) == "1 NaN and 2 Inf in the source"
  assert describe(x, ml_dtypes.bfloat16) == (
      "1 NaN and 2 Inf in the source; 2 finite values overflow to Inf in " "bfloat16 (largest |x| 3.4e+38)"
  )
  assert describe(np.array([1e5], np.float32), np.float16) == (
      "1 finite value overflows to Inf in float16 " "(largest |x| 1e+05)"
  )
  assert describe(np.ones(3, np.float32), ml_dtypes.bfloat16) is None


def test_nonfinite_weights_are_reported_by_tensor_name(base, tmp_path, capsys):
  src = _copy(base["src"], tmp_path / "src")

  def spoil(t):
    t["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan  # stacked and transposed: layer 1's copy
    t["model.norm.weight"][0] = np.inf  # written without a copy when the dtype is kept
    t["mm_projector.2.weight"][1, 1] = 3.4e38  # finite in float32, Inf in bfloat16

  _rewrite(os.path.join(src, "model.safetensors"), spoil)
  result = import_checkpoint(src, str(tmp_path / "bf16"), preset="tiny", progress=False)
  assert result.nonfinite == {
      "mm_projector.2.weight": "1 finite value overflows to Inf in bfloat16 (largest |x| 3.4e+38)",
      "model.layers.1.mlp.down_proj.weight": "1 NaN in the source",
      "model.norm.weight": "1 Inf in the source",
  }
  report = json.load(open(tmp_path / "bf16" / REPORT_FILE))
  assert report["nonfinite"] == result.nonfinite
  assert _import(src, tmp_path / "f32", "--dtype", "float32") == 0  # a warning, not an error
  # Only the tensor warnings: the vision settings no shape checks are warned about too (one line each).
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: model.")]
  assert err == [
      "warning: model.layers.1.mlp.down_proj.weight: 1 NaN in the source",
      "warning: model.norm.weight: 1 Inf in the source",
  ]
  clean = import_checkpoint(base["src"], str(tmp_path / "clean"), preset="tiny", progress=False)
  assert clean.nonfinite == {}


def test_export_reports_values_that_overflow_the_exported_dtype(base, tmp_path):
  src = _copy(base["src"], tmp_path / "src")
  _rewrite(os.path.join(src, "model.safetensors"), lambda t: t["lm_head.weight"].__setitem__((0, 0), 1e5))
  import_checkpoint(src, str(tmp_path / "f32"), preset="tiny", dtype="float32", progress=False)
  result = export_checkpoint(str(tmp_path / "f32"), str(tmp_path / "f16"), dtype="float16", progress=False)
  assert result["nonfinite"] == {"lm_head.weight": "1 finite value overflows to Inf in float16 (largest |x| 1e+05)"}


def test_a_tensor_listed_twice_in_a_header_is_refused(tmp_path, capsys):
  # json.loads (and the safetensors library) would silently read this as one float32 at offset 0.
  entry = b'{"dtype":"F32","shape":[%d],"data_offsets":[0,%d]}'
  path = _raw_safetensors(
      tmp_path / "model.safetensors", b'{"w":' + entry % (2, 8) + b',"w":' + entry % (1, 4) + b"}", b"\0" * 4
  )
  with pytest.raises(SafetensorsError, match=r"model.safetensors: the header lists 'w' twice; the file is corrupt"):
    safetensors_io.read_header(path)
  assert cli(["inspect", str(tmp_path)]) == 2
  assert "lists 'w' twice" in _one_error_line(capsys)
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    f.write('{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}')
  assert cli(["inspect", str(tmp_path)]) == 2
  assert "model.safetensors.index.json: lists 'w' twice" in _one_error_line(capsys)


# ---- item 8: one line, exit 2, naming the file and field, for bad input and unusable output


@pytest.mark.parametrize("metadata", [b'["format"]', b'"pt"', b"7"])
def test_a_non_dict_metadata_is_refused(tmp_path, capsys, metadata):
  path = _raw_safetensors(
      tmp_path / "model.safetensors",
      b'{"__metadata__":' + metadata + b',"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
      b"\0" * 4,
  )
  with pytest.raises(SafetensorsError, match=r"model.safetensors: '__metadata__' is .*; expected an object of strings"):
    safetensors_io.read_header(path)
  assert cli(["inspect", path]) == 2
  assert "'__metadata__'" in _one_error_line(capsys)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("hidden_size", "64", "field 'hidden_size' is \"64\" (a string); expected an integer"),
        ("num_hidden_layers", 2.5, "field 'num_hidden_layers' is 2.5 (a number); expected an integer"),
        ("rms_norm_eps", "1e-5", "field 'rms_norm_eps' is \"1e-5\" (a string); expected a number"),
        ("tie_word_embeddings", "false", "field 'tie_word_embeddings' is \"false\" (a string); expected true or false"),
        (
            "rope_scaling",
            {"rope_type": "llama3", "factor": 8.0},
            "rope_scaling lacks 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'",
        ),
        (
            "rope_scaling",
            {
                "rope_type": "llama3",
                "factor": "8",
                "low_freq_factor": 1,
                "high_freq_factor": 4,
                "original_max_position_embeddings": 8192,
            },
            "config.json rope_scaling: field 'factor' is \"8\" (a string); expected a number",
        ),
        ("rope_scaling", 8, "field 'rope_scaling' is 8 (an integer); expected an object or null"),
        ("vocab_size", None, "required field 'vocab_size' is missing"),
        ("eos_token_id", [2, "</s>"], "field 'eos_token_id' holds \"</s>\"; expected integer token ids"),
    ],
)
def test_config_json_fields_of_the_wrong_type_are_refused(base, tmp_path, capsys, field, value, expected):
  src = _copy(base["src"], tmp_path / "src")
  path = os.path.join(src, "config.json")
  hf = json.load(open(path))
  hf[field] = value
  json.dump(hf, open(path, "w"))
  dst = tmp_path / "out"
  assert _import(src, dst) == 2
  err = _one_error_line(capsys)
  assert err.startswith(f"error: {path}") and expected in err, err
  assert not dst.exists() and not _hidden(dst)


def test_wrong_or_damaged_paths_are_one_line_errors(base, tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  (tmp_path / "notes.txt").write_text("x")
  cases = [
      (["import", str(tmp_path / "missing"), str(tmp_path / "o")], "missing: no such file or folder"),
      (["import", str(tmp_path / "notes.txt"), str(tmp_path / "o")], "expected a .safetensors or .bin file"),
      (["import", str(tmp_path / "empty"), str(tmp_path / "o")], "empty: no checkpoint found"),
      (["inspect", str(tmp_path / "missing")], "no such file or folder"),
      (["export", base["src"], str(tmp_path / "o")], "not a converted checkpoint"),
  ]
  broken_config = _copy(base["out"], tmp_path / "broken_config")
  open(os.path.join(broken_config, CONFIG_FILE), "w").write("{not json")
  cases.append((["export", broken_config, str(tmp_path / "o")], f"broken_config/{CONFIG_FILE}: "))
  wrong_field = _copy(base["out"], tmp_path / "wrong_field")
  cfg = json.load(open(os.path.join(wrong_field, CONFIG_FILE)))
  cfg["llm"]["hidden_size"] = "64"
  json.dump(cfg, open(os.path.join(wrong_field, CONFIG_FILE), "w"))
  cases.append((["export", wrong_field, str(tmp_path / "o")], "hidden_size"))
  broken_state = _copy(base["out"], tmp_path / "broken_state")
  open(os.path.join(broken_state, "state", "_METADATA"), "w").write("[]")
  cases.append((["export", broken_state, str(tmp_path / "o")], "state: not a checkpoint written by `import`"))
  for argv, expected in cases:
    assert cli([*argv, "--quiet"] if argv[0] != "inspect" else argv) == 2, argv
    assert expected in _one_error_line(capsys), argv
  assert not (tmp_path / "o").exists() and not _hidden(tmp_path / "o")


def test_a_read_only_destination_is_a_one_line_error(base, tmp_path, monkeypatch, capsys):
  parent = tmp_path / "ro"
  parent.mkdir()
  real = os.mkdir

  def read_only(path, *args, **kwargs):  # root ignores chmod, so the read-only mount is simulated
    if os.path.dirname(os.path.abspath(path)) == str(parent):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    return real(path, *args, **kwargs)

  monkeypatch.setattr(os, "mkdir", read_only)
  assert _import(base["src"], parent / "out") == 2
  err = _one_error_line(capsys)
  assert f"{parent}/out: cannot write the output: the file system is read-only on {parent}" in err
  assert cli(["export", base["out"], str(parent / "exp"), "--quiet"]) == 2
  assert "read-only" in _one_error_line(capsys)
  assert os.listdir(parent) == []
  # Only a write of the output is reported as one: a source file beside DST that cannot be read is not.
  denied = OSError(errno.EACCES, os.strerror(errno.EACCES), str(parent / "release" / "tokenizer.json"))
  assert output_dir.disk_error(denied, str(parent / "out")) is None
  denied.filename = str(parent / ".out.partial-h-1-x" / "tokenizer.json")
  assert "permission denied" in str(output_dir.disk_error(denied, str(parent / "out")))


def test_a_full_disk_is_named_and_leaves_no_partial_output(base, tmp_path, monkeypatch, capsys):
  dst = _copy(base["out"], tmp_path / "out")  # an earlier output that --overwrite would replace
  before = _digest(dst)

  def full_disk_open(path, mode="r", *args, **kwargs):
    if "w" in mode and os.path.basename(path) == REPORT_FILE:  # after the whole state/ is written
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return builtins.open(path, mode, *args, **kwargs)

  monkeypatch.setattr(convert, "open", full_disk_open, raising=False)
  assert _import(base["src"], dst, "--overwrite") == 2
  err = _one_error_line(capsys)
  assert f"{dst}: cannot write the output: the disk is full (no space left on the device) on {tmp_path}" in err
  assert _digest(dst) == before and not _hidden(dst)
  monkeypatch.undo()

  class FullAfterHeader:  # the header goes in, the first tensor's bytes do not

    def __init__(self, path, mode):
      self.f, self.writes = builtins.open(path, mode), 0

    def write(self, data):
      self.writes += 1
      if self.writes > 1:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return self.f.write(data)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

  monkeypatch.setattr(safetensors_io, "open", FullAfterHeader, raising=False)
  exp = tmp_path / "exp"
  assert cli(["export", base["out"], str(exp), "--quiet"]) == 2
  assert f"{exp}: cannot write the output: the disk is full" in _one_error_line(capsys)
  assert not exp.exists() and not _hidden(exp)


def test_a_really_full_disk(base, tmp_path, capsys):
  """TensorStore's own write error (not an OSError) on a 256 KB tmpfs; needs root to mount it."""
  small = tmp_path / "small"
  small.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
  try:
    assert _import(base["src"], small / "out") == 2
    err = _one_error_line(capsys)
    assert f"{small}/out: cannot write the output: the disk is full" in err
    assert os.listdir(small) == []
    assert cli(["export", base["out"], str(small / "exp"), "--quiet"]) == 2
    assert "the disk is full" in _one_error_line(capsys) and os.listdir(small) == []
  finally:
    subprocess.run(["umount", str(small)], check=False)
