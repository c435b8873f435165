"""Chat with a checkpoint about a video or image, streaming the answer as it is generated.

    python -m kangaroo_jax.chat CKPT_DIR --video FILE                 # interactive
    python -m kangaroo_jax.chat CKPT_DIR --video FILE --query "..."   # one answer, then exit

CKPT_DIR is a `from_pretrained` folder (a converted release or a trainer export) with tokenizer files.
Bad input (a path that is not such a folder, a missing video, an option value out of range, a prompt past
--max-positions) ends with one `error:` line and exit status 2; Ctrl-C ends quietly with status 130.
In the interactive loop a prompt past --max-positions is reported and the conversation continues.

With stdin a terminal the loop prompts (`you> `), edits lines with readline and answers the commands
below on stdout. With stdin a pipe or file (a script) stdout holds only the answers, one per line: a
command runs without a reply (`/help` writes to stderr). While it loads and compiles, one line per phase
goes to stderr when stdin or stderr is a terminal.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from kangaroo_jax import compile_cache
from kangaroo_jax.cli_help import HelpFormatter
from kangaroo_jax.inference.loading import (
    EXIT_INTERRUPTED,
    INPUT_ERRORS,
    UsageError,
    add_loading_args,
    check_generation_args,
    error_line,
    load_from_args,
    report_input_error,
)

# The interactive commands, as `/help` and the --help epilog list them.
COMMANDS = (
    ("/help", "list these commands"),
    ("/reset", "forget the conversation so far (the video stays loaded)"),
    ("/quit", "end the chat (also /exit or Ctrl-D)"),
)
QUIT = ("/quit", "/exit")
_COMMAND_WORD = re.compile(r"^/\w+$")


def commands_text() -> str:
  return "\n".join(f"  {name:<8} {what}" for name, what in COMMANDS)


def _epilog() -> str:
  return (
      f"interactive commands:\n{commands_text()}\n\n"
      "compiled programs are cached between runs in $XDG_CACHE_HOME/kangaroo_jax/jax (~/.cache/kangaroo_jax/jax);\n"
      f"{compile_cache.DIR_ENV}=DIR moves the cache, {compile_cache.DIR_ENV}= (empty) turns it off, and an\n"
      f"existing {compile_cache.JAX_DIR_ENV} is used as it is."
  )


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m kangaroo_jax.chat",
      description=__doc__.split("\n\n")[0],
      epilog=_epilog(),
      formatter_class=HelpFormatter,
  )
  p.add_argument("ckpt_dir", help="from_pretrained folder (kangaroo_config.json, state/, tokenizer files)")
  p.add_argument("--video", help="video file, image file or folder of frames (default: none, a text-only chat)")
  p.add_argument(
      "--query", help="ask this one question, print the answer and exit (default: none, an interactive " "chat)"
  )
  p.add_argument(
      "--num-frames", type=int, default=64, help="an even number of frames sampled uniformly " "from the video"
  )
  p.add_argument("--max-new-tokens", type=int, default=512, help="longest answer, in tokens")
  p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling (default: sampling)")
  p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature")
  p.add_argument(
      "--top-p", type=float, default=0.9, help="sample from the most likely tokens holding this much " "probability"
  )
  p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0: no limit")
  p.add_argument("--seed", type=int, default=0, help="sampling seed of the first answer; answer i uses seed + i")
  p.add_argument("--system", help="system prompt (default: none)")
  add_loading_args(p)
  return p


def check_args(args: argparse.Namespace) -> None:
  """UsageError naming the option, before anything is loaded."""
  check_generation_args(args)
  if args.query is not None and not args.query.strip():
    raise UsageError("--query is empty; give a question, or leave --query out for an interactive chat")
  if args.video is not None and not os.path.exists(args.video):
    raise UsageError(f"--video {args.video}: no such file or folder")
  from kangaroo_jax.inference.sampling import SamplingConfig

  try:  # SamplingConfig holds the rules; its messages start with the field, here spelt as the option
    SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
  except ValueError as e:
    field, _, rest = str(e).partition(" ")
    raise UsageError(f"--{field.replace('_', '-')} {rest}") from None


def _phase_printer():
  """Prints one stderr line per startup phase for a person watching (stdin or stderr a terminal), else nothing."""
  watched = sys.stdin.isatty() or sys.stderr.isatty()
  return lambda msg: print(msg, file=sys.stderr, flush=True) if watched else None


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    check_args(args)
    say = _phase_printer()
    cache_dir = compile_cache.enable()  # before the first compile, which opens the cache
    say(f"loading weights from {args.ckpt_dir}...")
    model, tokenizer, scope = load_from_args(args)
    with scope:
      return _session(args, model, tokenizer, say, cache_dir)
  except INPUT_ERRORS as e:
    return report_input_error(e)
  except KeyboardInterrupt:
    sys.stdout.write("\n")  # ends a half-streamed answer or the prompt line
    sys.stdout.flush()
    return EXIT_INTERRUPTED


def _read_question(interactive: bool, editing: bool) -> str | None:
  """The next line without its newline; None at the end of input (Ctrl-D)."""
  if editing:
    try:
      return input("you> ")  # readline's line editing and history (stdin and stdout are terminals)
    except EOFError:
      sys.stdout.write("\n")
      return None
  if interactive:
    sys.stdout.write("you> ")  # not input(): without readline it would write the prompt to stderr
    sys.stdout.flush()
  line = sys.stdin.readline()
  return line if line else None


def _enable_line_editing() -> bool:
  """Whether input() now edits lines: readline is importable and stdout is a terminal too."""
  try:
    import readline  # noqa: F401  (importing it is what gives input() editing and history)
  except ImportError:  # Python built without it (some minimal images)
    return False
  return sys.stdout.isatty()


def _session(args, model, tokenizer, say, cache_dir) -> int:
  from kangaroo_jax.inference.chat import Chat, PromptTooLong

  chat = Chat(
      model,
      tokenizer,
      prefill_chunk=args.prefill_chunk,
      system=args.system,
      max_positions=args.max_positions,
      warn=lambda s: print(f"warning: {s}", file=sys.stderr, flush=True),
  )
  if args.video is not None:
    say(f"reading {args.video} ({args.num_frames} frames)...")
    chat.load_visual(args.video, args.num_frames)  # a broken video fails now, not at the first question
  opts = dict(
      num_frames=args.num_frames,
      max_new_tokens=args.max_new_tokens,
      do_sample=not args.greedy,
      temperature=args.temperature,
      top_p=args.top_p,
      top_k=args.top_k,
  )
  compiled = []

  def ask(query, history, turn):
    if not compiled:
      compiled.append(True)
      later = f"later runs load the compiled programs from {cache_dir}" if cache_dir else "the compile cache is off"
      say(f"compiling (the first answer waits for it; {later})...")
    write = lambda s: (sys.stdout.write(s), sys.stdout.flush())  # noqa: E731
    _, history = chat.chat(args.video, query, history, seed=args.seed + turn, stream=write, **opts)
    write("\n")
    return history

  if args.query is not None:
    ask(args.query, None, 0)
    return 0
  interactive = sys.stdin.isatty()
  editing = interactive and _enable_line_editing()
  if interactive:
    say("ready: type a question, /help for the commands")
  reply = lambda s: print(s, flush=True) if interactive else None  # noqa: E731  (scripts get answers only)
  history, turn = None, 0
  while True:
    line = _read_question(interactive, editing)
    if line is None:
      return 0
    query = line.strip()
    if not query:
      continue
    if query in QUIT:
      return 0
    if query == "/help":
      print(commands_text(), file=sys.stdout if interactive else sys.stderr, flush=True)
      continue
    if query == "/reset":
      history = None
      reply("history cleared")
      continue
    if _COMMAND_WORD.match(query):
      print(f"error: unknown command {query}; /help lists the commands", file=sys.stderr, flush=True)
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
