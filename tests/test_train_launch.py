"""train/launch_tpu_vm.sh: argument checks and the dry run (no gcloud here; the dry run must not need it).

The remote command of the dry run is executed by a local bash against a stand-in `.venv/bin/python`, so
the test sees the exact argv and environment every TPU host would get.
"""

import os
import shlex
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train", "launch_tpu_vm.sh")
CONFIG = "configs/stage2_video_pretrain.py:prev=gs://bucket/stage 1"
BASE = ["--name", "pod-1", "--zone", "us-central2-b", "--config", CONFIG, "--workdir", "gs://bucket/run 2"]


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory):
  """A PATH with just the tools the script needs: never gcloud, even where it is installed."""
  d = tmp_path_factory.mktemp("bin")
  for tool in ("sed", "dirname"):
    os.symlink(shutil.which(tool), d / tool)
  return str(d)


@pytest.fixture
def launch(bin_dir):
  def run(*args, env=None):
    e = {"PATH": bin_dir, "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run([shutil.which("bash"), SCRIPT, *args], capture_output=True, text=True, env=e, timeout=60)

  return run


def _remote(line: str) -> str:
  argv = shlex.split(line)
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
  assert argv[5] == "pod-1" and argv[6:10] == ["--zone", "us-central2-b", "--worker=all", argv[9]]
  (cmd,) = [a[len("--command=") :] for a in argv if a.startswith("--command=")]
  return cmd


def test_dry_run_prints_setup_and_the_same_training_command_for_every_host(launch, tmp_path):
  repo = tmp_path / "repo on host"
  p = launch(
      *BASE,
      "--repo-dir",
      str(repo),
      "--setup",
      "--env",
      "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b='x'",
      "--dry-run",
      "--",
      "--config.optim.lr=1e-4",
      "--stop_after=5",
  )
  assert p.returncode == 0, p.stderr
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 2 and all(ln.startswith("gcloud compute tpus tpu-vm ssh pod-1 ") for ln in lines), lines
  setup, training = map(_remote, lines)
  assert "-m venv .venv" in setup and "pip install -q -e . 'jax[tpu]'" in setup

  # Run the host command here, with a python that reports its argv and environment.
  fake = repo / ".venv" / "bin" / "python"
  fake.parent.mkdir(parents=True)
  fake.write_text('#!/bin/bash\nprintf "%s\\n" "$PWD" "$LIBTPU_INIT_ARGS" "$@"\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  out = subprocess.run(["bash", "-c", training], capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      str(repo),
      "--xla_a=1 --xla_b='x'",
      "-m",
      "train",
      "--config",
      CONFIG,
      "--workdir",
      "gs://bucket/run 2",
      "--distributed=on",
      "--config.optim.lr=1e-4",
      "--stop_after=5",
  ]


def test_sync_detach_project_and_defaults_from_the_environment(launch):
  p = launch(
      "--config",
      "configs/stage1_image_pretrain.py",
      "--workdir",
      "/mnt/shared/run",
      "--project",
      "my-proj",
      "--sync",
      "--detach",
      "--dry-run",
      env={"TPU_NAME": "pod-1", "TPU_ZONE": "us-central2-b"},
  )
  assert p.returncode == 0, p.stderr
  assert "must be one filesystem mounted on every host" in p.stderr  # a local path is allowed, with a note
  lines = p.stdout.strip().splitlines()
  assert lines[0].startswith(f"git -C {ROOT} archive --format=tar.gz -o ") and lines[0].endswith(" HEAD")
  assert lines[1].startswith("gcloud compute tpus tpu-vm scp ") and "pod-1:/tmp/kangaroo-jax.tar.gz" in lines[1]
  assert all("--project my-proj" in ln for ln in lines[1:])
  unpack, training = _remote(lines[2]), _remote(lines[3])
  assert unpack.startswith('mkdir -p "$HOME"/kangaroo-jax && tar -xzf /tmp/kangaroo-jax.tar.gz')
  assert training.startswith('cd "$HOME"/kangaroo-jax && mkdir -p logs && nohup .venv/bin/python -m train ')
  assert training.endswith("> logs/train-$(hostname).log 2>&1 < /dev/null &")


@pytest.mark.parametrize(
    "args, message",
    [
        (BASE[2:], "--name is required"),
        (BASE[:2] + BASE[4:], "--zone is required"),
        (BASE[:6], "--workdir is required"),
        (BASE[:4] + BASE[6:], "--config is required"),
        (["--name", "Pod_1"] + BASE[2:], "is not a TPU name"),
        (BASE[:2] + ["--zone", "uscentral"] + BASE[4:], "does not look like a zone"),
        (BASE[:4] + ["--config", "configs/nope.py"] + BASE[6:], "'configs/nope.py' not found"),
        (BASE[:6] + ["--workdir", "runs/x"], "must be gs://... or an absolute shared path"),
        (BASE + ["--env", "1X=2"], "is not KEY=VALUE"),
        (BASE + ["--zone"], "--zone needs a value"),
        (BASE + ["--name=pod-2"], "option and value as two words"),
        (BASE + ["--frobnicate"], "unknown argument '--frobnicate'"),
        (BASE + ["--", "--distributed=off"], "is set by this script"),
        (BASE + ["--", "--workdir=/x"], "is set by this script"),
    ],
)
def test_bad_arguments_are_usage_errors(launch, args, message):
  p = launch(*args, "--dry-run")
  assert p.returncode == 2 and message in p.stderr and "--help" in p.stderr, (p.returncode, p.stderr)
  assert p.stdout == ""


def test_help_and_missing_gcloud(launch):
  p = launch("--help")
  assert p.returncode == 0 and "--dry-run" in p.stdout and "Usage" not in p.stderr
  assert p.stdout.lstrip().startswith("Runs `python -m train` on every host")
  p = launch(*BASE)  # not a dry run, and gcloud is not on PATH
  assert p.returncode == 127 and "gcloud not found" in p.stderr
