"""`python -m train.demo`: --seed reaches the data, and the run prints its seed, steps/s and wall time."""

import json
import os
import subprocess
import sys

from train import demo, demo_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_short_run_prints_seed_rate_wall_and_targets(tmp_path):
  work = tmp_path / "demo"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one CPU device, as `make demo` runs
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "train.demo",
          "--workdir",
          str(work),
          "--seed",
          "5",
          "--steps",
          "2",
          "--train-videos",
          "12",
          "--test-videos",
          "8",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "[demo] seed 5;" in out
  assert "[demo] trained 2 steps in " in out and " steps/s " in out
  assert "[demo] done in " in out and " s wall (seed 5;" in out
  assert "[demo] targets (direction >= 80%" in out
  # The clips are seed 5's: the held-out benchmark lists exactly the clips demo_data draws for that seed.
  with open(work / "data" / "test.json") as f:
    bench = json.load(f)
  expected = demo_data.sample(8, seed=5 + 1_000_003, size=demo.FRAME_SIZE, frames=demo.FRAMES)
  got = sorted((e["question"], tuple(e["candidates"])) for items in bench.values() for e in items)
  assert got == sorted((c["question"], tuple(c["options"])) for c in expected)


def test_other_seed_in_the_same_workdir_is_a_one_line_error(tmp_path, capsys):
  (tmp_path / "seed.txt").write_text("3\n")
  assert demo.main(["--workdir", str(tmp_path), "--seed", "4"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "seed-3 demo, not seed 4" in err and "--fresh" in err
  assert (tmp_path / "seed.txt").read_text() == "3\n"  # the workdir is left as it was
