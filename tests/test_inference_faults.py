"""Bad input to the inference CLIs (issue 14): one `error:` line and exit 2, never a traceback; a bad
video or an over-long prompt fails its evaluate item only; Ctrl-C exits 130 quietly and evaluate resumes."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from kangaroo_jax import chat as chat_cli
from kangaroo_jax import evaluate as ev
from kangaroo_jax.data.prompt import encode_conversation
from kangaroo_jax.inference.chat import Chat, PromptTooLong
from kangaroo_jax.pretrained import CONFIG_FILE, CheckpointError, from_pretrained, save_pretrained
from kangaroo_jax.tokenizer import TokenizerError, load_tokenizer
from tests.test_evaluate import NUM_FRAMES, VIDEOMME, answering
from tests.test_inference_chat import ROOT, tiny_config, tiny_tokenizer_dir, write_video
from tests.test_tokenizer import build_bpe_tokenizer

FLAGS = ["--num-frames", str(NUM_FRAMES), "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  d = tmp_path_factory.mktemp("faults")
  tok_dir = tiny_tokenizer_dir(str(d / "tok"))
  tok = load_tokenizer(tok_dir)
  model = answering(tok, "B")
  ckpt = save_pretrained(model, tok_dir, str(d / "ckpt"))
  videos = d / "videos"
  videos.mkdir()
  write_video(str(videos / "clip.mp4"))
  (videos / "broken.mp4").write_bytes(b"\x00not a video" * 50)
  items = [  # one good, one missing, one undecodable, one good: the run must reach the last one
      {
          "question_id": "good-1",
          "video": "clip.mp4",
          "question": "How many cars?",
          "options": ["one", "two"],
          "answer": "B",
      },
      {
          "question_id": "missing",
          "video": "gone.mp4",
          "question": "How many cars?",
          "options": ["one", "two"],
          "answer": "B",
      },
      {
          "question_id": "broken",
          "video": "broken.mp4",
          "question": "How many cars?",
          "options": ["one", "two"],
          "answer": "A",
      },
      {
          "question_id": "good-2",
          "video": "clip",
          "question": "How many people?",
          "options": ["one", "two"],
          "answer": "A",
      },
  ]
  bench = d / "bench.json"
  bench.write_text(json.dumps(items))
  videomme = d / "videomme.json"
  videomme.write_text(json.dumps(VIDEOMME))
  return dict(
      dir=d,
      tok=tok,
      tok_dir=tok_dir,
      model=model,
      ckpt=ckpt,
      videos=str(videos),
      bench=str(bench),
      videomme=str(videomme),
  )


@pytest.fixture(scope="module")
def chat(assets):
  return Chat(assets["model"], assets["tok"])


def _main(cli, args) -> int:
  try:
    return cli.main(args)
  except KeyboardInterrupt:  # would otherwise end the whole test session
    pytest.fail("KeyboardInterrupt escaped the CLI's main()")


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


# --- item 6: a missing or undecodable video fails its item, the run goes on, reruns do not retry ------------------


def test_bad_videos_are_recorded_as_failed_and_the_run_goes_on(assets, chat, tmp_path):
  items = ev.load_benchmark(assets["bench"])
  calls = []
  base = ev.model_answer_fn(chat, num_frames=NUM_FRAMES, max_new_tokens=4)

  def answer(item, video, prompt):
    calls.append(item.id)
    return base(item, video, prompt)

  out = str(tmp_path / "run")
  summary = ev.evaluate(answer, items, assets["videos"], out)
  preds = ev.read_predictions(os.path.join(out, ev.PREDICTIONS))
  assert list(preds) == ["good-1", "missing", "broken", "good-2"]
  assert "gone.mp4" in preds["missing"]["error"] and "not found" in preds["missing"]["error"]
  assert "broken.mp4" in preds["broken"]["error"]
  assert preds["good-1"]["choice"] == "B" and "error" not in preds["good-1"]
  assert summary["overall"] == {
      "accuracy": 25.0,
      "correct": 1,
      "total": 4,
      "failed": 2,
      "answered": 2,
      "accuracy_answered": 50.0,
  }
  assert summary["complete"] and summary["failed_per_task"] == {"all": 2}
  with open(os.path.join(out, ev.RESULTS)) as f:
    assert json.load(f) == summary
  assert "2 failed items" in ev.table(summary)

  # A rerun keeps failed items as failed: nothing runs again, the summary is the same.
  calls.clear()
  assert ev.evaluate(answer, items, assets["videos"], out) == summary and calls == []
  # --retry-failed runs them once more; fixed videos are then answered, still-broken ones fail again.
  write_video(os.path.join(assets["videos"], "gone.mp4"))
  try:
    again = ev.evaluate(answer, items, assets["videos"], out, retry_failed=True)
  finally:
    os.remove(os.path.join(assets["videos"], "gone.mp4"))
  assert calls == ["missing", "broken"]
  assert again["overall"]["failed"] == 1 and again["overall"]["answered"] == 3


def test_foreign_predictions_file_is_refused_and_left_alone(assets, capsys, tmp_path):
  out = tmp_path / "mine"
  out.mkdir()
  text = '{"note": "my own results"}\n{"id": 3, "choice": "A", "correct": true}\n'
  (out / ev.PREDICTIONS).write_text(text)
  rc = ev.main(
      [assets["ckpt"], "--benchmark", assets["bench"], "--video-root", assets["videos"], "--output", str(out), *FLAGS]
  )
  assert rc == 2
  assert "predictions.jsonl: line 1 is not a prediction record" in _one_error_line(capsys)
  assert (out / ev.PREDICTIONS).read_text() == text and not (out / ev.RESULTS).exists()


# --- item 7: tokenizer ids beyond the model's vocab, prompts past the position limit ---------------------------------


def _checkpoint_without_weights(folder, cfg) -> str:
  """kangaroo_config.json and an empty state/: any attempt to read weights fails, so a tokenizer
  problem reported instead proves that the tokenizer was checked first."""
  os.makedirs(os.path.join(folder, "state"))
  with open(os.path.join(folder, CONFIG_FILE), "w") as f:
    f.write(cfg.to_json())
  return str(folder)


def test_tokenizer_with_ids_beyond_the_vocab_is_refused_before_the_weights(assets, capsys, tmp_path):
  ckpt = _checkpoint_without_weights(tmp_path / "ckpt", tiny_config(assets["tok"]))
  build_bpe_tokenizer(ckpt, llama3_ids=True)  # specials at 128000.. against a 360-row embedding
  with pytest.raises(
      TokenizerError,
      match=r"tokenizer.json: the tokenizer has ids up to 128009 \(128010 ids\) "
      r"but the model's vocabulary \(llm.vocab_size in .*\) has only 360 rows",
  ):
    from_pretrained(ckpt)
  assert chat_cli.main([ckpt, "--query", "hi"]) == 2
  assert "128010 ids" in _one_error_line(capsys)
  with pytest.raises(TokenizerError, match="llm.vocab_size of the model"):  # a tokenizer passed by hand
    Chat(assets["model"], load_tokenizer(ckpt))


def test_corrupt_tokenizer_json_is_reported_before_the_weights(assets, capsys, tmp_path):
  ckpt = _checkpoint_without_weights(tmp_path / "ckpt", tiny_config(assets["tok"]))
  with open(os.path.join(ckpt, "tokenizer.json"), "w") as f:
    f.write('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0')  # cut short
  assert chat_cli.main([ckpt, "--query", "hi"]) == 2
  assert _one_error_line(capsys).startswith(f"error: {ckpt}/tokenizer.json: not a readable JSON file")
  with open(os.path.join(ckpt, "tokenizer.json"), "w") as f:
    json.dump({"version": "1.0"}, f)  # valid JSON, not a tokenizer
  with pytest.raises(TokenizerError, match=r"tokenizer.json: not a valid tokenizer.json \(Model missing"):
    from_pretrained(ckpt)
  os.remove(os.path.join(ckpt, "tokenizer.json"))
  with open(os.path.join(ckpt, "tokenizer.model"), "wb") as f:
    f.write(b"garbage" * 10)
  with pytest.raises(TokenizerError, match="tokenizer.model: not a valid sentencepiece model"):
    from_pretrained(ckpt)


def _prompt(tok, query: str) -> np.ndarray:
  return encode_conversation(
      tok,
      [{"role": "user", "content": "<video>" + query}],
      num_groups=NUM_FRAMES // 2,
      tokens_per_group=4,
      visual_token_id=-200,
      add_generation_prompt=True,
  ).input_ids


def test_prompt_past_the_position_limit(assets):
  tok, model = assets["tok"], assets["model"]
  video = os.path.join(assets["videos"], "clip.mp4")
  n = len(_prompt(tok, "What happens?"))
  limited = Chat(model, tok, max_positions=n - 1)
  with pytest.raises(PromptTooLong, match=rf"the prompt is {n} tokens \(8 visual\), more than the {n - 1} positions"):
    limited.chat(video, "What happens?", num_frames=NUM_FRAMES, max_new_tokens=4, do_sample=False)
  # Answers stop at the limit: the i-th new token is fed back at position n + i - 1.
  assert Chat(model, tok, max_positions=n + 2).check_length(_prompt(tok, "What happens?"), 100) == 3
  # Without a hard limit, crossing llm.max_position_embeddings only warns, once.
  warned = []
  free = Chat(model, tok, warn=warned.append)
  limit = model.cfg.llm.max_position_embeddings
  assert free.check_length(np.zeros(limit - 10, np.int32), 50) == 50
  assert free.check_length(np.zeros(limit + 5, np.int32), 50) == 50
  assert len(warned) == 1 and f"llm.max_position_embeddings = {limit}" in warned[0]


def test_evaluate_records_over_long_prompts_as_failed(assets, capsys, tmp_path):
  out = str(tmp_path / "run")
  rc = ev.main(
      [
          assets["ckpt"],
          "--benchmark",
          assets["videomme"],
          "--video-root",
          assets["videos"],
          "--output",
          out,
          "--max-positions",
          "30",
          *FLAGS,
      ]
  )
  assert rc == 0
  preds = ev.read_predictions(os.path.join(out, ev.PREDICTIONS))
  assert len(preds) == 3 and all("more than the 30 positions allowed" in p["error"] for p in preds.values())
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["overall"]["failed"] == 3 and summary["overall"]["accuracy"] == 0.0
  assert summary["overall"]["accuracy_answered"] is None


def test_interactive_chat_reports_an_over_long_turn_and_continues(assets, capsys, monkeypatch):
  tok = assets["tok"]
  q = "What happens?"
  limit = len(_prompt(tok, q)) + 3  # the first turn fits; the follow-up (first turn + answer + question) does not
  lines = iter([f"{q}\n", "And then?\n", "/reset\n", f"{q}\n", "/quit\n"])
  monkeypatch.setattr(sys, "stdin", _FakeStdin(lambda: next(lines)))
  args = [
      assets["ckpt"],
      "--video",
      os.path.join(assets["videos"], "clip.mp4"),
      "--greedy",
      "--max-positions",
      str(limit),
      *FLAGS,
  ]
  assert chat_cli.main(args) == 0
  captured = capsys.readouterr()
  assert captured.out == "B\nB\n"
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: the prompt is") and "/reset" in err[0]


# --- item 8: wrong paths and option values: exit 2, one line naming the path / option -------------------------------


def test_wrong_checkpoint_paths(assets, capsys, tmp_path):
  from train.checkpoint import Checkpointer
  from train.config import CheckpointConfig

  import jax.numpy as jnp

  class _Iterator:

    def get_state(self):
      return {"position": 0}

  workdir = tmp_path / "workdir"
  ckpts = Checkpointer(str(workdir / "checkpoints"), CheckpointConfig(async_save=False))
  ckpts.save(7, {"x": jnp.zeros(2)}, _Iterator(), {"stage": "t"}, 1.0)
  ckpts.close()
  step_dir = str(workdir / "checkpoints" / "7")
  hf = tmp_path / "released"
  hf.mkdir()
  (hf / "config.json").write_text("{}")
  (hf / "model.safetensors").write_bytes(b"")
  a_file = tmp_path / "notes.txt"
  a_file.write_text("x")
  bad_json = tmp_path / "bad_cfg"
  bad_json.mkdir()
  (bad_json / CONFIG_FILE).write_text('{"llm": ')
  bad_key = tmp_path / "bad_key"
  bad_key.mkdir()
  (bad_key / CONFIG_FILE).write_text('{"llm": {"vocab_sise": 10}}')
  no_state = tmp_path / "no_state"
  no_state.mkdir()
  (no_state / CONFIG_FILE).write_text(assets["model"].cfg.to_json())
  for name in os.listdir(assets["tok_dir"]):
    (no_state / name).write_bytes(open(os.path.join(assets["tok_dir"], name), "rb").read())
  empty_state = tmp_path / "empty_state"
  empty_state.mkdir()
  for name in os.listdir(no_state):
    (empty_state / name).write_bytes((no_state / name).read_bytes())
  (empty_state / "state").mkdir()
  cases = {
      step_dir: f"{step_dir}: is a training checkpoint (WORKDIR/checkpoints/N), not a from_pretrained folder; "
      f"pass the run's export {workdir}/export once it exists",
      str(workdir): f"{workdir}: is a training run folder; pass the run's export {workdir}/export",
      str(workdir / "checkpoints"): "is the trainer's checkpoints folder",
      str(tmp_path / "nowhere"): "nowhere: no such folder; expected a from_pretrained folder",
      str(a_file): "notes.txt: is a file",
      # A released folder loads directly; this one's config.json is empty.
      str(hf): f"{hf}/config.json: required field 'hidden_size' is missing",
      str(bad_json): f"{CONFIG_FILE}: not a readable JSON file",
      str(bad_key): f"{CONFIG_FILE}: unknown config key(s) ['llm.vocab_sise']",
      str(no_state): f"{no_state}/state: missing; expected the Orbax weights",
      str(empty_state): f"{empty_state}/state: cannot restore the weights",
  }
  for path, want in cases.items():
    assert chat_cli.main([path, "--query", "hi"]) == 2, path
    assert want in _one_error_line(capsys), path
  with pytest.raises(CheckpointError, match="is a training checkpoint"):
    from_pretrained(step_dir)
  # A training checkpoint whose run has finished points at the export that exists.
  save_pretrained(assets["model"], assets["tok_dir"], str(workdir / "export"))
  assert chat_cli.main([step_dir, "--query", "hi"]) == 2
  assert _one_error_line(capsys).endswith(f"pass the run's export {workdir}/export")


@pytest.mark.parametrize(
    "flags, want",
    [
        (["--num-frames", "0"], "--num-frames must be a positive even number (frames are encoded in pairs), got 0"),
        (["--num-frames", "-4"], "--num-frames must be a positive even number"),
        (["--num-frames", "3"], "--num-frames must be a positive even number (frames are encoded in pairs), got 3"),
        (["--query", ""], "--query is empty"),
        (["--query", "   "], "--query is empty"),
        (["--video", "/nonexistent/v.mp4"], "--video /nonexistent/v.mp4: no such file or folder"),
        (
            ["--context-parallel", "3", "--tensor-parallel", "4"],
            "a mesh of context=3 x tensor=4 " "(--context-parallel x --tensor-parallel) needs 12 devices; 8 available",
        ),
        (["--context-parallel", "0"], "context (--context-parallel) must be an int >= 1, got 0"),
        (["--tensor-parallel", "-1"], "tensor (--tensor-parallel) must be an int >= 1, got -1"),
        (["--prefill-chunk", "4"], "--prefill-chunk must be >= 16"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
    ],
)
def test_chat_bad_options(assets, capsys, flags, want):
  args = [assets["ckpt"], "--query", "hi", *flags] if "--query" not in flags else [assets["ckpt"], *flags]
  assert chat_cli.main(args) == 2
  assert want in _one_error_line(capsys)


@pytest.mark.parametrize(
    "flags, want",
    [
        (["--num-frames", "5"], "--num-frames must be a positive even number"),
        (["--video-root", "/nonexistent"], "--video-root /nonexistent: no such folder"),
        (["--benchmark", "/nonexistent.json"], "/nonexistent.json: no such benchmark file"),
        (["--max-items", "-1"], "--max-items must be >= 0"),
        (["--context-parallel", "16"], "needs 16 devices; 8 available"),
    ],
)
def test_evaluate_bad_options(assets, capsys, tmp_path, flags, want):
  args = [
      assets["ckpt"],
      "--benchmark",
      assets["bench"],
      "--video-root",
      assets["videos"],
      "--output",
      str(tmp_path / "out"),
      *FLAGS,
      *flags,
  ]
  assert ev.main(args) == 2
  assert want in _one_error_line(capsys)
  assert not os.path.exists(tmp_path / "out")  # nothing written for a run that never started


# --- item 8: Ctrl-C ------------------------------------------------------------------------------------------------


class _FakeStdin:

  def __init__(self, readline):
    self.readline = readline

  def isatty(self):
    return False


def test_ctrl_c_in_interactive_chat_exits_quietly(assets, capsys, monkeypatch):
  answered = []

  def readline():
    if answered:
      raise KeyboardInterrupt  # Ctrl-C while waiting for the second question
    answered.append(True)
    return "What happens?\n"

  monkeypatch.setattr(sys, "stdin", _FakeStdin(readline))
  rc = _main(chat_cli, [assets["ckpt"], "--video", os.path.join(assets["videos"], "clip.mp4"), "--greedy", *FLAGS])
  captured = capsys.readouterr()
  assert rc == 130 and captured.out == "B\n\n" and captured.err == ""


def test_ctrl_c_in_evaluate_saves_progress_and_says_how_to_resume(assets, capsys, monkeypatch, tmp_path):
  real = ev.model_answer_fn

  def interrupted_after_one(chat, **kw):
    answer, calls = real(chat, **kw), []

    def fn(item, video, prompt):
      if calls:
        raise KeyboardInterrupt
      calls.append(item.id)
      return answer(item, video, prompt)

    return fn

  monkeypatch.setattr(ev, "model_answer_fn", interrupted_after_one)
  out = str(tmp_path / "run")
  args = [assets["ckpt"], "--benchmark", assets["videomme"], "--video-root", assets["videos"], "--output", out, *FLAGS]
  assert _main(ev, args) == 130
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert err.strip().splitlines()[-1] == (
      f"interrupted: 1 items are saved in {out}/{ev.PREDICTIONS}; " "run the same command again to resume"
  )
  with open(os.path.join(out, ev.RESULTS)) as f:
    partial = json.load(f)
  assert partial["overall"]["total"] == 1 and not partial["complete"]
  monkeypatch.setattr(ev, "model_answer_fn", real)
  assert ev.main(args) == 0
  assert "resuming: 1 of 3 items already predicted" in capsys.readouterr().err
  assert len(ev.read_predictions(os.path.join(out, ev.PREDICTIONS))) == 3


def test_sigint_to_a_running_evaluate_process(assets, tmp_path):
  """A real Ctrl-C (SIGINT) to `python -m kangaroo_jax.evaluate` once it has answered its first item."""
  item = {"video": "clip.mp4", "question": "How many cars?", "options": ["one", "two"], "answer": "B"}
  bench = tmp_path / "long.json"
  bench.write_text(json.dumps([dict(item, id=f"q{i}") for i in range(500)]))
  out = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  # SIGINT -> KeyboardInterrupt set explicitly: a shell running tests in the background may hand its
  # children SIGINT ignored, and then Python would not install its handler.
  launch = (
      "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
      "sys.argv[0] = 'evaluate'; runpy.run_module('kangaroo_jax.evaluate', run_name='__main__')"
  )
  proc = subprocess.Popen(
      [
          sys.executable,
          "-c",
          launch,
          assets["ckpt"],
          "--benchmark",
          str(bench),
          "--video-root",
          assets["videos"],
          "--output",
          out,
          *FLAGS,
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  try:
    seen = []
    for line in proc.stderr:
      seen.append(line)
      if line.startswith("[1/500] q0:"):
        proc.send_signal(signal.SIGINT)
        break
    rest = proc.communicate(timeout=120)[1]
  finally:
    if proc.poll() is None:
      proc.kill()
  err = "".join(seen) + rest
  assert proc.returncode == 130, err[-2000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  assert err.strip().splitlines()[-1].endswith("; run the same command again to resume")
  saved = ev.read_predictions(os.path.join(out, ev.PREDICTIONS))
  assert 1 <= len(saved) < 500 and all(p["choice"] == "B" for p in saved.values())
