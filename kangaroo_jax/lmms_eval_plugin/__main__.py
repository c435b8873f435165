"""`python -m kangaroo_jax.lmms_eval_plugin ARGS`: lmms-eval's own CLI (same ARGS), plus provenance in its results.

lmms-eval writes `model_args` verbatim into its results JSON but has no field a model can fill, and its
"lmms_eval_version" is the git state of the working directory. So after lmms-eval has finished, every
`*_results.json` it wrote under --output_path during this run for `--model kangaroo_jax` gets a
"kangaroo_jax" block: the plugin's provenance (lmms-eval's installed version, the recipe and settings,
the project's git commit, the checkpoint's content hash, answered / failed / short-video counts). The
file is rewritten atomically (a temporary file, then a rename); files from other runs are not touched.
Plain `lmms-eval --model kangaroo_jax ...` works too; it prints the same provenance as one stderr line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

PROVENANCE_KEY = "kangaroo_jax"


def _run_args(argv: list[str]) -> argparse.Namespace:
  """The two lmms-eval options this wrapper reads: --model and --output_path."""
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--model")
  p.add_argument("--output_path")
  known, _ = p.parse_known_args(argv)
  return known


def add_provenance(output_path: str, started: float, provenance: dict) -> list[str]:
  """Adds `provenance` to the kangaroo_jax results files written since `started`; returns their paths."""
  written = []
  pattern = os.path.join(glob.escape(output_path), "**", "*_results.json")
  for path in sorted(glob.glob(pattern, recursive=True)):
    if os.path.getmtime(path) < started:
      continue
    with open(path) as f:
      results = json.load(f)
    if not isinstance(results, dict) or results.get("config", {}).get("model") != "kangaroo_jax":
      continue
    results[PROVENANCE_KEY] = provenance
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(results, f, indent=4, default=str)
    os.replace(tmp, path)
    written.append(path)
  return written


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    from lmms_eval.cli.dispatch import main as lmms_eval_main
  except ImportError:
    print(
        "error: lmms-eval is not installed in this environment; build its own with `make eval-env` and run "
        ".venv-eval/bin/python -m kangaroo_jax.lmms_eval_plugin",
        file=sys.stderr,
    )
    return 2

  from kangaroo_jax.lmms_eval_plugin import model as plugin_model

  started = time.time() - 1.0  # file times can be coarser than time.time()
  sys.argv = ["lmms-eval"] + argv
  status = lmms_eval_main()
  run = _run_args(argv)
  if run.model == "kangaroo_jax" and run.output_path:
    written = []
    if plugin_model.INSTANCES:
      written = add_provenance(run.output_path, started, plugin_model.INSTANCES[-1].provenance)
    for path in written:
      print(f"kangaroo_jax: provenance added to {path}", file=sys.stderr)
    if not written:
      # lmms-eval logs an evaluation error (a bad model_args value, a task error) and still exits 0.
      print(
          f"kangaroo_jax: lmms-eval wrote no results under {run.output_path} (its error is logged above)",
          file=sys.stderr,
      )
      return 1
  return status if isinstance(status, int) else 0


if __name__ == "__main__":
  sys.exit(main())
