"""The lmms-eval plugin: the real lmms-eval 0.7.3 CLI (from the isolated .venv-eval) on locally defined tasks over
generated videos with a tiny checkpoint, checked against our own greedy generation and a plain forward pass.

The CLI tests skip (with the reason) only when .venv-eval is missing; `make test` builds it (`make eval-env`).
"""

import glob
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from kangaroo_jax.data.prompt import encode_conversation
from kangaroo_jax.evaluate import checkpoint_hash
from kangaroo_jax.inference.chat import Chat
from kangaroo_jax.inference.recipes import get_recipe
from kangaroo_jax.lmms_eval_plugin import recipe_prompt
from kangaroo_jax.lmms_eval_plugin.runner import GenerationRequest, Runner, ScoreRequest, cut_at_stop_strings
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.pretrained import from_pretrained, save_pretrained
from kangaroo_jax.tokenizer import load_tokenizer
from tests.test_inference_chat import tiny_config, tiny_tokenizer_dir, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_ENV = os.environ.get("KANGAROO_EVAL_ENV", os.path.join(ROOT, ".venv-eval"))
EVAL_PY = os.path.join(EVAL_ENV, "bin", "python")
LMMS_EVAL = os.path.join(EVAL_ENV, "bin", "lmms-eval")
NUM_FRAMES = 4
LETTERS = "ABCD"
# (frames in the clip, question, options); the 2-frame clip is shorter than NUM_FRAMES (a short video).
ITEMS = [
    (12, "What colour is the car?", ["red", "blue", "green", "black"]),
    (20, "What happens in the video?", ["jumps", "sits", "runs", "sleeps"]),
    (2, "What colour is the fence?", ["red", "blue", "green", "black"]),
    (16, "What is the kangaroo doing?", ["jumps", "eats", "runs", "waits"]),
]
TASK_INSTRUCTION = "Answer with the option's letter from the given choices directly."
RECIPE = "mvbench"
pytestmark = pytest.mark.xdist_group("lmms_eval")  # one worker builds the checkpoint and runs both CLI runs

UTILS = """
def doc_to_visual(doc):
  return [doc["video"]]


def doc_to_text(doc):
  options = "\\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", doc["options"]))
  return f"{doc['question']}\\n{options}\\n{INSTRUCTION}"


def process_results(doc, results):
  return {"exact": float(results[0].strip() == doc["answer_text"])}
"""


def task_yaml(name: str, data_file: str, output_type: str) -> str:
  head = f"""\
    task: {name}
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {data_file}
    test_split: test
    output_type: {output_type}
    doc_to_visual: !function utils.doc_to_visual
    doc_to_text: !function utils.doc_to_text
    """
  if output_type == "generate_until":
    tail = """\
    doc_to_target: answer_text
    generation_kwargs:
      max_new_tokens: 5
      do_sample: false
    process_results: !function utils.process_results
    metric_list:
      - metric: exact
        aggregation: mean
        higher_is_better: true
    """
  else:
    tail = """\
    doc_to_choice: ["A", "B", "C", "D"]
    doc_to_target: answer_index
    metric_list:
      - metric: acc
        aggregation: mean
        higher_is_better: true
    """
  return textwrap.dedent(head) + textwrap.dedent(tail)


def task_text(question, options) -> str:
  return question + "\n" + "\n".join(f"{letter}. {o}" for letter, o in zip(LETTERS, options)) + "\n" + TASK_INSTRUCTION


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  d = tmp_path_factory.mktemp("lmms")
  tok_dir = tiny_tokenizer_dir(str(d / "tok"))
  tokenizer = load_tokenizer(tok_dir)
  ckpt = save_pretrained(Kangaroo(tiny_config(tokenizer), rngs=nnx.Rngs(3)), tok_dir, str(d / "ckpt"))
  videos = []
  for i, (frames, _, _) in enumerate(ITEMS):
    videos.append(write_video(str(d / f"clip{i}.mp4"), frames=frames))
  model, tok = from_pretrained(ckpt)
  return dict(dir=d, ckpt=ckpt, videos=videos, model=model, tok=tok, chat=Chat(model, tok))


