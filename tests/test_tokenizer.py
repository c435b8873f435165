"""kangaroo_jax.tokenizer over tiny tokenizers built at test time (no downloads).

A real Llama-3 tokenizer.json cannot be trained here (128k merges), so the tests check the part that
matters: special-token and stop ids are read from the files. One file places the Llama-3 special
tokens at their real ids (128000, 128001, 128009, ...) by editing a tiny trained vocabulary, so the
stop ids come out as (128001, 128009) exactly as Kangaroo's chat() terminators.
"""

from __future__ import annotations

import io
import json
import os

import pytest

from kangaroo_jax.tokenizer import (HFTokenizer, SentencePieceTokenizer, TokenizerError, has_tokenizer, load_tokenizer)

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_IDS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
}
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a video of a kangaroo hopping across the field",
    "what happens in the video? the kangaroo jumps.",
    "describe the frames one by one",
    "<vi_start> <eof> <eov> <vi_end> are plain text markers",
]


def build_bpe_tokenizer(folder: str, *, llama3_ids: bool = False, config: dict | None = None) -> str:
  """A byte-level BPE tokenizer.json (+ tokenizer_config.json) with the Llama-3 special tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=320, special_tokens=SPECIALS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(CORPUS, trainer)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "tokenizer.json")
  tok.save(path)
  if llama3_ids:
    # Move the special tokens to their Llama-3 ids; ordinary tokens keep 0..n-1 (merges are by string).
    spec = json.load(open(path))
    vocab = {k: v for k, v in spec["model"]["vocab"].items() if k not in LLAMA3_IDS}
    vocab = {k: i for i, k in enumerate(sorted(vocab, key=vocab.get))}
    vocab.update(LLAMA3_IDS)
    spec["model"]["vocab"] = vocab
    for t in spec["added_tokens"]:
      t["id"] = LLAMA3_IDS[t["content"]]
    with open(path, "w") as f:
      json.dump(spec, f)
  cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"} if config is None else config
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(cfg, f)
  return path


def build_sentencepiece(folder: str, *, user_symbols=("<|eot_id|>",)) -> str:
  import sentencepiece as spm

  os.makedirs(folder, exist_ok=True)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS * 4),
      model_writer=model,
      vocab_size=60,
      model_type="bpe",
      user_defined_symbols=list(user_symbols),
      hard_vocab_limit=False,
      bos_id=1,
      eos_id=2,
      unk_id=0,
      pad_id=3,
      minloglevel=2,
  )
  path = os.path.join(folder, "tokenizer.model")
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path


def test_llama3_layout_stop_ids_are_128001_and_128009(tmp_path):
  build_bpe_tokenizer(str(tmp_path), llama3_ids=True)
  tok = load_tokenizer(str(tmp_path))
  assert isinstance(tok, HFTokenizer)
  assert (tok.bos_id, tok.eos_id) == (128000, 128001)
  assert tok.stop_ids == (128001, 128009)
  assert tok.vocab_size == 128010
  assert tok.special_tokens["<|eot_id|>"] == 128009
  ids = tok.encode("the kangaroo<|eot_id|>", add_bos=True)
  assert ids[0] == 128000 and ids[-1] == 128009 and ids.count(128009) == 1
  assert tok.decode(ids) == "<|begin_of_text|>the kangaroo<|eot_id|>"
  assert tok.decode(ids, skip_special_tokens=True) == "the kangaroo"
  assert tok.truncate_at_stop(ids + [5, 6]) == ids[:-1]
  assert tok.is_stop(128001) and not tok.is_stop(128000)


def test_special_ids_come_from_the_file_not_constants(tmp_path):
  build_bpe_tokenizer(str(tmp_path))
  tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
  want = {s: tok.token_to_id(s) for s in SPECIALS}
  assert want == {s: i for i, s in enumerate(SPECIALS)}  # the trainer put them first
  assert tok.bos_id == 0 and tok.eos_id == 1 and tok.stop_ids == (1, 4)
  text = "what happens in the video? the kangaroo jumps."
  ids = tok.encode(text)
  assert all(i >= len(SPECIALS) for i in ids)  # no special token added implicitly
  assert tok.decode(ids) == text
  # Marker strings of the prompt are ordinary text (docs/model.md section 1), never single special ids.
  assert len(tok.encode("<vi_start>")) > 1


def test_eos_from_config_and_generation_config_extend_stop_ids(tmp_path):
  build_bpe_tokenizer(str(tmp_path), config={"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>"})
  with open(tmp_path / "generation_config.json", "w") as f:
    json.dump({"eos_token_id": [4, 3]}, f)
  tok = load_tokenizer(str(tmp_path), extra_stop_ids=[2])
  assert tok.eos_id == 4
  assert tok.stop_ids == (4, 2, 3)


def test_unknown_special_token_in_config_is_an_error(tmp_path):
  build_bpe_tokenizer(str(tmp_path), config={"eos_token": "<|not_in_vocab|>"})
  with pytest.raises(TokenizerError, match="not_in_vocab"):
    load_tokenizer(str(tmp_path))


def test_sentencepiece_model(tmp_path):
  path = build_sentencepiece(str(tmp_path))
  tok = load_tokenizer(str(tmp_path))
  assert isinstance(tok, SentencePieceTokenizer) and tok.path == path
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  eot = tok.token_to_id("<|eot_id|>")
  assert eot is not None and tok.stop_ids == (2, eot)
  assert tok.token_to_id("<|never_seen|>") is None
  text = "the kangaroo jumps over the dog"
  ids = tok.encode(text, add_bos=True)
  assert ids[0] == 1 and tok.decode(ids[1:]) == text
  assert tok.decode(ids) == "<s>" + text  # control tokens keep their text unless skipped
  assert tok.decode(ids, skip_special_tokens=True) == text
  with_eot = tok.encode("the dog<|eot_id|>")
  assert with_eot[-1] == eot
  assert tok.truncate_at_stop(with_eot + [2]) == with_eot[:-1]


def test_folder_without_tokenizer(tmp_path):
  assert not has_tokenizer(str(tmp_path))
  with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
    load_tokenizer(str(tmp_path))
