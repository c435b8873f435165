"""The trainer never destroys a run and answers every bad input with one line (issue 14).

Damaged checkpoints are skipped (moved aside, never deleted), bad flags / config values / meshes /
workdirs exit 2 with one `error:` line, SIGTERM during startup or the export exits 0 leaving the run
resumable. Faults that cannot be made for real here (a read-only or full disk) are injected.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.stage2_video_pretrain import get_config
from kangaroo_jax.config import ConfigError
from train.checkpoint import Checkpointer, CheckpointMismatchError
from train.coordination import Interrupted
from train.loop import NonFiniteError, WorkdirError, train
from train.synthetic import SyntheticIterator
from tests.train_helpers import with_changes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/stage2_video_pretrain.py") + ":mode=cpu,steps=4"
NOISE = ("Traceback", "Event loop is closed", "never retrieved")


def _env() -> dict:
  return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")


def _cli(*args, script: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
  """`python -m train ARGS`, or ARGS passed to `script` (which patches something, then runs train)."""
  head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "train"]
  return subprocess.run(head + list(args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _error_line(proc: subprocess.CompletedProcess) -> str:
  """The one `error:` line of a failed run; nothing else of ours on stderr, and no traceback anywhere."""
  ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert len(ours) == 1, proc.stderr[-3000:]
  for noise in NOISE:
    assert noise not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
  return ours[0]


# Runs `python -m train` after the patch above it; sys.argv[1:] are train's flags.
_RUN_TRAIN = """
import runpy, sys
sys.argv = ["train"] + sys.argv[1:]
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""


def _stage2(**changes):
  """The `CONFIG` stage, in process: 4 steps, a checkpoint every step, no export unless changed."""
  c = get_config("mode=cpu,steps=4")
  c.ckpt.every = 1
  c.export = False
  return with_changes(c, changes)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A run stopped after 3 of 4 steps, with checkpoints 1, 2, 3: (workdir, restore target, config record)."""
  workdir = str(tmp_path_factory.mktemp("base") / "run")
  cfg = _stage2()
  result = train(cfg, workdir, stop_after=3)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), result.state)
  return workdir, target, dict(cfg.raw, model_config=cfg.model.to_dict())


@pytest.fixture
def run(base, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(base[0], workdir)
  return workdir


def _listing(directory: str) -> dict[str, int]:
  """Relative path -> size of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      out[os.path.relpath(os.path.join(root, f), directory)] = os.path.getsize(os.path.join(root, f))
  return out


def _damage(step_dir: str, kind: str) -> None:
  state = os.path.join(step_dir, "state")
  if kind == "truncated data file":  # the largest array chunk file loses its second half
    files = [os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs if os.sep + "d" + os.sep in r + os.sep]
    biggest = max(files, key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)
  elif kind == "damaged manifest.ocdbt":
    with open(os.path.join(state, "manifest.ocdbt"), "wb") as f:
      f.write(b"not a manifest")
  elif kind == "damaged _METADATA":
    with open(os.path.join(state, "_METADATA"), "w") as f:
      f.write('{"tree_metadata": ')
  elif kind == "missing iter":
    shutil.rmtree(os.path.join(step_dir, "iter"))
  else:
    raise ValueError(kind)


class _Iterator:

  def __init__(self):
    self.state = None

  def set_state(self, state):
    self.state = state


@pytest.mark.parametrize(
    "kind, cause",
    [
        ("truncated data file", "is not valid for value of size"),
        ("damaged manifest.ocdbt", "manifest"),
        ("damaged _METADATA", "state metadata: JSONDecodeError"),
        ("missing iter", "iter is missing"),
    ],
)
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_restored(base, run, kind, cause):
  _, target, record = base
  directory = os.path.join(run, "checkpoints")
  _damage(os.path.join(directory, "3"), kind)
  damaged = _listing(os.path.join(directory, "3"))
  lines, it = [], _Iterator()
  ck = Checkpointer(directory, _stage2().ckpt)
  restored = ck.restore_latest(target, it, record, log=lines.append)
  ck.close()
  assert restored.step == 2 and int(restored.state["step"]) == 2
  with open(os.path.join(directory, "2", "iter", "process_0-of-1.json")) as f:
    assert it.state == json.load(f)  # the iterator follows the checkpoint that was restored, not the damaged one
  warning = [ln for ln in lines if ln.startswith(f"WARNING: checkpoint {directory}/3 cannot be restored")]
  assert len(warning) == 1 and cause in warning[0], lines
  # Moved aside whole (never deleted), and out of the way of the next save of step 3.
  assert sorted(os.listdir(directory)) == ["1", "2", "3.corrupt"]
  assert _listing(os.path.join(directory, "3.corrupt")) == damaged
  assert restored.skipped == [(3, warning[0].split("trying an older one: ", 1)[1], f"{directory}/3.corrupt")]


