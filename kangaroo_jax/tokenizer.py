"""A small tokenizer interface over Hugging Face `tokenizers` (tokenizer.json) and sentencepiece (.model).

The released Kangaroo tokenizer is Llama-3's tokenizer.json (tiktoken-style byte-level BPE). Tiny
and demo models may use a sentencepiece model instead. Both give the same interface. Special-token
ids are always read from the files, never hard-coded:

  * `bos_id`: the `bos_token` of tokenizer_config.json / special_tokens_map.json, else `<|begin_of_text|>`
    (sentencepiece: the model's bos piece);
  * `eos_id`: the `eos_token` from the same files, else `<|end_of_text|>` (sentencepiece: eos piece);
  * `stop_ids`: `eos_id` plus `<|eot_id|>` when the vocabulary has it, plus generation_config.json's
    `eos_token_id`s. For the released Llama-3 files this is (128001, 128009), exactly the
    `terminators` list of Kangaroo's chat() (docs/model.md section 1, generation).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

END_OF_TEXT = "<|end_of_text|>"
BEGIN_OF_TEXT = "<|begin_of_text|>"
EOT = "<|eot_id|>"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)


class TokenizerError(ValueError):
  """No usable tokenizer files, or a special token that the vocabulary lacks."""


def _token_text(v) -> str | None:
  if v is None:
    return None
  if isinstance(v, dict):
    return v.get("content")
  return str(v)


def _read_json(path: str) -> dict:
  """A JSON object file ({} when absent); TokenizerError naming the file when it is not one."""
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TokenizerError(f"{path}: not a readable JSON file ({e})") from None
  if not isinstance(data, dict):
    raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else type(e).__name__


def _ids(v) -> list[int]:
  if v is None:
    return []
  return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


class Tokenizer:
  """Common interface. Subclasses implement `_encode`, `_decode`, `token_to_id`, `id_to_token`."""

  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  stop_ids: tuple[int, ...]
  special_tokens: dict[str, int]  # special token text -> id

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    """Text -> ids. Special-token strings in `text` (e.g. "<|eot_id|>") map to their single id.

    No special tokens are added except `bos_id` when `add_bos` is set.
    """
    ids = self._encode(text)
    if add_bos:
      if self.bos_id is None:
        raise TokenizerError("add_bos=True but this tokenizer has no bos token")
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    return self._decode([int(i) for i in ids], skip_special_tokens)

  def is_stop(self, token_id: int) -> bool:
    return int(token_id) in self.stop_ids

  def truncate_at_stop(self, ids: Sequence[int]) -> list[int]:
    """The ids before the first stop id (the stop id itself is dropped)."""
    out = []
    for i in ids:
      if self.is_stop(i):
        break
      out.append(int(i))
    return out

  def token_to_id(self, token: str) -> int | None:
    raise NotImplementedError

  def id_to_token(self, token_id: int) -> str | None:
    raise NotImplementedError

  def _encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    raise NotImplementedError

  def _finish_specials(self, bos: str | None, eos: str | None, extra_stop_ids: Iterable[int]) -> None:
    def lookup(text, fallback):
      if text is None:
        return self.token_to_id(fallback)
      i = self.token_to_id(text)
      if i is None:
        raise TokenizerError(f"special token {text!r} named in the tokenizer config is not in the vocabulary")
      return i

    self.bos_id = lookup(bos, BEGIN_OF_TEXT) if self.bos_id is None else self.bos_id
    self.eos_id = lookup(eos, END_OF_TEXT) if self.eos_id is None else self.eos_id
    stops = [self.eos_id] if self.eos_id is not None else []
    eot = self.token_to_id(EOT)
    if eot is not None:
      stops.append(eot)
    stops += list(extra_stop_ids)
    self.stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None))

  def __repr__(self) -> str:
    return (
        f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
        f"stop_ids={self.stop_ids})"
    )


class HFTokenizer(Tokenizer):
  """tokenizer.json via the `tokenizers` library (+ tokenizer_config.json / special_tokens_map.json beside it)."""

  def __init__(self, path: str, *, extra_stop_ids: Iterable[int] = ()):
    from tokenizers import Tokenizer as _Tok

    self.path = path
    spec = _read_json(path)  # corrupt files fail here, naming the file, before the library sees them
    try:
      self._tok = _Tok.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for any malformed spec
      raise TokenizerError(f"{path}: not a valid tokenizer.json ({_first_line(e)})") from None
    folder = os.path.dirname(os.path.abspath(path))
    cfg = {
        **_read_json(os.path.join(folder, "special_tokens_map.json")),
        **_read_json(os.path.join(folder, "tokenizer_config.json")),
    }
    gen = _read_json(os.path.join(folder, "generation_config.json"))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    added = spec.get("added_tokens") or []
    if not isinstance(added, list) or not all(
        isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int) for t in added
    ):
      raise TokenizerError(
          f"{path}: 'added_tokens' must be a list of objects with a string 'content' and an " "int 'id'"
      )
    self.special_tokens = {t["content"]: int(t["id"]) for t in added if t.get("special")}
    self.bos_id = self.eos_id = None
    pad = _token_text(cfg.get("pad_token"))
    self.pad_id = self.token_to_id(pad) if pad else None
    self._finish_specials(
        _token_text(cfg.get("bos_token")),
        _token_text(cfg.get("eos_token")),
        list(extra_stop_ids) + _ids(gen.get("eos_token_id")),
    )
    if self.vocab_size <= max(self.special_tokens.values(), default=-1):
      self.vocab_size = max(self.special_tokens.values()) + 1

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self._tok.id_to_token(int(token_id))

  def _encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece .model; control and user-defined pieces count as special tokens."""

  def __init__(self, path: str, *, extra_stop_ids: Iterable[int] = ()):
    import sentencepiece as spm

    self.path = path
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
      raise TokenizerError(f"{path}: not a valid sentencepiece model ({_first_line(e)})") from None
    sp = self._sp
    self.vocab_size = sp.get_piece_size()
    self.special_tokens = {
        sp.id_to_piece(i): i
        for i in range(self.vocab_size)
        if sp.is_control(i) or sp.is_unknown(i) or self._user_defined(i)
    }

    def opt(i):
      return None if i < 0 else int(i)

    self.bos_id, self.eos_id, self.pad_id = opt(sp.bos_id()), opt(sp.eos_id()), opt(sp.pad_id())
    self._finish_specials(None, None, extra_stop_ids)

  def _user_defined(self, i: int) -> bool:
    fn = getattr(self._sp, "is_user_defined", None) or getattr(self._sp, "IsUserDefined", None)
    return bool(fn(i)) if fn is not None else False

  def token_to_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    # sentencepiece maps unknown pieces to unk_id; only accept it when the piece really is that token.
    if i == self._sp.unk_id() and self._sp.id_to_piece(i) != token:
      return None
    return int(i)

  def id_to_token(self, token_id: int) -> str | None:
    return self._sp.id_to_piece(int(token_id)) if 0 <= int(token_id) < self.vocab_size else None

  def _encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    special = set(self.special_tokens.values())
    if skip_special_tokens:
      return self._sp.decode([i for i in ids if i not in special])
    # sentencepiece decodes control pieces to "", so keep their text, as tokenizers does.
    out, run = [], []
    for i in ids:
      if i in special and self._sp.is_control(i):
        out.append(self._sp.decode(run))
        out.append(self._sp.id_to_piece(i))
        run = []
      else:
        run.append(i)
    out.append(self._sp.decode(run))
    return "".join(out)


