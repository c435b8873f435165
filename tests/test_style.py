"""The tree's one format: [tool.pyink] in pyproject.toml (2-space indentation, 120 columns), which `make test`
checks before the suite (`make format` applies it). Here: the config says what the tree is, and lines pyink
cannot shorten (long strings, comments) still fit the column limit."""

import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMAT_PATHS = ("kangaroo_jax", "train", "tools", "configs", "benchmarks", "tests")


def _config() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["tool"]["pyink"]


def _sources():
  for top in FORMAT_PATHS:
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      yield from (os.path.join(folder, name) for name in sorted(files) if name.endswith(".py"))


def test_the_makefile_checks_the_format_paths_with_the_one_config():
  with open(os.path.join(ROOT, "Makefile")) as f:
    makefile = f.read()
  assert "FORMAT_PATHS := " + " ".join(FORMAT_PATHS) in makefile
  assert "-m pyink --check" in makefile
  assert _config()["pyink-indentation"] == 2


def test_the_config_turns_four_space_code_into_two_space(tmp_path):
  """A negative control for the check: code in another style is reformatted, not accepted."""
  src = tmp_path / "four.py"
  src.write_text("def f(x):\n    if x:\n        return 1\n    return 2\n")
  cmd = [sys.executable, "-m", "pyink", "--config", os.path.join(ROOT, "pyproject.toml"), "--quiet"]
  assert subprocess.run(cmd + ["--check", str(src)], capture_output=True).returncode == 1
  subprocess.run(cmd + [str(src)], check=True, capture_output=True)
  assert src.read_text() == "def f(x):\n  if x:\n    return 1\n  return 2\n"


def test_every_line_fits_the_column_limit():
  limit = _config()["line-length"]
  long = []
  for path in _sources():
    with open(path, encoding="utf-8") as f:
      long += [f"{os.path.relpath(path, ROOT)}:{i}" for i, line in enumerate(f, 1) if len(line.rstrip("\n")) > limit]
  assert not long, f"{len(long)} lines over {limit} columns: {long[:20]}"
