"""Loading a checkpoint for inference, optionally onto a (context x tensor) mesh, and the options and
input errors shared by the chat and evaluate CLIs."""

from __future__ import annotations

import argparse
import contextlib
import sys

import jax

from kangaroo_jax.config import ConfigError
from kangaroo_jax.data.video import VideoError
from kangaroo_jax.inference.chat import PromptTooLong
from kangaroo_jax.parallel.mesh import MeshConfig, MeshError, make_mesh
from kangaroo_jax.pretrained import CheckpointError, from_pretrained, load_config
from kangaroo_jax.tokenizer import TokenizerError, has_tokenizer

MIN_PREFILL_CHUNK = 16  # the engine's smallest prefill chunk


class UsageError(ValueError):
  """A command-line option whose value cannot be used; the message names the option and what it expects."""


# Bad input to chat / evaluate: reported as one `error: ...` line with exit status 2, never a traceback.
INPUT_ERRORS = (UsageError, CheckpointError, TokenizerError, MeshError, ConfigError, VideoError, PromptTooLong)
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C


def error_line(e: BaseException) -> str:
  """The message of `e` on one line (multi-line messages, e.g. MeshError's list, are joined)."""
  parts = [p.strip() for p in str(e).splitlines() if p.strip()]
  return " ".join(parts) or type(e).__name__


def report_input_error(e: BaseException) -> int:
  print(f"error: {error_line(e)}", file=sys.stderr, flush=True)
  return EXIT_INPUT_ERROR


def check_mesh_fits(context: int, tensor: int, num_devices: int) -> None:
  """MeshError unless a context x tensor inference mesh can be built from `num_devices` devices."""
  for name, flag, v in (("context", "--context-parallel", context), ("tensor", "--tensor-parallel", tensor)):
    if not isinstance(v, int) or v < 1:
      raise MeshError(f"{name} ({flag}) must be an int >= 1, got {v!r}")
  if context * tensor > num_devices:
    raise MeshError(
        f"a mesh of context={context} x tensor={tensor} (--context-parallel x --tensor-parallel) "
        f"needs {context * tensor} devices; {num_devices} available"
    )


def load_for_inference(
    ckpt_dir: str,
    *,
    param_dtype: str | None = None,
    context: int = 1,
    tensor: int = 1,
    attention_impl: str = "all_gather",
):
  """(model, tokenizer, mesh context manager) for chat / evaluate.

  With context * tensor > 1 the weights are placed on a mesh of that many devices (data = fsdp = 1, so a
  single request fits), the KV cache length and prefill chunks are split over `context` and heads over
  `tensor`; `attention_impl` ("all_gather" or "ring", RunOptions.attention_impl) is the prefill attention; the
  other run options are the folder's (`kangaroo_jax.pretrained.run_defaults`). Run generation inside
  the returned context manager (`with scope: ...`).
  The folder, the mesh and the tokenizer are checked before any weight is read (CheckpointError,
  MeshError, TokenizerError).
  """
  cfg = load_config(ckpt_dir)
  check_mesh_fits(context, tensor, len(jax.devices()))
  if context * tensor == 1:
    model, tokenizer = from_pretrained(ckpt_dir, param_dtype=param_dtype, config=cfg)
    return model, tokenizer, contextlib.nullcontext()
  n = context * tensor
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, context=context, tensor=tensor), devices=jax.devices()[:n])
  model, tokenizer = from_pretrained(ckpt_dir, mesh, config=cfg, param_dtype=param_dtype, attention_impl=attention_impl)
  return model, tokenizer, jax.set_mesh(mesh)


def add_loading_args(p: argparse.ArgumentParser) -> None:
  """The options of `load_from_args` and of the Chat both CLIs build."""
  p.add_argument(
      "--param-dtype",
      choices=("float32", "bfloat16", "float16"),
      help="cast weights while loading (default: as stored)",
  )
  p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens run per prefill step")
  p.add_argument(
      "--context-parallel",
      type=int,
      default=1,
      metavar="N",
      help="split the KV cache and prefill over N devices (context axis)",
  )
  p.add_argument(
      "--tensor-parallel", type=int, default=1, metavar="N", help="split attention heads / MLP over N devices"
  )
  p.add_argument(
      "--max-positions",
      type=int,
      metavar="N",
      help="refuse prompts longer than N tokens and stop answers at N positions (default: only warn past "
      "the checkpoint's llm.max_position_embeddings)",
  )


def check_generation_args(args: argparse.Namespace) -> None:
  """UsageError naming the option for values the CLIs cannot use (checked before the model is loaded)."""
  if args.num_frames < 1 or args.num_frames % 2:
    raise UsageError(
        f"--num-frames must be a positive even number (frames are encoded in pairs), " f"got {args.num_frames}"
    )
  if args.max_new_tokens < 1:
    raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  if args.prefill_chunk < MIN_PREFILL_CHUNK:
    raise UsageError(f"--prefill-chunk must be >= {MIN_PREFILL_CHUNK}, got {args.prefill_chunk}")
  if args.max_positions is not None and args.max_positions < 2:
    raise UsageError(f"--max-positions must be >= 2, got {args.max_positions}")


def load_from_args(args: argparse.Namespace):
  """`load_for_inference(args.ckpt_dir, ...)` with the options of `add_loading_args`.

  Raises CheckpointError when the folder holds no tokenizer (chat and evaluate both need one), checked
  with the config, the mesh and the tokenizer's vocabulary before the weights are read.
  """
  load_config(args.ckpt_dir)
  if not has_tokenizer(args.ckpt_dir):
    raise CheckpointError(f"{args.ckpt_dir} holds no tokenizer.json or tokenizer.model")
  return load_for_inference(
      args.ckpt_dir, param_dtype=args.param_dtype, context=args.context_parallel, tensor=args.tensor_parallel
  )
