"""Loading a checkpoint for inference, optionally onto a (context x tensor) mesh."""

from __future__ import annotations

import argparse
import contextlib
import sys

import jax

from kangaroo_jax.parallel.mesh import MeshConfig, make_mesh
from kangaroo_jax.pretrained import from_pretrained, load_config


def load_for_inference(ckpt_dir: str, *, param_dtype: str | None = None, context: int = 1, tensor: int = 1,
                       attention_impl: str = "all_gather"):
  """(model, tokenizer, mesh context manager) for chat / evaluate.

  With context * tensor > 1 the weights are placed on a mesh of that many devices (data = fsdp = 1, so a
  single request fits), the KV cache length and prefill chunks are split over `context` and heads over
  `tensor`; `attention_impl` ("all_gather" or "ring") is the prefill attention. Run generation inside
  the returned context manager (`with scope: ...`).
  """
  if context < 1 or tensor < 1:
    raise ValueError(f"context and tensor must be >= 1, got {context}, {tensor}")
  if context * tensor == 1:
    model, tokenizer = from_pretrained(ckpt_dir, param_dtype=param_dtype)
    return model, tokenizer, contextlib.nullcontext()
  n = context * tensor
  if n > len(jax.devices()):
    raise ValueError(f"a mesh of context={context} x tensor={tensor} needs {n} devices; {len(jax.devices())} available")
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, context=context, tensor=tensor), devices=jax.devices()[:n])
  cfg = load_config(ckpt_dir).replace(attention_impl=attention_impl)
  model, tokenizer = from_pretrained(ckpt_dir, mesh, param_dtype=param_dtype, config=cfg)
  return model, tokenizer, jax.set_mesh(mesh)


def add_loading_args(p: argparse.ArgumentParser) -> None:
  """The options of `load_from_args`, shared by the chat and evaluate CLIs."""
  p.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"), help="cast weights while loading")
  p.add_argument("--prefill-chunk", type=int, default=512)
  p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                 help="split the KV cache and prefill over N devices (context axis)")
  p.add_argument("--tensor-parallel", type=int, default=1, metavar="N", help="split attention heads / MLP over N devices")


def load_from_args(args: argparse.Namespace):
  """`load_for_inference(args.ckpt_dir, ...)` with the options of `add_loading_args`; None (after an
  error line on stderr) when the folder holds no tokenizer, which chat and evaluate both need."""
  model, tokenizer, scope = load_for_inference(args.ckpt_dir, param_dtype=args.param_dtype,
                                               context=args.context_parallel, tensor=args.tensor_parallel)
  if tokenizer is None:
    print(f"error: {args.ckpt_dir} holds no tokenizer.json or tokenizer.model", file=sys.stderr)
    return None
  return model, tokenizer, scope
