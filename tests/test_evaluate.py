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
from kangaroo_jax.inference.mcq import (
    BenchmarkError,
    SubtitleError,
    extract_choice,
    load_benchmark,
    read_srt,
    subtitles_at,
)
from kangaroo_jax.inference.recipes import get_recipe
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
  prompt = encode_conversation(
      tokenizer,
      [{"role": "user", "content": "q"}],
      num_groups=0,
      tokens_per_group=1,
      visual_token_id=-200,
      add_generation_prompt=True,
  ).input_ids
  eot = tokenizer.token_to_id("<|eot_id|>")
  return bigram_model(tokenizer, [int(prompt[-1])] + tokenizer.encode(letter) + [eot])


MVBENCH = {  # MVBench shape: {task: [items]}, candidates + answer text
    "action_sequence": [
        {
            "video": "clip.mp4",
            "question": "What did the person do first?",
            "candidates": ["sit", "run", "jump"],
            "answer": "run",
        },
        {
            "video": "clip.mp4",
            "question": "What did the person do last?",
            "candidates": ["sit", "run", "jump"],
            "answer": "sit",
            "start": 0.5,
            "end": 2.5,
        },
    ],
    "object_count": [
        {"video": "clip", "question": "How many balls?", "candidates": ["1", "2", "3", "4"], "answer": "2"},
    ],
}
VIDEOMME = [  # Video-MME shape: one entry per video with nested questions, "A. text" options, letter answers
    {
        "videoID": "clip",
        "duration": "short",
        "questions": [
            {
                "question_id": "001-1",
                "task_type": "Counting Problem",
                "question": "How many cars?",
                "options": ["A. one", "B. two", "C. three", "D. four"],
                "answer": "B",
            },
            {
                "question_id": "001-2",
                "task_type": "Counting Problem",
                "question": "How many people?",
                "options": ["A. one", "B. two", "C. three", "D. four"],
                "answer": "D",
            },
            {
                "question_id": "001-3",
                "task_type": "Object Recognition",
                "question": "What is shown?",
                "options": ["A. a dog", "B. a cat", "C. a car", "D. a tree"],
                "answer": "C",
            },
        ],
    },
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
  cases = {
      "B": 1,
      "(C) car": 2,
      "A. red car": 0,
      "The answer is (D).": 3,
      "answer: b": None,
      "I think the answer is B": 1,
      "It is the blue car.": 1,
      "Best option: (A)": 0,
      "car": 2,
      "no idea": None,
      "E": None,
      "Option C because": 2,
  }
  for text, want in cases.items():
    assert extract_choice(text, opts) == want, text


def test_load_benchmark_shapes_and_errors(setup, tmp_path):
  mv = load_benchmark(setup["mvbench"])
  assert [(i.task, i.answer, i.options[i.answer]) for i in mv] == [
      ("action_sequence", 1, "run"),
      ("action_sequence", 0, "sit"),
      ("object_count", 1, "2"),
  ]
  assert (mv[1].start, mv[1].end) == (0.5, 2.5)
  vm = load_benchmark(setup["videomme"])
  assert [(i.id, i.task, i.video, i.answer) for i in vm] == [
      ("001-1", "Counting Problem", "clip", 1),
      ("001-2", "Counting Problem", "clip", 3),
      ("001-3", "Object Recognition", "clip", 2),
  ]
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
  rc = ev.main(
      [
          ckpt,
          "--benchmark",
          setup["videomme"],
          "--video-root",
          str(setup["dir"]),
          "--output",
          out,
          "--num-frames",
          str(NUM_FRAMES),
          "--max-new-tokens",
          "4",
      ]
  )
  assert rc == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["per_task"] == {
      "Counting Problem": {"accuracy": 0.0, "correct": 0, "total": 2},
      "Object Recognition": {"accuracy": 100.0, "correct": 1, "total": 1},
  }
  assert summary["overall"]["accuracy"] == pytest.approx(33.33)


def test_cli_needs_a_tokenizer(setup, capsys):
  ckpt = save_pretrained(answering(setup["tok"], "C"), None, str(setup["dir"] / "ckpt_no_tok"))
  rc = ev.main(
      [
          ckpt,
          "--benchmark",
          setup["videomme"],
          "--video-root",
          str(setup["dir"]),
          "--output",
          str(setup["dir"] / "run_no_tok"),
      ]
  )
  assert rc == 2
  assert f"{ckpt} holds no tokenizer.json or tokenizer.model" in capsys.readouterr().err


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _content_sha256(folder):
  """The checkpoint hash computed independently: sha256 over (relative path, size, bytes) of the config,
  state/ and tokenizer files, sorted by path."""
  import hashlib

  rels = ["kangaroo_config.json"] + [
      n
      for n in (
          "tokenizer.json",
          "tokenizer_config.json",
          "special_tokens_map.json",
          "tokenizer.model",
          "generation_config.json",
      )
      if os.path.isfile(os.path.join(folder, n))
  ]
  for here, _, names in os.walk(os.path.join(folder, "state")):
    rels += [os.path.relpath(os.path.join(here, n), folder).replace(os.sep, "/") for n in names]
  h = hashlib.sha256()
  for rel in sorted(rels):
    data = open(os.path.join(folder, rel), "rb").read()
    h.update(f"{rel}\0{len(data)}\0".encode() + data)
  return h.hexdigest()


def _git_head():
  import subprocess

  try:
    r = subprocess.run(
        ["git", "-C", os.path.dirname(os.path.dirname(ev.__file__)), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        timeout=20,
    )
  except OSError:
    return None
  return r.stdout.strip() if r.returncode == 0 else None


@pytest.fixture(scope="module")
def ckpt_b(setup):
  return save_pretrained(answering(setup["tok"], "B"), setup["tok_dir"], str(setup["dir"] / "ckpt_b"))


def test_cli_recipe_records_recipe_commit_and_checkpoint_hash(setup, ckpt_b, capsys):
  out = str(setup["dir"] / "run_recipe")
  rc = ev.main(
      [
          ckpt_b,
          "--benchmark",
          setup["videomme"],
          "--video-root",
          str(setup["dir"]),
          "--output",
          out,
          "--recipe",
          "videomme",
          "--num-frames",
          str(NUM_FRAMES),
          "--max-new-tokens",
          "4",
      ]
  )
  assert rc == 0
  cap = capsys.readouterr()
  assert "recipe videomme: num_frames 64 overridden to 4" in cap.err
  summary = json.loads(cap.out.strip().splitlines()[-1])
  with open(os.path.join(out, ev.RESULTS)) as f:
    results = json.load(f)
  assert results == summary and results["overall"]["correct"] == 1 and results["short_videos"] == 0
  run = results["run"]
  assert run["recipe"] == get_recipe("videomme").to_dict()  # the recipe as named, every setting
  assert run["settings"] == get_recipe("videomme").replace(num_frames=NUM_FRAMES, max_new_tokens=4).to_dict()
  assert run["overrides"] == {
      "num_frames": {"recipe": 64, "used": NUM_FRAMES},
      "max_new_tokens": {"recipe": 16, "used": 4},
  }
  assert run["checkpoint"]["sha256"] == _content_sha256(ckpt_b)
  assert run["code"]["commit"] == _git_head() and run["code"]["version"]
  with open(os.path.join(out, ev.RUN)) as f:
    assert json.load(f) == {k: v for k, v in run.items() if k != "commits_in_predictions"}
  lines = _lines(os.path.join(out, ev.PREDICTIONS))
  assert len(lines) == 3 and all(
      (p["recipe"], p["num_frames"], p["max_new_tokens"], p["checkpoint_sha256"], p["commit"])
      == ("videomme", NUM_FRAMES, 4, run["checkpoint"]["sha256"], run["code"]["commit"])
      for p in lines
  )


def test_recipe_prompt_reaches_the_model(setup):
  items = load_benchmark(setup["videomme"])
  seen = []
  recipe = get_recipe("videomme")
  ev.evaluate(
      lambda it, video, prompt: seen.append(prompt) or "B",
      items,
      str(setup["dir"]),
      str(setup["dir"] / "run_prompt"),
      prompt_fn=lambda it: recipe.format_prompt(it.question, it.options),
  )
  assert seen[0] == recipe.format_prompt("How many cars?", ["one", "two", "three", "four"])
  assert seen[0].endswith("D. four\nThe best answer is:")


def test_resume_refuses_other_recipe_or_checkpoint(setup, ckpt_b, capsys):
  out = str(setup["dir"] / "run_refuse")
  common = [
      ckpt_b,
      "--benchmark",
      setup["videomme"],
      "--video-root",
      str(setup["dir"]),
      "--output",
      out,
      "--num-frames",
      str(NUM_FRAMES),
      "--max-new-tokens",
      "4",
  ]
  assert ev.main(common + ["--recipe", "mvbench", "--max-items", "1"]) == 0
  pred = os.path.join(out, ev.PREDICTIONS)
  before = open(pred).read()
  capsys.readouterr()
  assert ev.main(common + ["--recipe", "videomme"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "recipe mvbench" in err and "recipe videomme" in err
  assert "--force-new-output" in err and open(pred).read() == before  # nothing rewritten
  assert ev.main(common) == 2  # no recipe is another recipe too
  capsys.readouterr()
  ckpt_c = save_pretrained(answering(setup["tok"], "C"), setup["tok_dir"], str(setup["dir"] / "ckpt_c2"))
  assert ev.main([ckpt_c] + common[1:] + ["--recipe", "mvbench"]) == 2
  assert "checkpoint sha256" in capsys.readouterr().err and open(pred).read() == before
  assert ev.main(common + ["--recipe", "mvbench"]) == 0  # same settings and checkpoint: resumes
  assert len(_lines(pred)) == 3 and _lines(pred)[0] == json.loads(before)
  assert ev.main(common + ["--recipe", "videomme", "--force-new-output"]) == 0
  aside = sorted(n for n in os.listdir(out) if n.startswith("predictions.") and n != ev.PREDICTIONS)
  assert len(aside) == 1 and len(_lines(os.path.join(out, aside[0]))) == 3  # the old run kept, renamed
  assert {p["recipe"] for p in _lines(pred)} == {"videomme"}


def test_checkpoint_hash_cache_and_changes(setup, ckpt_b, tmp_path):
  import shutil

  ckpt = str(tmp_path / "ck")
  shutil.copytree(ckpt_b, ckpt)
  first = ev.checkpoint_hash(ckpt)
  assert first["sha256"] == _content_sha256(ckpt) and first["files"] >= 3
  assert ev.checkpoint_hash(ckpt, cached={**first, "sha256": "cached"})["sha256"] == "cached"  # stats unchanged
  cfg = os.path.join(ckpt, "kangaroo_config.json")
  with open(cfg, "a") as f:
    f.write(" ")
  changed = ev.checkpoint_hash(ckpt, cached={**first, "sha256": "cached"})
  assert changed["sha256"] == _content_sha256(ckpt) != first["sha256"]


def test_code_version_without_git(monkeypatch):
  import subprocess

  def no_git(*a, **k):
    raise FileNotFoundError("git")

  monkeypatch.setattr(subprocess, "run", no_git)
  from kangaroo_jax import __version__

  assert ev.code_version() == {"commit": None, "dirty": None, "version": __version__}


def test_short_video_recorded_and_counted(setup, capsys):
  """A 5-frame video asked for 16 frames: answered, its line says 5 distinct of 16, results count it."""
  write_video(str(setup["dir"] / "short.mp4"), frames=5)
  write_video(str(setup["dir"] / "long.mp4"), frames=40, fps=8)
  bench = str(setup["dir"] / "short.json")
  with open(bench, "w") as f:
    json.dump(
        [
            {"id": "s", "video": "short.mp4", "question": "q?", "options": ["x", "y"], "answer": "B"},
            {"id": "l", "video": "long.mp4", "question": "q?", "options": ["x", "y"], "answer": "A"},
        ],
        f,
    )
  ckpt = save_pretrained(answering(setup["tok"], "B"), setup["tok_dir"], str(setup["dir"] / "ckpt_short"))
  out = str(setup["dir"] / "run_short")
  rc = ev.main(
      [
          ckpt,
          "--benchmark",
          bench,
          "--video-root",
          str(setup["dir"]),
          "--output",
          out,
          "--recipe",
          "egoschema",
          "--num-frames",
          "16",
          "--max-new-tokens",
          "3",
      ]
  )
  assert rc == 0
  err = capsys.readouterr().err
  lines = {p["id"]: p for p in _lines(os.path.join(out, ev.PREDICTIONS))}
  assert (lines["s"]["frames_unique"], lines["s"]["frames_requested"], lines["s"]["correct"]) == (5, 16, True)
  assert "frames_unique" not in lines["l"]  # 40 frames give 16 distinct ones
  with open(os.path.join(out, ev.RESULTS)) as f:
    assert json.load(f)["short_videos"] == 1
  warning = [line for line in err.splitlines() if "fewer distinct frames" in line]
  assert warning == [
      f"warning: 1 of 2 items had fewer distinct frames than the 16 requested (frames repeated by "
      f"uniform sampling); see frames_unique in {ev.PREDICTIONS}"
  ]


def test_unknown_recipe_is_one_line(setup, ckpt_b, capsys):
  rc = ev.main(
      [
          ckpt_b,
          "--benchmark",
          setup["videomme"],
          "--video-root",
          str(setup["dir"]),
          "--recipe",
          "nextqa",
          "--output",
          str(setup["dir"] / "run_bad_recipe"),
      ]
  )
  assert rc == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: unknown recipe 'nextqa'; valid names: mvbench,") and "\n" not in err


def test_srt_reading(tmp_path):
  srt = tmp_path / "v.srt"
  srt.write_text(
      '\ufeff1\r\n00:00:00,000 --> 00:00:00,500\r\n<font color="white" size=".72c">alpha</font>\r\n\r\n'
      "2\n00:00:00,500 --> 00:00:00,900\nbeta\n\n3\n00:00:01,500 --> 00:00:02,000\ngam\nma\n",
      encoding="utf-8",
  )
  cues = read_srt(str(srt))
  assert cues == [(0.0, 0.5, "alpha"), (0.5, 0.9, "beta"), (1.5, 2.0, "gam ma")]
  assert subtitles_at(cues, [0.25, 1.0, 1.75, 2.5]) == ["alpha", "gam ma"]  # beta is between the frames
  srt.write_text("1\n00:00:00 --> soon\nbroken\n")
  with pytest.raises(SubtitleError, match=r"v.srt: cue 1 has no"):
    read_srt(str(srt))


def test_cli_videomme_with_subtitles(setup, ckpt_b, tmp_path, capsys):
  """Subtitle lines at the sampled frames' times (4 frames of the 12-frame, 4 fps clip: 0.25, 1, 1.75, 2.5 s)."""
  subs = tmp_path / "subtitle"
  subs.mkdir()
  (subs / "clip.srt").write_text(
      "1\n00:00:00,000 --> 00:00:00,500\nalpha\n\n2\n00:00:00,500 --> 00:00:00,900\n"
      "beta\n\n3\n00:00:01,500 --> 00:00:02,000\ngamma\n"
  )
  common = [
      ckpt_b,
      "--benchmark",
      setup["videomme"],
      "--video-root",
      str(setup["dir"]),
      "--num-frames",
      str(NUM_FRAMES),
      "--max-new-tokens",
      "4",
      "--recipe",
      "videomme_subtitles",
  ]
  assert ev.main(common + ["--output", str(tmp_path / "no_root")]) == 2
  assert "needs --subtitle-root" in capsys.readouterr().err
  out = str(tmp_path / "run")
  assert ev.main(common + ["--output", out, "--subtitle-root", str(subs)]) == 0
  lines = _lines(os.path.join(out, ev.PREDICTIONS))
  assert [p["subtitle_lines"] for p in lines] == [2, 2, 2] and all(p["recipe"] == "videomme_subtitles" for p in lines)
  prompt_for = ev.subtitle_prompter(get_recipe("videomme_subtitles"), str(subs))
  item = load_benchmark(setup["videomme"])[0]
  prompt, extra = prompt_for(item, np.array([0.25, 1.0, 1.75, 2.5]))
  assert prompt.splitlines()[:3] == ["This video's subtitles are listed below:", "alpha", "gamma"]
  assert extra == {"subtitle_lines": 2}
  prompt, extra = ev.subtitle_prompter(get_recipe("videomme_subtitles"), str(tmp_path))(item, np.array([0.25]))
  assert prompt.splitlines()[1] == "No subtitles available" and extra == {"subtitle_lines": None}


def test_check_resumable_rules(tmp_path):
  ck = {"path": "/c", "sha256": "a" * 64, "files": 1, "bytes": 1, "stat_sha256": "s"}
  run = ev.run_record(get_recipe("mlvu"), get_recipe("mlvu"), {}, ck)
  pred = str(tmp_path / ev.PREDICTIONS)
  legacy = {"q": {"id": "q", "choice": "A", "correct": True}}  # written before lines carried settings
  ev.check_resumable(legacy, None, run, pred)
  same = {"q": {"id": "q", "choice": "A", "correct": True, **ev._line_fields(run)}}
  ev.check_resumable(same, run, run, pred)
  edited = {**run, "settings": {**run["settings"], "post_prompt": "Answer."}}  # e.g. a template changed since
  with pytest.raises(ev.OutputError, match=r"other settings \(post_prompt differ"):
    ev.check_resumable(same, edited, run, pred)
  other_ckpt = ev.run_record(get_recipe("mlvu"), get_recipe("mlvu"), {}, {**ck, "sha256": "b" * 64})
  with pytest.raises(ev.OutputError, match="checkpoint sha256 aaaaaaaaaaaa; this run uses .* bbbbbbbbbbbb"):
    ev.check_resumable(same, None, other_ckpt, pred)
