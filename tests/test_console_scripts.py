"""Every CLI is also an installed console script (`pip install -e .` writes them): each answers --help with exit 0."""

import configparser
import importlib.util
import os
import subprocess
import sys

import pytest

from tests.test_inference_chat import ROOT

BIN = os.path.dirname(sys.executable)


def _scripts() -> dict[str, str]:
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  lines = [ln.strip() for ln in cfg["options.entry_points"]["console_scripts"].splitlines() if ln.strip()]
  return dict(tuple(part.strip() for part in ln.split("=", 1)) for ln in lines)


def test_every_cli_module_has_a_script():
  targets = set(_scripts().values())
  for module in (
      "kangaroo_jax.chat",
      "kangaroo_jax.evaluate",
      "kangaroo_jax.niah",
      "kangaroo_jax.serve.__main__",
      "train.__main__",
      "train.compile",
      "tools.convert_weights.__main__",
      "tools.build_dataset",
  ):
    assert any(t.split(":")[0] == module for t in targets), module


@pytest.mark.parametrize("name", sorted(_scripts()))
def test_console_script_help(name):
  path = os.path.join(BIN, name)
  if not os.path.exists(path):
    pytest.skip(f"{name} is not installed in {BIN} (run `pip install -e .` after changing setup.cfg)")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
  if name == "kangaroo-lmms-eval" and importlib.util.find_spec("lmms_eval") is None:
    # The harness lives in .venv-eval (make eval-env); elsewhere the script says so in one line.
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr[-2000:]
    assert "make eval-env" in r.stderr
    return
  assert r.returncode == 0, (name, r.stderr[-2000:])
  # The CLI's own help text (its module docstring or argparse description), not a bare usage line.
  assert len(r.stdout) > 300 and ("usage" in r.stdout.lower() or "python -m" in r.stdout), (name, r.stdout[:500])
