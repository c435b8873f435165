"""Checkpoints: exact resume, restore onto another mesh shape, a crash during a save, SIGTERM."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from tests.train_helpers import host_params, losses, tiny_config
from train.checkpoint import Checkpointer
from train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


# The resumed half of the run, in a new process: nothing but the files in WORKDIR carries over.
_RESUME = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    import numpy as np
    from tests.train_helpers import host_params, tiny_config
    from train.loop import train
    r = train(tiny_config(), sys.argv[1])
    params = {k.replace("/", "|"): v for k, v in host_params(r.state).items()}
    np.savez(sys.argv[2], status=r.status, steps=[h["step"] for h in r.history],
             losses=np.asarray([h["loss"] for h in r.history], np.float64), **params)
""")


def test_exact_resume_and_restore_onto_another_mesh(tmp_path):
  full = train(tiny_config(), str(tmp_path / "full"))  # 6 steps in one go
  first = train(tiny_config(), str(tmp_path / "split"), stop_after=3)
  assert first.status == "stopped" and first.step == 3
  shutil.copytree(tmp_path / "split", tmp_path / "other_mesh")
  out = str(tmp_path / "second.npz")
  proc = subprocess.run(
      [sys.executable, "-c", _RESUME, str(tmp_path / "split"), out],
      env=_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f"resumed from {tmp_path / 'split' / 'checkpoints'}/3" in proc.stdout
  second = np.load(out)
  assert str(second["status"]) == "done" and second["steps"].tolist() == [4, 5, 6]
  assert losses(first) + second["losses"].tolist() == losses(full)  # bit-identical
  pf = host_params(full.state)
  assert sorted(pf) == sorted(k.replace("|", "/") for k in second.files if "|" in k)
  for k in pf:
    assert np.array_equal(pf[k], second[k.replace("/", "|")]), k

  # The step-3 checkpoint (written on fsdp=8) restored onto fsdp=4 x tensor=2 continues the same run.
  other = train(tiny_config(**{"mesh.fsdp": 4, "mesh.tensor": 2}), str(tmp_path / "other_mesh"))
  np.testing.assert_allclose(losses(other), losses(full)[3:], rtol=1e-5)


_CRASH = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp
    from train.checkpoint import Checkpointer, IteratorHandler
    from train.config import CheckpointConfig
    class It:
      def __init__(self): self.s = 0
      def get_state(self): return {"step": self.s}
      def set_state(self, s): self.s = s["step"]
    ck = Checkpointer(sys.argv[1], CheckpointConfig(every=1, keep=3, async_save=True))
    state = {"w": jnp.arange(1000.0), "step": jnp.int32(1)}
    ck.save(1, state, It(), {"note": "first"}, 1.0)
    ck.wait()
    real_save = IteratorHandler.save
    def crash(self, directory, args):
      os._exit(3)  # the process dies in the middle of writing step 2
    IteratorHandler.save = crash
    ck.save(2, {"w": jnp.arange(1000.0) * 2, "step": jnp.int32(2)}, It(), {"note": "second"}, 0.5)
    ck.wait()
    print("not reached")
""")


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
  directory = str(tmp_path / "ckpt")
  proc = subprocess.run(
      [sys.executable, "-c", _CRASH, directory], env=_env(), capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert "not reached" not in proc.stdout
  from train.config import CheckpointConfig

  ck = Checkpointer(directory, CheckpointConfig())
  assert ck.all_steps() == [1]
  restored = ck.restore_state(1)
  ck.close()
  np.testing.assert_array_equal(restored["w"], np.arange(1000.0))
  assert not [p for p in os.listdir(directory) if p not in ("1",) and not p.startswith(".")], os.listdir(directory)


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
  workdir = str(tmp_path / "w")
  cmd = [
      sys.executable,
      "-m",
      "train",
      "--config",
      os.path.join(ROOT, "configs/stage1_image_pretrain.py") + ":mode=cpu,steps=100000",
      "--workdir",
      workdir,
      "--config.ckpt.every=100000",
      "--config.export=False",
  ]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  deadline = time.time() + 240
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
    assert time.time() < deadline, "".join(lines[-20:])
  out, _ = proc.communicate(timeout=240)
  lines.append(out)
  assert proc.returncode == 0, "".join(lines[-30:])
  assert "SIGTERM: saved step" in out
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), tiny_config().ckpt)
  step = ck.latest_step()
  assert step is not None and step >= 3
  state = ck.restore_state(step)
  ck.close()
  assert int(state["step"]) == step
  # And training resumes from it.
  proc = subprocess.run(cmd + ["--stop_after=1"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f"resumed from {os.path.join(workdir, 'checkpoints')}/{step}" in proc.stdout + proc.stderr
