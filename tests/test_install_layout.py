"""The install layout (docs/architecture.md, "Install layout"): the top-level packages setup.cfg installs resolve to
this checkout, not to another distribution's `train` / `tools`, and every console script resolves to a callable."""

import ast
import configparser
import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = "kangaroo-jax"


def _setup_cfg() -> configparser.ConfigParser:
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  return cfg


def _console_scripts() -> dict[str, str]:
  lines = [ln for ln in _setup_cfg()["options.entry_points"]["console_scripts"].splitlines() if ln.strip()]
  return dict(tuple(part.strip() for part in ln.split("=", 1)) for ln in lines)


def _top_level_packages() -> list[str]:
  include = _setup_cfg()["options.packages.find"]["include"].split()
  return sorted({name.split(".")[0] for name in include})


def test_the_installed_top_level_names_are_the_documented_ones():
  assert _top_level_packages() == ["kangaroo_jax", "tools", "train"]
  with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
    doc = f.read()
  assert "## Install layout" in doc
  section = doc.split("## Install layout", 1)[1].split("\n## ", 1)[0]
  for name in _top_level_packages():
    assert f"`{name}`" in section, name


def test_outside_the_checkout_each_top_level_name_is_this_checkouts(tmp_path):
  """As a console script sees them: from another folder, so the checkout is not on sys.path first."""
  probe = (
      "import importlib.util, json; print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) "
      f"for n in {_top_level_packages()!r}}}))"
  )
  env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
  r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr[-2000:]
  found = json.loads(r.stdout)
  if all(origin is None for origin in found.values()):
    pytest.skip(f"{DIST} is not installed in {sys.prefix} (pip install -e .)")
  for name, origin in found.items():
    assert origin is not None and os.path.realpath(os.path.dirname(origin)) == os.path.realpath(
        os.path.join(ROOT, name)
    ), (
        f"`import {name}` outside the checkout finds {origin}, not this checkout's "
        f"{name}/: another installed package named {name!r} shadows it "
        "(docs/architecture.md, Install layout)"
    )


@pytest.mark.parametrize("script", sorted(_console_scripts()))
def test_each_console_script_resolves_to_a_function_of_this_checkout(script):
  # Found and read, not imported: train.__main__ and train.compile both define absl's --config, so importing both
  # in one process fails (each script runs in its own; tests/test_console_scripts.py runs them).
  module_name, _, attr = _console_scripts()[script].partition(":")
  spec = importlib.util.find_spec(module_name)
  assert spec is not None and spec.origin, f"{script}: no module {module_name}"
  assert os.path.realpath(spec.origin).startswith(os.path.realpath(ROOT) + os.sep), (script, spec.origin)
  with open(spec.origin, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
  assert attr in functions, f"{script}: {module_name} defines no function {attr!r}"


def test_the_installed_entry_points_are_setup_cfgs():
  try:
    dist = importlib.metadata.distribution(DIST)
  except importlib.metadata.PackageNotFoundError:
    pytest.skip(f"{DIST} is not installed here (pip install -e .)")
  installed = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
  assert installed == _console_scripts(), "the installed console scripts are stale: run `pip install -e .` again"
  assert sorted((dist.read_text("top_level.txt") or "").split()) == _top_level_packages()
