"""Chat with a checkpoint about a video or image, streaming the answer as it is generated.

    python -m kangaroo_jax.chat CKPT_DIR --video FILE                 # interactive; /reset, /quit
    python -m kangaroo_jax.chat CKPT_DIR --video FILE --query "..."   # one answer, then exit

CKPT_DIR is a `from_pretrained` folder (a converted release or a trainer export) with tokenizer files.
Bad input (a path that is not such a folder, a missing video, an option value out of range, a prompt past
--max-positions) ends with one `error:` line and exit status 2; Ctrl-C ends quietly with status 130.
In the interactive loop a prompt past --max-positions is reported and the conversation continues.
"""

from __future__ import annotations

import argparse
import os
import sys

from kangaroo_jax.inference.loading import (EXIT_INTERRUPTED, INPUT_ERRORS, UsageError, add_loading_args,
                                            check_generation_args, error_line, load_from_args, report_input_error)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m kangaroo_jax.chat", description=__doc__.split("\n\n")[0])
  p.add_argument("ckpt_dir", help="from_pretrained folder (kangaroo_config.json, state/, tokenizer files)")
  p.add_argument("--video", help="video file, image file or folder of frames (omit for text-only chat)")
  p.add_argument("--query", help="ask this one question, print the answer and exit")
  p.add_argument("--num-frames", type=int, default=64)
  p.add_argument("--max-new-tokens", type=int, default=512)
  p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
  p.add_argument("--temperature", type=float, default=0.6)
  p.add_argument("--top-p", type=float, default=0.9)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--system", help="system prompt")
  add_loading_args(p)
  return p


def check_args(args: argparse.Namespace) -> None:
  """UsageError naming the option, before anything is loaded."""
  check_generation_args(args)
  if args.query is not None and not args.query.strip():
    raise UsageError("--query is empty; give a question, or leave --query out for an interactive chat")
  if args.video is not None and not os.path.exists(args.video):
    raise UsageError(f"--video {args.video}: no such file or folder")
  if args.temperature < 0:
    raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
  if not 0.0 < args.top_p <= 1.0:
    raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
  if args.top_k < 0:
    raise UsageError(f"--top-k must be >= 0, got {args.top_k}")


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    check_args(args)
    model, tokenizer, scope = load_from_args(args)
    with scope:
      return _session(args, model, tokenizer)
  except INPUT_ERRORS as e:
    return report_input_error(e)
  except KeyboardInterrupt:
    sys.stdout.write("\n")  # ends a half-streamed answer or the prompt line
    sys.stdout.flush()
    return EXIT_INTERRUPTED


def _session(args, model, tokenizer) -> int:
  from kangaroo_jax.inference.chat import Chat, PromptTooLong

  chat = Chat(model, tokenizer, prefill_chunk=args.prefill_chunk, system=args.system,
              max_positions=args.max_positions, warn=lambda s: print(f"warning: {s}", file=sys.stderr, flush=True))
  opts = dict(num_frames=args.num_frames, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)

  def ask(query, history, turn):
    write = lambda s: (sys.stdout.write(s), sys.stdout.flush())  # noqa: E731
    _, history = chat.chat(args.video, query, history, seed=args.seed + turn, stream=write, **opts)
    write("\n")
    return history

  if args.query is not None:
    ask(args.query, None, 0)
    return 0
  history, turn = None, 0
  interactive = sys.stdin.isatty()
  while True:
    if interactive:
      sys.stdout.write("you> ")
      sys.stdout.flush()
    line = sys.stdin.readline()
    if not line or line.strip() in ("/quit", "/exit"):
      return 0
    query = line.strip()
    if not query:
      continue
    if query == "/reset":
      history = None
      continue
    if interactive:
      sys.stdout.write("kangaroo> ")
    try:
      history = ask(query, history, turn)
    except PromptTooLong as e:
      # The history is left as it was (the check runs before its cache is used): the user may /reset.
      print(f"error: {error_line(e)}; /reset starts a new conversation", file=sys.stderr, flush=True)
    turn += 1


if __name__ == "__main__":
  sys.exit(main())