def forward_loglikelihood(assets, context: str, continuation: str, video: str) -> tuple[float, bool]:
  """log P(continuation | prompt) from one plain forward pass over prompt + continuation (no KV cache)."""
  model, tok, chat = assets["model"], assets["tok"], assets["chat"]
  _, frames, timestamps = chat.load_visual(video, NUM_FRAMES)
  f, h, w = frames.shape[1:4]
  ids = encode_conversation(
      tok,
      [{"role": "user", "content": "<video>" + context}],
      num_groups=f // model.cfg.projector.frames_per_group,
      tokens_per_group=model.visual_tokens_per_frame_group(h, w),
      visual_token_id=model.cfg.visual_token_id,
      add_generation_prompt=True,
  ).input_ids
  cont = tok.encode(continuation)
  full = np.concatenate([ids, np.asarray(cont, np.int32)])[None]
  logp = np.asarray(jax.nn.log_softmax(model(full, frames, timestamps), axis=-1))[0]
  rows = logp[len(ids) - 1 : len(ids) - 1 + len(cont)]
  greedy = all(rows[i].argmax() == t for i, t in enumerate(cont))
  return float(sum(rows[i, t] for i, t in enumerate(cont))), bool(greedy)


# --- the harness-independent runner (main environment) ---------------------------------------------------------


def test_runner_loglikelihood_matches_a_plain_forward_pass(assets):
  runner = Runner(assets["ckpt"], num_frames=NUM_FRAMES, model_and_tokenizer=(assets["model"], assets["tok"]))
  _, question, options = ITEMS[0]
  context = task_text(question, options)
  conts = [" A", " B", " blue car", " D"]
  got = runner.loglikelihood([ScoreRequest(context, c, assets["videos"][0]) for c in conts])
  for c, (logp, greedy) in zip(conts, got):
    want_logp, want_greedy = forward_loglikelihood(assets, context, c, assets["videos"][0])
    assert abs(logp - want_logp) < 1e-3 * max(1.0, abs(want_logp)), (c, logp, want_logp)
    assert greedy == want_greedy
  assert runner.stats["answered"] == len(conts)


def test_runner_batches_equal_single_answers_and_count_short_videos(assets):
  runner = Runner(
      assets["ckpt"], num_frames=NUM_FRAMES, batch_size=3, model_and_tokenizer=(assets["model"], assets["tok"])
  )
  requests = [
      GenerationRequest([{"role": "user", "content": task_text(q, o)}], video, max_new_tokens=6)
      for (_, q, o), video in zip(ITEMS, assets["videos"])
  ]
  requests.append(GenerationRequest([{"role": "user", "content": "What happens in the video?"}], None, 6))
  requests.append(GenerationRequest([{"role": "user", "content": "q"}], str(assets["dir"] / "missing.mp4"), 6))
  from kangaroo_jax.data.video import VideoError

  got = runner.generate(requests, errors=(VideoError, OSError))
  for req, text in zip(requests[:5], got):
    content = req.messages[0]["content"]
    want, _ = assets["chat"].chat(req.visual, content, num_frames=NUM_FRAMES, max_new_tokens=6, do_sample=False)
    assert text == want, content
  assert got[5] is None
  assert runner.stats == {
      "answered": 5,
      "failed": 1,
      "short_videos": 1,
      "recipe_rendered": 0,
      "recipe_passthrough": 0,
      "recipe_dropped_text": 0,
  }
  with pytest.raises(ValueError, match="num_frames must be an even integer"):
    Runner(assets["ckpt"], num_frames=3, model_and_tokenizer=(assets["model"], assets["tok"]))


def test_recipe_render_and_stop_strings():
  videomme = get_recipe("videomme")
  # lmms-eval's videomme text: its own instruction line, the question, "A. ..." options, its answer cue.
  text = (
      "Select the best answer to the following multiple-choice question based on the video and the subtitles."
      "\nHow many cars?\nA. one\nB. two\nC. three\nThe best answer is:"
  )
  assert recipe_prompt.render(videomme, text) == (
      videomme.format_prompt("How many cars?", ["one", "two", "three"]),
      True,
      1,
  )
  mvbench = get_recipe("mvbench")
  # lmms-eval's mvbench text: "Question:" without a space, an "Option:" header, "(A) ..." options.
  rendered = recipe_prompt.render(mvbench, "Question:Why?\nOption:\n(A) x\n(B) y\nPick one.")
  assert rendered == (mvbench.format_prompt("Why?", ["x", "y"]), True, 0)
  assert recipe_prompt.render(videomme, "Subtitles: hi\nthere\nIntro.\nQ?\nA. a\nB. b")[2] == 3
  assert recipe_prompt.render(videomme, "Describe the video.") == ("Describe the video.", False, 0)
  assert recipe_prompt.render(videomme, "B. starts at B\nC. no A") == ("B. starts at B\nC. no A", False, 0)
  assert recipe_prompt.render(videomme, "A. no question\nB. above") == ("A. no question\nB. above", False, 0)
  assert cut_at_stop_strings("B. two\n\nmore", ["\n\n", "."]) == "B"


