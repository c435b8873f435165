"""CLI: python -m tools.convert_weights {import,inspect,export} ...

  import SRC DST [--dtype bfloat16] [--preset kangaroo-8b | --config-json CFG] [--format auto|safetensors|bin]
  inspect SRC [--json] [--format ...]            keys, shapes, dtypes, sizes from headers only
  export CKPT OUT [--dtype as-stored]            model.safetensors + config.json (with vision_config), released naming

Exit status 2 with a one-line message on a checkpoint problem (mismatch, truncation, bad config field,
unusable output folder, full disk, ...), 130 when interrupted (the output folder is then as it was), 0
on success. NaN/Inf in the weights, and the settings no tensor shape checks (vision head_width without the
RoPE table, pt_hw_seq_len, the TPE), are warnings on stderr (and in conversion_report.json), not errors.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys

# --help stays instant (nothing of kangaroo_jax, so no jax, is imported before parsing), so each help text spells
# its default itself instead of using kangaroo_jax.cli_help.HelpFormatter; the result reads the same.
HelpFormatter = argparse.RawDescriptionHelpFormatter


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m tools.convert_weights", description=__doc__, formatter_class=HelpFormatter
  )
  sub = p.add_subparsers(dest="command", required=True)
  formats = ("auto", "safetensors", "bin")
  format_help = "source file format; auto: from the files present (default: auto)"

  imp = sub.add_parser(
      "import", help="released PyTorch/safetensors checkpoint -> Orbax checkpoint", formatter_class=HelpFormatter
  )
  imp.add_argument("src", help="model folder (config.json + model.safetensors[.index.json] or pytorch_model.bin)")
  imp.add_argument("dst", help="output folder (must not exist unless --overwrite)")
  imp.add_argument(
      "--dtype", default="bfloat16", help="stored parameter dtype: bfloat16, float32 or float16 (default: bfloat16)"
  )
  imp.add_argument(
      "--preset",
      default="kangaroo-8b",
      help="KangarooConfig preset for the projector and for the vision settings the folder does not "
      "give (config.json vision_config, then EVA02-CLIP-L-14-448.json vision_cfg, win); checked "
      "against the tensor shapes where a shape shows them, warned about where none does "
      "(default: kangaroo-8b)",
  )
  imp.add_argument(
      "--config-json", help="a full KangarooConfig JSON to use instead of --preset + config.json (default: none)"
  )
  imp.add_argument("--format", default="auto", choices=formats, help=format_help)
  imp.add_argument(
      "--overwrite",
      action="store_true",
      help="replace DST if it is an earlier output of this tool, only after success (default: off)",
  )
  imp.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
  imp.add_argument(
      "--no-sync",
      action="store_true",
      help="skip the fsync of the result before the final rename (faster on slow disks; a crash "
      "right after the rename could then leave a complete-looking but unflushed checkpoint) "
      "(default: off)",
  )

  ins = sub.add_parser("inspect", help="list keys/shapes/dtypes from headers only", formatter_class=HelpFormatter)
  ins.add_argument("src", help="model folder, or one checkpoint file")
  ins.add_argument("--format", default="auto", choices=formats, help=format_help)
  ins.add_argument("--json", action="store_true", help="machine-readable output (default: off)")

  exp = sub.add_parser(
      "export",
      help="converted checkpoint -> model.safetensors + config.json (released naming)",
      formatter_class=HelpFormatter,
  )
  exp.add_argument("ckpt", help="a folder written by `import`")
  exp.add_argument("out", help="output folder (must not exist unless --overwrite)")
  exp.add_argument("--dtype", default=None, help="tensor dtype in the file (default: as stored)")
  exp.add_argument(
      "--overwrite",
      action="store_true",
      help="replace OUT if it is an earlier output of this tool, only after success (default: off)",
  )
  exp.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _run(args)
  except KeyboardInterrupt:
    print(
        "interrupted: the output folder is as it was before, or complete if the interrupt came after the "
        "final rename",
        file=sys.stderr,
    )
    return 130


def _run(args) -> int:
  # Heavy imports after argument parsing, so --help is instant.
  from kangaroo_jax.config import ConfigError
  from tools.convert_weights.assemble import ConversionError
  from tools.convert_weights.convert import export_checkpoint, format_inspect, import_checkpoint, inspect_checkpoint
  from tools.convert_weights.sources import SourceError

  try:
    if args.command == "import":
      r = import_checkpoint(
          args.src,
          args.dst,
          dtype=args.dtype,
          preset=args.preset,
          config_json=args.config_json,
          fmt=args.format,
          overwrite=args.overwrite,
          progress=not args.quiet,
          sync=not args.no_sync,
      )
      print(
          f"wrote {r.dst}: {r.mapped} tensors mapped ({r.bytes_read / 1e9:.3f} GB read), {len(r.ignored)} ignored, "
          f"{len(r.defaulted)} defaulted, dtype {r.dtype}, {r.seconds:.2f}s; {r.config_source}"
      )
      for key, reason in sorted(r.ignored.items()):
        print(f"  ignored {key}: {reason}")
      for key, what in sorted(r.defaulted.items()):
        print(f"  defaulted {key}: {what}")
      for line in r.unverified:
        print(f"warning: {line}", file=sys.stderr)
      _warn_nonfinite(r.nonfinite)
    elif args.command == "inspect":
      result = inspect_checkpoint(args.src, args.format)
      print(json.dumps(result, indent=1) if args.json else format_inspect(result))
    else:
      r = export_checkpoint(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
      print(f"wrote {r['out']}: {r['tensors']} tensors, {r['bytes'] / 1e9:.3f} GB")
      _warn_nonfinite(r["nonfinite"])
  except (ConversionError, SourceError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # anything the converter did not name itself: still one line, naming the path
    where = f"{e.filename}: " if e.filename else ""
    print(f"error: {where}{e.strerror or e}", file=sys.stderr)
    return 2
  return 0


def _warn_nonfinite(nonfinite: dict[str, str]) -> None:
  for key, what in sorted(nonfinite.items()):
    print(f"warning: {key}: {what}", file=sys.stderr)


def _terminate(signum, frame):
  raise KeyboardInterrupt  # the output folder's cleanup (and a swap's restore) runs as for Ctrl-C


def _process_setup() -> None:
  """Settings for the converter's own process (not for callers of `main`)."""
  # A source file truncated while one of its tensors is being copied out of the memory map kills the
  # process with SIGBUS (the output is never renamed into place): show where, not only "Bus error".
  faulthandler.enable()
  # Orbax logs a failed write (e.g. a full disk) with a traceback per thread before the error reaches
  # `main`, which reports it in one line: keep its log to what is fatal.
  logging.getLogger("absl").setLevel(logging.CRITICAL)
  for signum in (signal.SIGTERM, signal.SIGHUP):
    if signal.getsignal(signum) == signal.SIG_DFL:  # e.g. not under nohup, which ignores SIGHUP
      signal.signal(signum, _terminate)
  # Nothing here multiplies matrices; an idle OpenBLAS thread still spun on one of the copy threads'
  # cores (~2 % of the conversion's CPU samples, perf, 2-core VM).
  if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


if __name__ == "__main__":
  _process_setup()
  sys.exit(main())
