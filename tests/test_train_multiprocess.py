"""Two CPU processes (jax.distributed on localhost) train, checkpoint and resume together."""

import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_pair(workdir: str, extra: list[str]) -> list[str]:
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")  # 2 processes x 2 devices
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-m", "train", "--config",
           os.path.join(ROOT, "configs/stage2_video_pretrain.py") + ":mode=cpu,steps=4", "--workdir", workdir,
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}",
           "--config.ckpt.every=2"] + extra
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=400)
    outs.append(out)
    assert p.returncode == 0, out[-4000:]
  return outs


@pytest.mark.skipif(os.environ.get("KANGAROO_RUN_MULTIPROCESS_TRAIN") != "1",
                    reason="the two CPU processes can deadlock in cross-process gloo collectives when the machine "
                           "is loaded (open in issue 6); set KANGAROO_RUN_MULTIPROCESS_TRAIN=1 to run it")
def test_two_processes_train_checkpoint_and_resume(tmp_path):
  workdir = str(tmp_path / "w")
  first = _run_pair(workdir, ["--stop_after=2"])
  assert "2 process(es), 4 device(s)" in first[0]
  assert re.search(r"step 2/4 \| loss [0-9.]+", first[0]), first[0][-2000:]
  steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert steps == ["2"]
  iter_files = sorted(f for f in os.listdir(os.path.join(workdir, "checkpoints", "2", "iter")) if f.endswith(".json"))
  assert iter_files == ["process_0-of-2.json", "process_1-of-2.json"]
  second = _run_pair(workdir, [])
  assert f"resumed from {workdir}/checkpoints/2" in second[0]
  assert re.search(r"step 4/4 \| loss [0-9.]+", second[0]), second[0][-2000:]
  assert os.path.exists(os.path.join(workdir, "export", "kangaroo_config.json"))
