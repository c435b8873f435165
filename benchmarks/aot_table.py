"""Renders README's TPU memory table from the `python -m train.compile` JSON lines in benchmarks/results/aot/.

Usage: python benchmarks/aot_table.py [RESULTS_DIR]   (markdown on stdout; rows sorted by stage and slice)
Every number is the TPU compiler's memory plan per chip (`memory_analysis()`), not a measured peak.
"""

from __future__ import annotations

import glob
import json
import os
import sys


def rows(folder: str) -> list[dict]:
  out = []
  for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
    with open(path) as f:
      r = json.load(f)
    r["file"] = os.path.basename(path)
    out.append(r)
  return out


def _depth(r: dict) -> str:
  if r.get("llm_layers") is None and r.get("vision_layers") is None:
    return "full"
  return f"LLM {r.get('llm_layers') or 'full'} / ViT {r.get('vision_layers') or 'full'} layers"


def render(results: list[dict]) -> str:
  head = (
      "| program | slice (chips) | depth | mesh | attention kernel | per chip | HBM | fits | compile (2 cores) |\n"
      "|---|---|---|---|---|---|---|---|---|"
  )
  lines = [head]
  for r in results:
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 chip"
    what = r["what"]
    if what.startswith("inference"):
      what += f", {r['frames']} frames, {r['prompt_tokens']}-token prompt"
    if "full-logits" in r["file"]:
      what += " (before the chunked loss)"
    if r.get("attention_impl") == "usp":
      u = r.get("ulysses_degree") or 0
      context = r["mesh"].get("context", 1)
      what += f", USP {u} x {context // u}" if u else ", USP"
    elif r.get("attention_impl") == "ring" and r.get("ulysses_degree") is None and ".ring." in r["file"]:
      what += ", ring"
    if "no-vit-chunks" in r["file"]:
      what += " (before ViT frame chunks)"
    kernel = "splash" if "splash" in r["attention_kernel"] else r["attention_kernel"]
    lines.append(
        f"| {what} | {r['topology']} ({r['chips']}) | {_depth(r)} | {mesh} | {kernel} | "
        f"{r['per_chip_bytes'] / 2**30:.1f} GiB | {r['hbm_bytes'] / 2**30:.0f} GiB | "
        f"{'yes' if r['fits'] else '**no**'}{' (compiler refused)' if r.get('compiler_refused') else ''} | "
        f"{r['compile_s']:.0f} s |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  print(render(rows(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/aot")))
