"""The inference CLIs for a person (issue 15): a second run reads its compiled programs from the persistent
cache, the interactive chat says what it is doing and answers /help, /reset, /quit on a terminal (readline
line editing included), a script piping questions gets only the answers, and every --help option shows its
default. Tiny checkpoint whose answer is always "B" (tests.test_evaluate.answering)."""

import argparse
import importlib.util
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from kangaroo_jax import chat as chat_cli
from kangaroo_jax import compile_cache
from kangaroo_jax import evaluate as ev
from kangaroo_jax.pretrained import save_pretrained
from kangaroo_jax.tokenizer import load_tokenizer
from tests.test_evaluate import answering
from tests.test_inference_chat import ROOT, tiny_tokenizer_dir, write_video

FLAGS = ["--greedy", "--num-frames", "4", "--max-new-tokens", "4"]
HIT, MISS = "Persistent compilation cache hit", "PERSISTENT COMPILATION CACHE MISS"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli_ux")
  tok_dir = tiny_tokenizer_dir(str(d / "tok"))
  ckpt = save_pretrained(answering(load_tokenizer(tok_dir), "B"), tok_dir, str(d / "ckpt"))
  return dict(dir=d, ckpt=ckpt, video=write_video(str(d / "clip.mp4")), cache=str(d / "shared_cache"))


def _env(cache_dir: str, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in (compile_cache.JAX_DIR_ENV, compile_cache.MIN_SECS_ENV)}
  return dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TERM="dumb", **{compile_cache.DIR_ENV: cache_dir}, **extra)


def _cache_entries(folder: str) -> set[str]:
  return {name for _, _, files in os.walk(folder) for name in files if name.endswith("-cache")}


# --- A: the persistent compilation cache ----------------------------------------------------------------------------


def test_cache_folder_rules():
  home = os.path.expanduser("~")
  assert compile_cache.resolve_dir({}) == (os.path.join(home, ".cache", "kangaroo_jax", "jax"), "default")
  assert compile_cache.resolve_dir({"XDG_CACHE_HOME": "/x/c"}) == ("/x/c/kangaroo_jax/jax", "default")
  assert compile_cache.resolve_dir({"XDG_CACHE_HOME": "rel"})[0].startswith(home)  # XDG: relative paths are ignored
  assert compile_cache.resolve_dir({"KANGAROO_JAX_CACHE_DIR": "/mine"}) == ("/mine", "KANGAROO_JAX_CACHE_DIR")
  assert compile_cache.resolve_dir({"KANGAROO_JAX_CACHE_DIR": ""}) == (None, "KANGAROO_JAX_CACHE_DIR")
  both = {"KANGAROO_JAX_CACHE_DIR": "", "JAX_COMPILATION_CACHE_DIR": "/jax"}
  assert compile_cache.resolve_dir(both) == ("/jax", "JAX_COMPILATION_CACHE_DIR")
  assert compile_cache.resolve_dir({}, configured="/set") == ("/set", "JAX_COMPILATION_CACHE_DIR")


def test_enable_in_a_fresh_process(tmp_path):
  """What enable() leaves in jax.config: (returned folder, jax_compilation_cache_dir, min compile seconds)."""
  probe = (
      "import jax; from kangaroo_jax import compile_cache as c; d = c.enable(); "
      "print(d, jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)"
  )

  def run(env):
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split(), done.stderr

  mine = str(tmp_path / "mine")
  assert run(_env(mine))[0] == [mine, mine, str(compile_cache.DEFAULT_MIN_COMPILE_SECS)] and os.path.isdir(mine)
  theirs = str(tmp_path / "theirs")  # JAX's own variables are kept as they are
  assert run(_env(mine, JAX_COMPILATION_CACHE_DIR=theirs, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="3"))[0] == [
      theirs,
      theirs,
      "3.0",
  ]
  assert run(_env(""))[0] == ["None", "None", "1.0"]  # off: JAX's defaults untouched
  # A folder that cannot be made: one warning line, no cache.
  (tmp_path / "file").write_text("x")
  bad = str(tmp_path / "file" / "cache")
  out, err = run(_env(bad))
  assert out == ["None", "None", "1.0"]
  assert len(err.strip().splitlines()) == 1 and bad in err and "running without it" in err, err


