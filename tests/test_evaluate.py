"""Multiple-choice evaluation: benchmark shapes, answer extraction, accuracy with a model whose answer is
fixed by its weights, and resuming an interrupted run."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kangaroo_jax import evaluate as ev
from kangaroo_jax.data.prompt import encode_conversation
from kangaroo_jax.inference.chat import Chat
from kangaroo_jax.inference.mcq import BenchmarkError, extract_choice, load_benchmark
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.pretrained import save_pretrained
from kangaroo_jax.tokenizer import load_tokenizer
from tests.test_inference_chat import tiny_config, tiny_tokenizer_dir, write_video

NUM_FRAMES = 4


def bigram_model(tokenizer, chain: list[int], seed: int = 0) -> Kangaroo:
  """A tiny Kangaroo whose next token depends only on the current one: chain[i] -> chain[i + 1].

  Attention and MLP outputs are zeroed, so the residual stream at each position is that token's
  embedding; lm_head column chain[i+1] is aligned with the normalised embedding of chain[i], which makes
  it win by a wide margin there (d = 64: own score 8 * scale vs ~1-3 * scale for any other token).
  """
  model = Kangaroo(tiny_config(tokenizer), rngs=nnx.Rngs(seed))
  layers = model.llm.model.layers
  layers.self_attn.o_proj.kernel[...] = jnp.zeros_like(layers.self_attn.o_proj.kernel[...])
  layers.mlp.down_proj.kernel[...] = jnp.zeros_like(layers.mlp.down_proj.kernel[...])
  emb = np.asarray(model.llm.model.embed_tokens.embedding[...])
  head = np.zeros_like(np.asarray(model.llm.lm_head.kernel[...]))
  assert len(set(chain)) == len(chain)
  for src, dst in zip(chain, chain[1:]):
    e = emb[src] / np.sqrt(np.mean(emb[src] ** 2))
    head[:, dst] += 10.0 * e / np.linalg.norm(e)
  model.llm.lm_head.kernel[...] = jnp.asarray(head)
  model.llm.model.norm.scale[...] = jnp.ones_like(model.llm.model.norm.scale[...])
  return model


def answering(tokenizer, letter: str) -> Kangaroo:
  """A model that answers `letter` then <|eot_id|> after any prompt ending with the assistant header."""
  prompt = encode_conversation(tokenizer, [{"role": "user", "content": "q"}], num_groups=0, tokens_per_group=1,
                               visual_token_id=-200, add_generation_prompt=True).input_ids
  eot = tokenizer.token_to_id("<|eot_id|>")
  return bigram_model(tokenizer, [int(prompt[-1])] + tokenizer.encode(letter) + [eot])


MVBENCH = {  # MVBench shape: {task: [items]}, candidates + answer text
    "action_sequence": [
        {"video": "clip.mp4", "question": "What did the person do first?", "candidates": ["sit", "run", "jump"],
         "answer": "run"},
        {"video": "clip.mp4", "question": "What did the person do last?", "candidates": ["sit", "run", "jump"],
         "answer": "sit", "start": 0.5, "end": 2.5},
    ],
    "object_count": [
        {"video": "clip", "question": "How many balls?", "candidates": ["1", "2", "3", "4"], "answer": "2"},
    ],
}
VIDEOMME = [  # Video-MME shape: one entry per video with nested questions, "A. text" options, letter answers
    {"videoID": "clip", "duration": "short", "questions": [
        {"question_id": "001-1", "task_type": "Counting Problem", "question": "How many cars?",
         "options": ["A. one", "B. two", "C. three", "D. four"], "answer": "B"},
        {"question_id": "001-2", "task_type": "Counting Problem", "question": "How many people?",
         "options": ["A. one", "B. two", "C. three", "D. four"], "answer": "D"},
        {"question_id": "001-3", "task_type": "Object Recognition", "question": "What is shown?",
         "options": ["A. a dog", "B. a cat", "C. a car", "D. a tree"], "answer": "C"},
    ]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("eval")
  tok_dir = tiny_tokenizer_dir(str(d / "tok"))
  tok = load_tokenizer(tok_dir)
  write_video(str(d / "clip.mp4"))
  paths = {}
  for name, data in (("mvbench", MVBENCH), ("videomme", VIDEOMME)):
    paths[name] = str(d / f"{name}.json")
    with open(paths[name], "w") as f:
      json.dump(data, f)
  return dict(dir=d, tok=tok, tok_dir=tok_dir, **paths)


def test_extract_choice():
  opts = ("red car", "blue car", "car", "green")
  cases = {"B": 1, "(C) car": 2, "A. red car": 0, "The answer is (D).": 3, "answer: b": None,
           "I think the answer is B": 1, "It is the blue car.": 1, "Best option: (A)": 0, "car": 2,
           "no idea": None, "E": None, "Option C because": 2}
  for text, want in cases.items():
    assert extract_choice(text, opts) == want, text


def test_load_benchmark_shapes_and_errors(setup, tmp_path):
  mv = load_benchmark(setup["mvbench"])
  assert [(i.task, i.answer, i.options[i.answer]) for i in mv] == [
      ("action_sequence", 1, "run"), ("action_sequence", 0, "sit"), ("object_count", 1, "2")]
  assert (mv[1].start, mv[1].end) == (0.5, 2.5)
  vm = load_benchmark(setup["videomme"])
  assert [(i.id, i.task, i.video, i.answer) for i in vm] == [
      ("001-1", "Counting Problem", "clip", 1), ("001-2", "Counting Problem", "clip", 3),
      ("001-3", "Object Recognition", "clip", 2)]
  assert vm[2].options == ("a dog", "a cat", "a car", "a tree")
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"video": "v.mp4", "question": "q?", "options": ["x", "y"], "answer": "Z"}]))
  with pytest.raises(BenchmarkError, match=r"bad.json: item 0: answer 'Z'"):
    load_benchmark(str(bad))
  bad.write_text(json.dumps([{"question": "q?", "options": ["x", "y"], "answer": "A"}]))
  with pytest.raises(BenchmarkError, match="no video field"):
    load_benchmark(str(bad))


def _expected(items, letter):
  per = {}
  for it in items:
    c, t = per.get(it.task, (0, 0))
    per[it.task] = (c + int("ABCD"[it.answer] == letter), t + 1)
  return per


def test_accuracy_and_resume(setup):
  tok = setup["tok"]
  chat = Chat(answering(tok, "B"), tok)
  items = load_benchmark(setup["videomme"]) + load_benchmark(setup["mvbench"])
  calls = []
  base = ev.model_answer_fn(chat, num_frames=NUM_FRAMES, max_new_tokens=6)

  def answer(item, video, prompt):
    calls.append(item.id)
    return base(item, video, prompt)

  out = str(setup["dir"] / "run_b")
  first = ev.evaluate(answer, items, str(setup["dir"]), out, max_items=2)
  assert len(calls) == 2 and not first["complete"] and first["overall"]["total"] == 2
  with open(os.path.join(out, ev.PREDICTIONS), "a") as f:
    f.write('{"id": "001-3", "task": "Obj')  # a line cut short by the interruption
  summary = ev.evaluate(answer, items, str(setup["dir"]), out)
  assert calls[2:] == [it.id for it in items[2:]]  # resumed: each remaining item exactly once
  preds = ev.read_predictions(os.path.join(out, ev.PREDICTIONS))
  assert {p["prediction"].strip() for p in preds.values()} == {"B"}
  want = _expected(items, "B")
  assert {k: (v["correct"], v["total"]) for k, v in summary["per_task"].items()} == want
  assert summary["overall"]["correct"] == 3 and summary["overall"]["total"] == 6 and summary["complete"]
  with open(os.path.join(out, ev.RESULTS)) as f:
    assert json.load(f) == summary
  assert "OVERALL" in ev.table(summary)


def test_cli_with_another_answer(setup, capsys):
  """The CLI end to end on a saved checkpoint whose weights make it answer C."""
  tok = setup["tok"]
  ckpt = save_pretrained(answering(tok, "C"), setup["tok_dir"], str(setup["dir"] / "ckpt_c"))
  out = str(setup["dir"] / "run_c")
  rc = ev.main([ckpt, "--benchmark", setup["videomme"], "--video-root", str(setup["dir"]), "--output", out,
                "--num-frames", str(NUM_FRAMES), "--max-new-tokens", "4"])
  assert rc == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["per_task"] == {"Counting Problem": {"accuracy": 0.0, "correct": 0, "total": 2},
                                 "Object Recognition": {"accuracy": 100.0, "correct": 1, "total": 1}}
  assert summary["overall"]["accuracy"] == pytest.approx(33.33)


def test_cli_needs_a_tokenizer(setup, capsys):
  ckpt = save_pretrained(answering(setup["tok"], "C"), None, str(setup["dir"] / "ckpt_no_tok"))
  rc = ev.main([ckpt, "--benchmark", setup["videomme"], "--video-root", str(setup["dir"]),
                "--output", str(setup["dir"] / "run_no_tok")])
  assert rc == 2
  assert f"{ckpt} holds no tokenizer.json or tokenizer.model" in capsys.readouterr().err