def test_import_kangaroo_jax_loads_no_lmms_eval():
  code = (
      "import sys, kangaroo_jax, kangaroo_jax.lmms_eval_plugin, kangaroo_jax.lmms_eval_plugin.runner; "
      "sys.exit(1 if any(m.split('.')[0] == 'lmms_eval' for m in sys.modules) else 0)"
  )
  assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


# --- the real lmms-eval CLI (isolated environment) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_env():
  """Skips (saying why) before any checkpoint is built when the isolated lmms-eval environment is missing."""
  if not os.path.exists(LMMS_EVAL):
    reason = f"the lmms-eval environment is missing ({LMMS_EVAL}); build it with `make eval-env`"
    print(reason)
    pytest.skip(reason)


def _run_cli(cmd: list[str], workdir, timeout: int = 300, expect: int = 0) -> subprocess.CompletedProcess:
  env = dict(
      os.environ,
      HF_DATASETS_OFFLINE="1",
      HF_HUB_OFFLINE="1",
      TRANSFORMERS_OFFLINE="1",
      HF_HOME=str(workdir / "hf"),
      JAX_PLATFORMS="cpu",
      JAX_DEFAULT_MATMUL_PRECISION="highest",
      WANDB_MODE="disabled",
      TOKENIZERS_PARALLELISM="false",
  )
  env.pop("PYTHONPATH", None)  # the eval env resolves its own packages (PyAV 15), not the main env's
  proc = subprocess.run(cmd, cwd=str(workdir), env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == expect, f"{' '.join(cmd)}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
  return proc


def _results(output_path) -> tuple[dict, dict]:
  results = glob.glob(str(output_path / "**" / "*_results.json"), recursive=True)
  assert len(results) == 1, results
  with open(results[0]) as f:
    summary = json.load(f)
  samples = {}
  for path in glob.glob(str(output_path / "**" / "*_samples_*.jsonl"), recursive=True):
    with open(path) as f:
      for line in f:
        rec = json.loads(line)
        samples[rec["doc_id"]] = rec
  return summary, samples


def _metric(summary: dict, task: str, name: str) -> float:
  block = summary["results"][task]
  return next(v for k, v in block.items() if k.split(",")[0] == name)


def _write_task(assets, name: str, output_type: str, docs: list[dict]):
  d = assets["dir"] / f"tasks_{name}"
  d.mkdir()
  data = d / "items.jsonl"
  data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
  (d / "utils.py").write_text(UTILS.replace("{INSTRUCTION}", TASK_INSTRUCTION))
  (d / f"{name}.yaml").write_text(task_yaml(name, str(data), output_type))
  return d


def test_lmms_eval_cli_generate_until_with_recipe(eval_env, assets):
  """Chat model, batched (--batch_size 2), recipe=mvbench with num_frames overridden; the known answers are
  our own greedy answers for items 0 and 2 and something else for 1 and 3, so the metric must be exactly 0.5."""
  recipe = get_recipe(RECIPE).replace(num_frames=NUM_FRAMES)
  ours = []
  for (_, q, o), video in zip(ITEMS, assets["videos"]):
    text, _ = assets["chat"].chat(
        video, recipe.format_prompt(q, o), num_frames=NUM_FRAMES, max_new_tokens=recipe.max_new_tokens, do_sample=False
    )
    ours.append(text)
  docs = [
      {"video": video, "question": q, "options": o, "answer_text": text if i % 2 == 0 else text + " (not this)"}
      for i, ((_, q, o), video, text) in enumerate(zip(ITEMS, assets["videos"], ours))
  ]
  include = _write_task(assets, "kj_local_gen", "generate_until", docs)
  out = assets["dir"] / "out_gen"
  _run_cli(
      [
          EVAL_PY,
          "-m",
          "kangaroo_jax.lmms_eval_plugin",
          "--model",
          "kangaroo_jax",
          "--model_args",
          f"pretrained={assets['ckpt']},recipe={RECIPE},num_frames={NUM_FRAMES}",
          "--tasks",
          "kj_local_gen",
          "--include_path",
          str(include),
          "--batch_size",
          "2",
          "--output_path",
          str(out),
          "--log_samples",
      ],
      assets["dir"],
  )
  summary, samples = _results(out)
  assert sorted(samples) == list(range(len(ITEMS)))
  for i, text in enumerate(ours):
    assert samples[i]["filtered_resps"] == text, i
  assert _metric(summary, "kj_local_gen", "exact") == 0.5
  prov = summary["kangaroo_jax"]
  assert prov["harness"] == {"name": "lmms-eval", "version": "0.7.3"}
  assert prov["recipe"]["name"] == RECIPE and prov["recipe"]["num_frames"] == NUM_FRAMES
  assert prov["recipe_overrides"] == {"num_frames": NUM_FRAMES}
  assert prov["model_class"].endswith(".KangarooJax")
  assert prov["checkpoint"]["sha256"] == checkpoint_hash(assets["ckpt"])["sha256"]
  assert prov["counts"] == {
      "answered": 4,
      "failed": 0,
      "short_videos": 1,
      "recipe_rendered": 4,
      "recipe_passthrough": 0,
      "recipe_dropped_text": 0,
  }


def test_lmms_eval_cli_multiple_choice_loglikelihood(eval_env, assets):
  """`lmms-eval --force_simple` on an output_type multiple_choice task. lmms-eval's models hand it the loss and it
  takes the argmin, so each option's value must be -log P from a plain forward pass; the known answers are the
  most likely option for items 0 and 1 and another one for 2 and 3, so acc must be exactly 0.5."""
  best = []
  for (_, q, o), video in zip(ITEMS, assets["videos"]):
    scores = [forward_loglikelihood(assets, task_text(q, o), " " + letter, video)[0] for letter in LETTERS]
    best.append((scores, int(np.argmax(scores))))
  docs = [
      {"video": video, "question": q, "options": o, "answer_index": arg if i < 2 else (arg + 1) % 4}
      for i, ((_, q, o), video, (_, arg)) in enumerate(zip(ITEMS, assets["videos"], best))
  ]
  include = _write_task(assets, "kj_local_mc", "multiple_choice", docs)
  out = assets["dir"] / "out_mc"
  _run_cli(
      [
          LMMS_EVAL,
          "--model",
          "kangaroo_jax",
          "--force_simple",
          "--model_args",
          f"pretrained={assets['ckpt']},num_frames={NUM_FRAMES}",
          "--tasks",
          "kj_local_mc",
          "--include_path",
          str(include),
          "--output_path",
          str(out),
          "--log_samples",
      ],
      assets["dir"],
  )
  summary, samples = _results(out)
  assert _metric(summary, "kj_local_mc", "acc") == 0.5
  assert sorted(samples) == list(range(len(ITEMS)))
  for i, (scores, _) in enumerate(best):
    got = [float(loss) for loss, _ in samples[i]["filtered_resps"]]
    np.testing.assert_allclose(got, -np.asarray(scores), rtol=1e-3, atol=1e-3)


def test_wrapper_fails_when_lmms_eval_wrote_no_results(eval_env, assets):
  """lmms-eval logs a bad model_args value and exits 0; `python -m kangaroo_jax.lmms_eval_plugin` exits 1."""
  include = assets["dir"] / "tasks_kj_local_gen"
  if not include.exists():
    include = _write_task(assets, "kj_local_gen", "generate_until", [])
  proc = _run_cli(
      [
          EVAL_PY,
          "-m",
          "kangaroo_jax.lmms_eval_plugin",
          "--model",
          "kangaroo_jax",
          "--model_args",
          f"pretrained={assets['ckpt']},num_frames=3",
          "--tasks",
          "kj_local_gen",
          "--include_path",
          str(include),
          "--output_path",
          str(assets["dir"] / "out_bad"),
      ],
      assets["dir"],
      expect=1,
  )
  assert "model_args num_frames=3: expected an even number" in proc.stdout + proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("kangaroo_jax: lmms-eval wrote no results under")