def test_second_chat_run_reads_every_program_from_the_cache(assets, tmp_path):
  cache = str(tmp_path / "cache")
  # Threshold 0: every program is written, so the second run must find all of them (no timing-dependent misses).
  env = _env(cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_DEBUG_LOG_MODULES="jax._src.compiler")
  cmd = [
      sys.executable,
      "-m",
      "kangaroo_jax.chat",
      assets["ckpt"],
      "--video",
      assets["video"],
      "--query",
      "What happens?",
      *FLAGS,
  ]
  runs, entries, seconds = [], [], []
  for _ in range(2):
    start = time.monotonic()
    runs.append(subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300))
    seconds.append(time.monotonic() - start)
    assert runs[-1].returncode == 0, runs[-1].stderr[-3000:]
    entries.append(_cache_entries(cache))
  first, second = runs
  assert first.stdout == second.stdout == "B\n"
  assert first.stderr.count(MISS) > 0 and len(entries[0]) > 0
  # The second run compiled nothing: every program came from the cache, no entry was added.
  assert second.stderr.count(MISS) == 0, [ln for ln in second.stderr.splitlines() if MISS in ln][:5]
  assert second.stderr.count(HIT) >= first.stderr.count(MISS) > 0
  assert entries[1] == entries[0]
  print(
      f"chat --query: first run {seconds[0]:.1f} s ({len(entries[0])} programs compiled), "
      f"second {seconds[1]:.1f} s (all from the cache)"
  )


# --- B: the interactive chat ----------------------------------------------------------------------------------------


def _drive_terminal(cmd, env, lines, timeout=120.0):
  """Runs `cmd` with stdin and stdout on a pseudo-terminal, typing each of `lines` once the next `you> ` prompt
  shows. Returns (return code, terminal output, stderr)."""
  master, slave = pty.openpty()
  proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env, cwd=ROOT)
  os.close(slave)
  screen, typed, deadline = b"", 0, time.monotonic() + timeout
  try:
    while time.monotonic() < deadline:
      if typed < len(lines) and screen.count(b"you> ") > typed:
        os.write(master, lines[typed].encode())
        typed += 1
      ready, _, _ = select.select([master], [], [], 0.2)
      if ready:
        try:
          chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
          chunk = b""
        if not chunk and proc.poll() is not None:
          break
        screen += chunk
      elif proc.poll() is not None:
        break
    else:
      proc.kill()
      pytest.fail(
          f"interactive chat did not finish; screen so far: {screen[-2000:]!r}; stderr: "
          f"{proc.stderr.read().decode()[-2000:]}"
      )
    rc = proc.wait(timeout=30)
  finally:
    os.close(master)
  return rc, screen.decode(errors="replace").replace("\r\n", "\n"), proc.stderr.read().decode()


def test_interactive_chat_on_a_terminal(assets):
  editing = importlib.util.find_spec("readline") is not None
  # "reset", Ctrl-A (readline: to the start of the line), "/": readline turns it into /reset; without
  # readline it would stay "reset\x01/" and be asked as a question.
  reset = "reset\x01/\n" if editing else "/reset\n"
  cmd = [sys.executable, "-m", "kangaroo_jax.chat", assets["ckpt"], "--video", assets["video"], *FLAGS]
  rc, screen, err = _drive_terminal(
      cmd, _env(assets["cache"]), ["/help\n", reset, "What happens?\n", "/nope\n", "/quit\n"]
  )
  assert rc == 0, err[-3000:]
  assert chat_cli.commands_text() in screen
  assert "history cleared" in screen and "kangaroo> B\n" in screen
  assert screen.count("kangaroo> ") == 1  # neither /reset nor /nope reached the model
  phases = ["loading weights from", "reading " + assets["video"], "ready: type a question", "compiling ("]
  at = [err.find(p) for p in phases]
  assert -1 not in at and at == sorted(at), err
  assert "error: unknown command /nope; /help lists the commands" in err