def test_training_resumes_past_a_damaged_checkpoint(run):
  # Before: every restart failed (exit 1) on the damaged newest checkpoint, although 2 was intact.
  _damage(os.path.join(run, "checkpoints", "3"), "truncated data file")
  proc = _cli("--config", CONFIG, "--workdir", run, "--config.export=False", "--config.ckpt.every=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout + proc.stderr
  assert f"resumed from {run}/checkpoints/2 (unreadable, moved aside: 3 -> {run}/checkpoints/3.corrupt)" in out
  assert "step 3/4" in out and "step 4/4" in out and "done at step 4" in out
  assert "Event loop is closed" not in out and "Traceback" not in out
  assert {"3", "3.corrupt", "4"} <= set(os.listdir(os.path.join(run, "checkpoints")))


def test_no_restorable_checkpoint_is_one_line_with_the_cause_and_moves_nothing(run):
  directory = os.path.join(run, "checkpoints")
  for step in ("1", "2", "3"):
    _damage(os.path.join(directory, step), "truncated data file")
  before = _listing(directory)
  proc = _cli("--config", CONFIG, "--workdir", run, "--config.export=False")
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = _error_line(proc)  # before: a traceback followed by ~40 "Event loop is closed" tracebacks
  assert line.startswith(f"error: no checkpoint in {directory} can be restored (step 3: ValueError: ")
  assert "is not valid for value of size" in line and "step 2: " in line and "step 1: " in line
  assert _listing(directory) == before


def test_another_stage_or_model_shape_is_refused_naming_the_fields(base, run):
  before = _listing(run)
  proc = _cli(
      "--config", os.path.join(ROOT, "configs/stage1_image_pretrain.py") + ":mode=cpu,steps=4", "--workdir", run
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = _error_line(proc)
  assert line.startswith(f"error: {run}/checkpoints/3 was written by another configuration (")
  assert "stage: 'video_pretrain' in the checkpoint, 'image_pretrain' now" in line
  assert "optim.trainable: " in line and "state arrays differ" in line

  hidden = base[2]["model_config"]["llm"]["hidden_size"]
  with pytest.raises(
      CheckpointMismatchError, match=f"model.llm.hidden_size: {hidden} in the checkpoint, " f"{2 * hidden} now"
  ):
    train(_stage2(**{"model.overrides": {"llm": {"hidden_size": 2 * hidden}}}), run)
  assert _listing(run) == before


@pytest.mark.parametrize(
    "field",
    [
        "optim.lr",
        "optim.b1",
        "optim.b2",
        "optim.eps",
        "optim.weight_decay",
        "optim.clip_norm",
        "optim.min_lr_ratio",
        "data.max_skip_rate",
        "peak_flops_per_device",
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_numbers_are_rejected_in_every_float_field(field, value):
  with pytest.raises(ConfigError, match=rf"^{field}: expected a finite number, got {value}$"):
    _stage2(**{field: value})


def test_nonfinite_numbers_are_rejected_in_lr_scales_and_model_overrides():
  with pytest.raises(ConfigError, match=r"optim.lr_scales\[0\]: expected \(regex, finite factor"):
    _stage2(**{"optim.lr_scales": (("vision_tower/.*", float("nan")),)})
  with pytest.raises(ConfigError, match=r"model.overrides.llm.rms_norm_eps: expected a finite number, got inf"):
    _stage2(**{"model.overrides": {"llm": {"rms_norm_eps": float("inf")}}})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.optim.lr=nan"], "error: optim.lr: expected a finite number, got nan"),
        (["--config.x=1"], "error: --config.x: unknown field x; known: ckpt, data, export, init_from, log_every, "),
        (["--config.optim.lr_max=1"], "error: --config.optim.lr_max: unknown field optim.lr_max; known: b1, b2, "),
        (
            ["--config.mesh.fsdp=3"],
            "error: mesh {'data': 1, 'fsdp': 3, 'context': 1, 'tensor': 1} needs 3 devices per "
            "slice, but 8 are available",
        ),
        (["--config.mesh.tensor=16"], "error: 8 devices per slice are not divisible by the fixed axes"),
    ],
    ids=["nan_lr", "unknown_top", "unknown_nested", "mesh_size", "mesh_divisor"],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
  proc = _cli("--config", CONFIG, "--workdir", str(tmp_path / "w"), *args)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert _error_line(proc).startswith(message)
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_help_exits_0():
  proc = _cli("--help")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--workdir" in proc.stdout and "Exit status" in proc.stdout


_READ_ONLY = """
import builtins, errno, os, sys
real_open = builtins.open
workdir = os.path.abspath(sys.argv[sys.argv.index("--workdir") + 1])
def read_only_open(file, mode="r", *args, **kwargs):
  if isinstance(file, str) and os.path.abspath(file).startswith(workdir) and set(mode) & set("wax+"):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), file)
  return real_open(file, mode, *args, **kwargs)
builtins.open = read_only_open
""" + _RUN_TRAIN


def test_read_only_workdir_exits_2_with_one_line(tmp_path):
  proc = _cli("--config", CONFIG, "--workdir", str(tmp_path / "w"), script=_READ_ONLY)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert _error_line(proc).startswith(f"error: workdir {tmp_path / 'w'}: cannot write there (Read-only file system")


def test_full_disk_during_a_save_is_a_workdir_error_and_keeps_the_previous_checkpoints(run, monkeypatch):
  from train.checkpoint import IteratorHandler

  def no_space(self, directory, args):
    raise OSError(28, os.strerror(28), str(directory))

  monkeypatch.setattr(IteratorHandler, "save", no_space)
  with pytest.raises(WorkdirError, match=rf"^workdir {run}: a write failed \(No space left on device: .*checkpoints"):
    train(_stage2(), run)
  monkeypatch.undo()
  ck = Checkpointer(os.path.join(run, "checkpoints"), _stage2().ckpt)
  assert ck.all_steps() == [1, 2, 3] and int(ck.restore_state(3)["step"]) == 3
  ck.close()


class _Poisoned(SyntheticIterator):
  """NaN in every loss mask: every step is non-finite."""

  def batch(self, step):
    b = super().batch(step)
    b["loss_mask"] = b["loss_mask"] * np.float32("nan")
    return b


def test_nonfinite_error_says_when_no_checkpoint_was_saved_yet(tmp_path):
  cfg = _stage2(**{"ckpt.every": 100, "optim.max_nonfinite": 2})
  it = _Poisoned(
      cfg.model,
      global_batch=cfg.data.batch_size,
      seq_len=cfg.data.seq_len,
      frame_size=cfg.data.frame_size,
      max_frames=cfg.data.max_frames,
  )
  with pytest.raises(
      NonFiniteError,
      match=r"2 non-finite steps in a row .*; no checkpoint was saved yet " r"\(this run started from random init\)$",
  ):
    train(cfg, str(tmp_path / "w"), iterator=it)


def _signal_self(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGTERM)  # the handler runs (and raises) as soon as this returns


def test_sigterm_during_restore_changes_nothing(run, monkeypatch):
  before = _listing(run)
  real = Checkpointer._verified

  def verified_then_sigterm(self, *args):
    _signal_self()
    return real(self, *args)

  monkeypatch.setattr(Checkpointer, "_verified", verified_then_sigterm)
  with pytest.raises(Interrupted, match="SIGTERM during startup: stopped before training; nothing in"):
    train(_stage2(), run)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # train() put the previous handler back
  assert _listing(run) == before  # the checkpoint it was reading is not taken for a damaged one


# A restore that takes a while (as an 8B one does), so that the signal surely lands inside it.
_SLOW_RESTORE = """
import time
from train.checkpoint import Checkpointer
real = Checkpointer._verified
def slow(self, *args):
  print("READING", flush=True)
  time.sleep(60)
  return real(self, *args)
Checkpointer._verified = slow
""" + _RUN_TRAIN


def test_sigterm_while_restoring_exits_0_from_the_command_line(run):
  before = _listing(os.path.join(run, "checkpoints"))
  proc = subprocess.Popen(
      [sys.executable, "-c", _SLOW_RESTORE, "--config", CONFIG, "--workdir", run],
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith("READING"):
      proc.send_signal(signal.SIGTERM)
      break
  out = "".join(seen) + proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "SIGTERM during startup: stopped before training" in out and "Traceback" not in out
  assert _listing(os.path.join(run, "checkpoints")) == before


_SIGTERM_AT_IMPORT = """
import os, signal
from train.coordination import STOP
STOP.install()
os.kill(os.getpid(), signal.SIGTERM)  # as if it came while the slow imports were running
""" + _RUN_TRAIN


def test_sigterm_before_startup_exits_0(tmp_path):
  proc = _cli("--config", CONFIG, "--workdir", str(tmp_path / "w"), script=_SIGTERM_AT_IMPORT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "SIGTERM during startup: stopped before training; nothing was changed" in proc.stdout
  assert not os.path.exists(tmp_path / "w")


def test_sigterm_during_the_export_keeps_the_previous_export_and_resumes(run, monkeypatch):
  import train.export as export

  previous = os.path.join(run, "export")
  os.makedirs(previous)
  with open(os.path.join(previous, "from_an_earlier_run"), "w") as f:
    f.write("complete")
  real = export.save_pretrained

  def half_then_sigterm(model, tokenizer, out_dir):
    real(model, tokenizer, out_dir)
    os.remove(os.path.join(out_dir, "kangaroo_config.json"))  # as if it were still being written
    _signal_self()

  monkeypatch.setattr(export, "save_pretrained", half_then_sigterm)
  with pytest.raises(Interrupted, match="SIGTERM during the export: training is done and checkpoint 4 is saved"):
    train(_stage2(export=True), run)
  assert os.listdir(previous) == ["from_an_earlier_run"]  # never a half-written export/
  assert os.path.isdir(os.path.join(run, "export.tmp-4"))
  monkeypatch.undo()

  result = train(_stage2(export=True), run)  # the rerun only writes the export
  assert result.status == "done" and result.history == []
  assert sorted(os.listdir(previous)) == ["kangaroo_config.json", "state"]
  assert sorted(p for p in os.listdir(run) if p.startswith("export")) == ["export"]
  with open(os.path.join(run, "summary.json")) as f:
    assert json.load(f)["steps_this_run"] == 1  # the summary of the run that trained step 4 is kept
