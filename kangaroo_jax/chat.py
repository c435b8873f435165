"""Chat with a checkpoint about a video or image, streaming the answer as it is generated.

    python -m kangaroo_jax.chat CKPT_DIR --video FILE                 # interactive; /reset, /quit
    python -m kangaroo_jax.chat CKPT_DIR --video FILE --query "..."   # one answer, then exit

CKPT_DIR is a `from_pretrained` folder (a converted release or a trainer export) with tokenizer files.
"""

from __future__ import annotations

import argparse
import sys

from kangaroo_jax.inference.loading import add_loading_args, load_from_args


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


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  loaded = load_from_args(args)
  if loaded is None:
    return 2
  model, tokenizer, scope = loaded
  with scope:
    return _session(args, model, tokenizer)


def _session(args, model, tokenizer) -> int:
  from kangaroo_jax.data.video import VideoError
  from kangaroo_jax.inference.chat import Chat

  chat = Chat(model, tokenizer, prefill_chunk=args.prefill_chunk, system=args.system)
  opts = dict(num_frames=args.num_frames, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)

  def ask(query, history, turn):
    write = lambda s: (sys.stdout.write(s), sys.stdout.flush())  # noqa: E731
    _, history = chat.chat(args.video, query, history, seed=args.seed + turn, stream=write, **opts)
    write("\n")
    return history

  try:
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
      history = ask(query, history, turn)
      turn += 1
  except VideoError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