def test_piped_chat_prints_only_answers(assets):
  run = subprocess.run(
      [sys.executable, "-m", "kangaroo_jax.chat", assets["ckpt"], "--video", assets["video"], *FLAGS],
      input="/help\n/reset\nWhat happens?\n/quit\nnever asked\n",
      capture_output=True,
      text=True,
      env=_env(assets["cache"]),
      cwd=ROOT,
      timeout=300,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout == "B\n"  # one answer: /help and /reset are commands, nothing after /quit is read
  assert run.stderr.strip() == chat_cli.commands_text().strip()  # /help goes to stderr; no phase lines in a pipe


# --- B: --help of chat and evaluate -------------------------------------------------------------------------------


def _option_entries(help_text: str) -> dict[str, str]:
  """{first option string: its whole help entry} from the `options:` section of argparse's --help."""
  section = help_text.split("\noptions:\n", 1)[1]
  section = re.split(r"\n\n(?! )", section, maxsplit=1)[0]  # up to the epilog
  entries: dict[str, str] = {}
  for line in section.splitlines():
    if re.match(r"^  -", line):
      current = line.split()[0].rstrip(",")
      entries[current] = line
    else:
      entries[current] += " " + line.strip()
  return entries


@pytest.mark.parametrize("cli", [chat_cli, ev], ids=["chat", "evaluate"])
def test_help_shows_every_default(cli):
  parser = cli._parser()
  text = parser.format_help()
  entries = _option_entries(text)
  options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
  assert sorted(entries) == sorted(["-h"] + [a.option_strings[0] for a in options])
  for action in options:
    entry = " ".join(entries[action.option_strings[0]].split())
    if action.required:
      assert "(required)" in entry, entry
    else:
      assert "(default:" in entry, entry
      if action.default not in (None, False):
        assert f"(default: {action.default})" in " ".join(entry.split()), entry
  if cli is chat_cli:
    for name, _ in chat_cli.COMMANDS:
      assert f"  {name} " in text.split("interactive commands:", 1)[1]
  assert compile_cache.DIR_ENV in text


def test_train_turns_the_cache_on_before_it_starts(tmp_path):
  """`python -m train` sets the cache up after validating its config, before any device work: here the
  workdir is a file, so the run stops with exit 2 right after that, and the cache folder is already there."""
  (tmp_path / "not_a_folder").write_text("x")
  cache = tmp_path / "cache"
  config = os.path.join(ROOT, "configs/stage2_video_pretrain.py") + ":mode=cpu,steps=1"
  workdir = str(tmp_path / "not_a_folder")
  proc = subprocess.run(
      [sys.executable, "-m", "train", "--config", config, "--workdir", workdir],
      cwd=ROOT,
      env=_env(str(cache)),
      capture_output=True,
      text=True,
      timeout=240,
  )
  assert proc.returncode == 2 and "not_a_folder" in proc.stderr, proc.stderr[-2000:]
  assert cache.is_dir()


def test_evaluate_turns_the_cache_on_before_loading(tmp_path):
  """The cache is set up after the options and the benchmark are checked, before the checkpoint is read (here
  a folder that is not a checkpoint, so the run stops right after)."""
  bench = tmp_path / "bench.json"
  bench.write_text('[{"question_id": "q", "video": "v.mp4", "question": "?", "options": ["a", "b"], "answer": "A"}]')
  cache = tmp_path / "cache"
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "kangaroo_jax.evaluate",
          str(tmp_path),
          "--benchmark",
          str(bench),
          "--video-root",
          str(tmp_path),
          "--output",
          str(tmp_path / "out"),
      ],
      cwd=ROOT,
      env=_env(str(cache)),
      capture_output=True,
      text=True,
      timeout=240,
  )
  assert proc.returncode == 2 and proc.stderr.startswith(f"error: {tmp_path}"), proc.stderr[-2000:]
  assert cache.is_dir()
