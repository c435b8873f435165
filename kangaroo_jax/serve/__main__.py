"""Serve a checkpoint over an OpenAI-compatible HTTP API, with a web page at /.

    python -m kangaroo_jax.serve CKPT_DIR [--host 127.0.0.1 --port 8000 --num-frames 64 --examples DIR]

Then e.g. OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none").chat.completions.create(...) with a
{"type": "video_url", "video_url": {"url": "/path/clip.mp4"}} content part. Bad options or checkpoint: one
`error:` line, exit status 2. The server reads any local file a request names: keep it on 127.0.0.1 (the
default) unless every client may read this machine's files.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from kangaroo_jax import compile_cache
from kangaroo_jax.cli_help import HelpFormatter
from kangaroo_jax.inference.loading import (
    EXIT_INPUT_ERROR,
    INPUT_ERRORS,
    UsageError,
    add_loading_args,
    check_generation_args,
    load_from_args,
    report_input_error,
)
from kangaroo_jax.pretrained import load_config

NEEDED = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("multipart", "python-multipart"))


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m kangaroo_jax.serve",
      description=__doc__.split("\n\n")[0],
      epilog=compile_cache.HELP_EPILOG,
      formatter_class=HelpFormatter,
  )
  p.add_argument("ckpt_dir", help="from_pretrained folder (kangaroo_config.json, state/, tokenizer files)")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on")
  p.add_argument("--port", type=int, default=8000, help="port to listen on")
  p.add_argument("--num-frames", type=int, default=64, help="an even number of frames sampled from each video")
  p.add_argument("--max-new-tokens", type=int, default=512, help="answer length when a request gives no max_tokens")
  p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
  p.add_argument("--temperature", type=float, default=0.6, help="temperature when a request gives none (0: greedy)")
  p.add_argument("--top-p", type=float, default=0.9, help="top_p when a request gives none")
  p.add_argument("--top-k", type=int, default=0, help="top_k when a request gives none; 0: no limit")
  p.add_argument("--system", help="system prompt when a conversation has none (default: none)")
  p.add_argument("--served-model-name", help="model id in /v1/models and answers (default: the folder's name)")
  p.add_argument("--max-batch", type=int, default=8, help="most requests in one engine call")
  p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which new ones get 503")
  p.add_argument(
      "--batch-window-ms",
      type=float,
      default=10.0,
      help="how long the worker waits for requests to " "batch with the oldest one",
  )
  p.add_argument("--visual-cache", type=int, default=8, help="decoded + encoded videos kept for follow-up turns")
  p.add_argument("--max-upload-mb", type=int, default=512, help="largest file the page may upload")
  p.add_argument("--examples", metavar="DIR", help="folder whose videos / images the page offers (default: none)")
  add_loading_args(p)
  return p


def check_args(args: argparse.Namespace) -> None:
  check_generation_args(args)
  for flag, value, lo in (
      ("--port", args.port, 0),
      ("--max-batch", args.max_batch, 1),
      ("--max-queue", args.max_queue, 1),
      ("--visual-cache", args.visual_cache, 1),
      ("--max-upload-mb", args.max_upload_mb, 1),
      ("--max-tokens-limit", args.max_tokens_limit, 1),
  ):
    if value < lo:
      raise UsageError(f"{flag} must be >= {lo}, got {value}")
  if args.port > 65535:
    raise UsageError(f"--port must be <= 65535, got {args.port}")
  if args.max_new_tokens > args.max_tokens_limit:
    raise UsageError(f"--max-new-tokens {args.max_new_tokens} is above --max-tokens-limit {args.max_tokens_limit}")
  if args.batch_window_ms < 0:
    raise UsageError(f"--batch-window-ms must be >= 0, got {args.batch_window_ms}")
  if args.examples is not None and not os.path.isdir(args.examples):
    raise UsageError(f"--examples {args.examples}: no such folder")
  from kangaroo_jax.inference.sampling import SamplingConfig

  try:
    SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
  except ValueError as e:
    field, _, rest = str(e).partition(" ")
    raise UsageError(f"--{field.replace('_', '-')} {rest}") from None


def missing_packages() -> list[str]:
  return [pip for module, pip in NEEDED if importlib.util.find_spec(module) is None]


def build_service(args: argparse.Namespace, model, tokenizer, mesh=None):
  from kangaroo_jax.inference.chat import Chat
  from kangaroo_jax.serve.protocol import Defaults
  from kangaroo_jax.serve.service import ServeOptions, Service

  chat = Chat(
      model,
      tokenizer,
      prefill_chunk=args.prefill_chunk,
      system=args.system,
      max_positions=args.max_positions,
      warn=lambda s: print(f"warning: {s}", file=sys.stderr, flush=True),
  )
  defaults = Defaults(
      temperature=args.temperature,
      top_p=args.top_p,
      top_k=args.top_k,
      max_tokens=args.max_new_tokens,
      max_tokens_limit=args.max_tokens_limit,
  )
  name = args.served_model_name or os.path.basename(os.path.normpath(args.ckpt_dir))
  options = ServeOptions(
      model_name=name,
      num_frames=args.num_frames,
      defaults=defaults,
      max_batch=args.max_batch,
      max_queue=args.max_queue,
      batch_window_s=args.batch_window_ms / 1000,
      visual_cache=args.visual_cache,
      max_upload_bytes=args.max_upload_mb * 2**20,
      examples_dir=args.examples,
  )
  return Service(chat, options, mesh=mesh)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  missing = missing_packages()
  if missing:
    print(f"error: the server needs {', '.join(missing)}: pip install -e '.[serve]'", file=sys.stderr, flush=True)
    return EXIT_INPUT_ERROR
  try:
    check_args(args)
    compile_cache.enable()
    load_config(args.ckpt_dir)  # a folder that is not a checkpoint: one error line, before any progress line
    print(f"loading weights from {args.ckpt_dir}...", file=sys.stderr, flush=True)
    model, tokenizer, _scope = load_from_args(args)
  except INPUT_ERRORS as e:
    return report_input_error(e)
  import jax
  import uvicorn

  from kangaroo_jax.serve.app import create_app

  service = build_service(args, model, tokenizer, mesh=jax.sharding.get_mesh())  # load set it for this thread
  print(
      f"serving {service.options.model_name} on http://{args.host}:{args.port}/ (OpenAI API under /v1)",
      file=sys.stderr,
      flush=True,
  )
  try:
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
  except KeyboardInterrupt:
    pass
  return 0


if __name__ == "__main__":
  sys.exit(main())