def load_tokenizer(path: str, *, extra_stop_ids: Iterable[int] = ()) -> Tokenizer:
  """A folder (tokenizer.json preferred, else tokenizer.model) or one of those files."""
  if os.path.isdir(path):
    for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
      if os.path.exists(os.path.join(path, name)):
        return cls(os.path.join(path, name), extra_stop_ids=extra_stop_ids)
    raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model")
  if path.endswith(".json"):
    return HFTokenizer(path, extra_stop_ids=extra_stop_ids)
  if path.endswith(".model"):
    return SentencePieceTokenizer(path, extra_stop_ids=extra_stop_ids)
  raise TokenizerError(f"{path}: expected a tokenizer.json, a sentencepiece .model, or a folder with one")


def id_limit(tokenizer: Tokenizer) -> int:
  """One more than the largest id the tokenizer can produce (its vocabulary may have holes)."""
  ids = [tokenizer.vocab_size - 1, *tokenizer.special_tokens.values()]
  if isinstance(tokenizer, HFTokenizer):
    ids += tokenizer._tok.get_vocab(with_added_tokens=True).values()
  return max(ids) + 1


def check_fits_vocab(tokenizer: Tokenizer, model_vocab_size: int, where: str) -> None:
  """Raises TokenizerError when the tokenizer can produce ids that the model's embedding has no row for.

  `where` names the model's field (e.g. "llm.vocab_size of CKPT/kangaroo_config.json").
  """
  limit = id_limit(tokenizer)
  if limit > model_vocab_size:
    raise TokenizerError(
        f"{getattr(tokenizer, 'path', 'tokenizer')}: the tokenizer has ids up to {limit - 1} "
        f"({limit} ids) but the model's vocabulary ({where}) has only {model_vocab_size} rows; "
        "use the tokenizer the model was trained with"
    )


def has_tokenizer(folder: str) -> bool:
  return any(os.path.exists(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model"))
