"""A small sentencepiece tokenizer that speaks the Llama-3 chat template (contract section 6).

The five Llama-3 specials are user-defined pieces, so `Tokenizer.encode("<|eot_id|>")` gives one id and
the prompt code needs no special cases. Ids: 0 `<unk>`, 1 `<|begin_of_text|>`, 2 `<|end_of_text|>`,
3 `<|eot_id|>`, 4 `<|start_header_id|>`, 5 `<|end_header_id|>` (matching `config.tiny()`'s bos 1 / eos 2).
Byte fallback keeps every string encodable; the identity normaliser keeps newlines and spaces as they are.
"""

from __future__ import annotations

import io
import os
from typing import Iterable

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")


def build_chat_sentencepiece(texts: Iterable[str], out_dir: str, vocab_size: int) -> str:
  """Trains a BPE sentencepiece model on `texts`; returns the path of `out_dir/tokenizer.model`.

  vocab_size must leave room for 256 byte pieces, the specials and `<unk>` (>= 263).
  """
  import sentencepiece as spm

  minimum = 256 + len(LLAMA3_SPECIALS) + 2
  if vocab_size < minimum:
    raise ValueError(f"vocab_size {vocab_size} is too small: byte fallback needs >= {minimum}")
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("build_chat_sentencepiece needs at least one non-empty training text")
  os.makedirs(out_dir, exist_ok=True)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=model,
      vocab_size=vocab_size,
      model_type="bpe",
      character_coverage=1.0,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      split_digits=True,
      user_defined_symbols=list(LLAMA3_SPECIALS),
      unk_id=0,
      bos_id=-1,
      eos_id=-1,
      pad_id=-1,
      hard_vocab_limit=False,
      max_sentence_length=1 << 16,
      minloglevel=2,
  )
  path = os.path.join(out_dir, "tokenizer.model")
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path
