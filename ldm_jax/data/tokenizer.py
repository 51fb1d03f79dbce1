"""Text to fixed-length token ids for the text-conditioned LDM, offline.

Two tokenizers with one interface (`__call__(texts) -> int32 [N, max_length]`,
`vocab_size`, `pad_id`):

- `ByteTokenizer` (the default): UTF-8 bytes, so any text in any language works without a
  vocabulary file; 259 ids.
- `WordPieceTokenizer`: BERT's uncased scheme (lower-case, strip accents, split off
  punctuation, greedy longest-match word pieces marked "##") from a user-supplied
  `vocab.txt`, e.g. bert-base-uncased's 30522 entries that the LDM txt2img model used.

Both wrap the ids as [start] text [end] and pad to `max_length` (77, as CLIP and the
LDM text models); longer texts are cut, keeping the end marker.
"""

from __future__ import annotations

import io
import unicodedata
from typing import Sequence

import numpy as np

from ldm_jax import fs


def _frame(ids: list[int], start: int, end: int, pad: int, max_length: int) -> list[int]:
  ids = [start] + ids[:max_length - 2] + [end]
  return ids + [pad] * (max_length - len(ids))


class ByteTokenizer:
  """ids: 0 pad, 1 start, 2 end, 3 + byte value."""

  pad_id, start_id, end_id, offset = 0, 1, 2, 3
  vocab_size = 256 + 3

  def __init__(self, max_length: int = 77):
    if max_length < 2:
      raise ValueError(f"max_length={max_length} must leave room for the start and end ids")
    self.max_length = max_length

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    rows = [_frame([self.offset + b for b in _as_text(t).encode("utf-8")], self.start_id,
                   self.end_id, self.pad_id, self.max_length) for t in _as_list(texts)]
    return np.asarray(rows, np.int32).reshape(len(rows), self.max_length)

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
    return data.decode("utf-8", errors="replace")


class WordPieceTokenizer:
  """BERT uncased tokenization from a vocab.txt (one token per line, id = line number)."""

  def __init__(self, vocab_file: str, max_length: int = 77, max_chars_per_word: int = 100):
    if not fs.isfile(vocab_file):
      raise FileNotFoundError(f"WordPiece vocabulary {vocab_file!r} not found; point "
                              "text.vocab_file at a BERT vocab.txt, or leave it empty for "
                              "the byte-level tokenizer")
    text = io.StringIO(fs.read_text(vocab_file), newline=None)  # local or gs://
    tokens = [line.rstrip("\n") for line in text]
    self.vocab = {token: i for i, token in enumerate(tokens)}
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
    if missing:
      raise ValueError(f"{vocab_file} lacks the special tokens {missing}; is it a BERT "
                       "vocab.txt?")
    self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
    self.start_id, self.end_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
    self.vocab_size = len(tokens)
    self.max_length = max_length
    self.max_chars_per_word = max_chars_per_word

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    rows = [_frame(self.encode(t), self.start_id, self.end_id, self.pad_id, self.max_length)
            for t in _as_list(texts)]
    return np.asarray(rows, np.int32).reshape(len(rows), self.max_length)

  def encode(self, text: str) -> list[int]:
    """Ids of `text` without the start/end markers or padding."""
    ids = []
    for word in _basic_words(_as_text(text)):
      ids.extend(self._pieces(word))
    return ids

  def _pieces(self, word: str) -> list[int]:
    if len(word) > self.max_chars_per_word:
      return [self.unk_id]
    pieces, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self.vocab:
          pieces.append(self.vocab[piece])
          break
        end -= 1
      if end == start:  # no piece matches: the whole word is unknown
        return [self.unk_id]
      start = end
    return pieces


def _basic_words(text: str) -> list[str]:
  """Lower-cased, accent-free words with every punctuation mark its own word."""
  text = unicodedata.normalize("NFD", text.lower())
  words, current = [], []
  for char in text:
    category = unicodedata.category(char)
    if category == "Mn" or char in ("\x00", "\ufffd") or (
        category in ("Cc", "Cf") and char not in "\t\n\r"):
      continue  # accents and control characters are dropped, not split on
    if char.isspace() or category == "Zs":
      _flush(words, current)
    elif _is_punctuation(char, category) or _is_cjk(ord(char)):
      _flush(words, current)
      words.append(char)
    else:
      current.append(char)
  _flush(words, current)
  return words


def _flush(words: list[str], current: list[str]) -> None:
  if current:
    words.append("".join(current))
    current.clear()


def _is_punctuation(char: str, category: str) -> bool:
  # BERT treats all non-alphanumeric ASCII symbols as punctuation, plus Unicode P*.
  code = ord(char)
  return (33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126
          or category.startswith("P"))


def _is_cjk(code: int) -> bool:
  """CJK ideographs are words of their own (BERT's rule; the scripts have no spaces)."""
  return any(lo <= code <= hi for lo, hi in (
      (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
      (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _as_list(texts) -> list:
  return [texts] if isinstance(texts, (str, bytes)) else list(texts)


def _as_text(text) -> str:
  if isinstance(text, bytes):
    return text.decode("utf-8", errors="replace")
  if not isinstance(text, str):
    raise TypeError(f"expected text, got {type(text).__name__}: {text!r}")
  return text


def make_tokenizer(vocab_file: str = "", max_length: int = 77):
  """WordPiece when a vocabulary is given, else bytes."""
  if vocab_file:
    return WordPieceTokenizer(vocab_file, max_length)
  return ByteTokenizer(max_length)
