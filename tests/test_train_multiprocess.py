"""Two CPU processes (jax.distributed on localhost) train, checkpoint and resume together, and stop
together when only one of them gets SIGTERM."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 480  # per pair of processes; a pass takes ~1 min idle, ~2 min on a loaded 2-core machine


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_pair(workdir: str, logdir: str, config_arg: str, extra: list[str]) -> tuple[list, list[str]]:
  port = _free_port()
  env = dict(
      os.environ,
      PYTHONPATH=ROOT,
      JAX_PLATFORMS="cpu",
      PYTHONUNBUFFERED="1",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",  # 2 processes x 2 devices
      KANGAROO_BARRIER_TIMEOUT_S="300",
  )  # a stuck peer fails the run with a clear error, inside TIMEOUT_S
  procs, logs = [], []
  os.makedirs(logdir, exist_ok=True)
  for pid in range(2):
    cmd = [
        sys.executable,
        "-m",
        "train",
        "--config",
        os.path.join(ROOT, "configs/stage2_video_pretrain.py") + config_arg,
        "--workdir",
        workdir,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={pid}",
    ] + extra
    # Output to files, not pipes: a process blocked on a full pipe nobody reads would stall its peer too.
    log = os.path.join(logdir, f"process_{pid}.log")
    with open(log, "w") as f:
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    logs.append(log)
  return procs, logs


def _read(path: str) -> str:
  with open(path, errors="replace") as f:
    return f.read()


def _finish_pair(procs: list, logs: list[str], deadline: float) -> list[str]:
  """Waits for both processes; on a timeout or a failure kills both and shows both logs."""
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    hung = [i for i, p in enumerate(procs) if p.poll() is None]
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = [_read(log) for log in logs]
  report = "\n".join(
      f"--- process {i} (rc {p.returncode}) ---\n{out[-3000:]}" for i, (p, out) in enumerate(zip(procs, outs))
  )
  assert not hung, f"process(es) {hung} still running after {TIMEOUT_S}s:\n{report}"
  assert all(p.returncode == 0 for p in procs), report
  return outs


def _run_pair(workdir: str, logdir: str, extra: list[str]) -> list[str]:
  procs, logs = _start_pair(workdir, logdir, ":mode=cpu,steps=4", ["--config.ckpt.every=2"] + extra)
  return _finish_pair(procs, logs, time.time() + TIMEOUT_S)


def test_two_processes_train_checkpoint_and_resume(tmp_path):
  workdir = str(tmp_path / "w")
  first = _run_pair(workdir, str(tmp_path / "logs1"), ["--stop_after=2"])
  assert "2 process(es), 4 device(s)" in first[0]
  assert re.search(r"step 2/4 \| loss [0-9.]+", first[0]), first[0][-2000:]
  steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert steps == ["2"]
  iter_files = sorted(f for f in os.listdir(os.path.join(workdir, "checkpoints", "2", "iter")) if f.endswith(".json"))
  assert iter_files == ["process_0-of-2.json", "process_1-of-2.json"]
  second = _run_pair(workdir, str(tmp_path / "logs2"), [])
  assert f"resumed from {workdir}/checkpoints/2" in second[0]
  assert re.search(r"step 4/4 \| loss [0-9.]+", second[0]), second[0][-2000:]
  assert os.path.exists(os.path.join(workdir, "export", "kangaroo_config.json"))


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  workdir = str(tmp_path / "w")
  procs, logs = _start_pair(
      workdir, str(tmp_path / "logs"), ":mode=cpu,steps=100000", ["--config.ckpt.every=100000", "--config.export=False"]
  )
  deadline = time.time() + TIMEOUT_S
  try:
    while "step 3/" not in _read(logs[0]):
      assert all(p.poll() is None for p in procs) and time.time() < deadline, [_read(f)[-3000:] for f in logs]
      time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)  # only the non-primary process: it must stop process 0 too
  except BaseException:
    for p in procs:
      p.kill()
      p.wait()
    raise
  outs = _finish_pair(procs, logs, deadline)
  saved = re.search(r"SIGTERM: saved step (\d+), exiting", outs[0])
  assert saved, outs[0][-3000:]
  step = int(saved.group(1))
  # Process 0 logs step 3 once step 3 finished, so process 1 had dispatched step 3 before the signal;
  # it publishes the request before its next step and both stop two steps after that.
  assert step >= 5, step
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(step)]
  iter_files = sorted(
      f for f in os.listdir(os.path.join(workdir, "checkpoints", str(step), "iter")) if f.endswith(".json")
  )
  assert iter_files == ["process_0-of-2.json", "process_1-of-2.json"]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["status"] == "preempted" and summary["step"] == step, summary
