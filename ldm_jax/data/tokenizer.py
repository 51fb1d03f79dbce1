"""Text to fixed-length token ids for the text-conditioned LDM, offline.

Three tokenizers with one interface (`__call__(texts) -> int32 [N, max_length]`,
`vocab_size`, `pad_id`):

- `ByteTokenizer` (the default): UTF-8 bytes, so any text in any language works without a
  vocabulary file; 259 ids.
- `WordPieceTokenizer`: BERT's uncased scheme (lower-case, strip accents, split off
  punctuation, greedy longest-match word pieces marked "##") from a user-supplied
  `vocab.txt`, e.g. bert-base-uncased's 30522 entries that the LDM txt2img model used.
- `CLIPTokenizer`: CLIP's byte-level BPE from a `vocab.json` + `merges.txt` pair (a
  diffusers pipeline's `tokenizer/` folder), id for id what Stable Diffusion's text
  encoders were trained with.

All wrap the ids as [start] text [end] and pad to `max_length` (77, as CLIP and the
LDM text models); longer texts are cut, keeping the end marker.
"""

from __future__ import annotations

import html
import io
import json
import os
import posixpath
import unicodedata
from typing import Sequence

import numpy as np
from absl import logging

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


# --- CLIP ------------------------------------------------------------------------------

START, END = "<|startoftext|>", "<|endoftext|>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_WORD_END = "</w>"
_NEVER = float("inf")  # rank of a pair no merge joins
_CACHE_SIZE = 1 << 16  # distinct words remembered; caption vocabularies repeat a lot


def _byte_chars() -> list[str]:
  """The printable stand-in for each byte value, as CLIP (and GPT-2) define it.

  BPE works on text, so each byte becomes one character: printable Latin-1 bytes stand for
  themselves, the other 68 (space, controls, ...) take the code points 256, 257, ... in
  byte order, so no merge ever contains whitespace.
  """
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


_BYTE_CHARS = _byte_chars()
_CHAR_BYTES = {c: b for b, c in enumerate(_BYTE_CHARS)}
_ftfy_missing_logged = False


def _fix_text(text: str) -> str:
  """ftfy.fix_text when ftfy is installed, as CLIP and Stable Diffusion ran; else NFC only."""
  global _ftfy_missing_logged
  try:
    import ftfy
  except ImportError:
    if not _ftfy_missing_logged:
      _ftfy_missing_logged = True
      logging.warning("ftfy is not installed: CLIPTokenizer only NFC-normalizes text, so "
                      "mojibake, curly quotes (’ for ') and full-width letters get other "
                      "ids than Stable Diffusion's tokenizer gives them; pip install ftfy")
    return unicodedata.normalize("NFC", text)
  return ftfy.fix_text(text)


def clean_text(text: str) -> str:
  """CLIP's text cleaning: ftfy, HTML entities unescaped (twice, for doubly escaped
  captions scraped from the web), whitespace runs collapsed to one space, lower case."""
  text = html.unescape(html.unescape(_fix_text(text)))
  return " ".join(text.split()).lower()


def _kind(char: str) -> str:
  """'L' letter, 'N' number, ' ' space, 'P' anything else: the classes CLIP splits on."""
  if char.isspace():
    return " "
  category = unicodedata.category(char)[0]
  return category if category in "LN" else "P"


def split_words(text: str) -> list[str]:
  """CLIP's pre-tokenization of cleaned text, as its pattern
  `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`
  splits it: runs of letters, single digits, runs of other symbols, with the special
  tokens and English contractions matched first where a piece starts.

  Written with unicodedata rather than the pattern: Python's `re` lacks \\p{L} and \\p{N},
  and this keeps the third-party `regex` module out of the dependencies.
  """
  words, i = [], 0
  while i < len(text):
    kind = _kind(text[i])
    if kind == " ":
      i += 1
      continue
    fixed = next((w for w in (START, END, *_CONTRACTIONS) if text.startswith(w, i)), None)
    if fixed:
      end = i + len(fixed)
    elif kind == "N":
      end = i + 1
    else:  # a run of letters, or of symbols (which swallows apostrophes inside it)
      end = i + 1
      while end < len(text) and _kind(text[end]) == kind:
        end += 1
    words.append(text[i:end])
    i = end
  return words


class CLIPTokenizer:
  """CLIP's byte-level BPE, as transformers' CLIPTokenizer and open_clip apply it.

  Build one from a folder with `from_folder` (which also reads the pad token and length
  from tokenizer_config.json / special_tokens_map.json), or from the two files. Padding
  differs by model and matters, since SD's UNet cross-attends to the padded positions too:
  SD1 pads with `<|endoftext|>`, SD2 with "!" (id 0, as open_clip pads). A "!" in the text
  is still BPE-encoded, as open_clip (which trained SD2) does; transformers instead turns
  it into the pad token when that is "!" (diffusers issue #4153).
  """

  def __init__(self, vocab_file: str, merges_file: str, max_length: int = 77,
               pad_token: str | int = END, *, start_token: str = START,
               end_token: str = END, unk_token: str = END):
    for name, path in (("vocabulary", vocab_file), ("merges", merges_file)):
      if not fs.isfile(path):
        raise FileNotFoundError(f"CLIP {name} file {path!r} not found; a CLIP tokenizer "
                                "needs vocab.json and merges.txt (a diffusers pipeline's "
                                "tokenizer/ folder)")
    if max_length < 2:
      raise ValueError(f"max_length={max_length} must leave room for the start and end ids")
    self.vocab: dict[str, int] = json.loads(fs.read_text(vocab_file))
    merges = [line.split() for line in fs.read_text(merges_file).split("\n")]
    if merges and merges[0] and merges[0][0].startswith("#version"):
      merges = merges[1:]  # header line of the format
    merges = [m for m in merges if m]
    bad = [m for m in merges if len(m) != 2]
    if bad:
      raise ValueError(f"{merges_file}: a merges line holds two tokens, got {bad[0]}")
    # Every merge listed is used (HF's merges.txt lists CLIP's 48894); a merge whose result
    # is not in vocab.json yields the unknown token, as transformers does.
    self.ranks = {(a, b): rank for rank, (a, b) in enumerate(merges)}
    self.decoder = {i: token for token, i in self.vocab.items()}
    self.start_id, self.end_id = self._id(start_token), self._id(end_token)
    self.unk_id = self._id(unk_token)
    self.vocab_size = max(self.vocab.values()) + 1
    self.pad_id = self._id(pad_token) if isinstance(pad_token, str) else int(pad_token)
    if not 0 <= self.pad_id < self.vocab_size:
      raise ValueError(f"pad id {self.pad_id} is outside the vocabulary's {self.vocab_size}")
    self.max_length = max_length
    self._cache: dict[str, tuple[int, ...]] = {}

  def _id(self, token: str) -> int:
    if token not in self.vocab:
      raise ValueError(f"the CLIP vocabulary has no token {token!r}")
    return self.vocab[token]

  @classmethod
  def from_folder(cls, folder: str, max_length: int | None = None,
                  pad_token: str | int | None = None) -> "CLIPTokenizer":
    """From a transformers / diffusers tokenizer folder; `max_length` and `pad_token`
    override the folder's model_max_length and pad token."""
    for name in ("vocab.json", "merges.txt"):
      if not fs.isfile(fs.join(folder, name)):
        raise FileNotFoundError(
            f"{folder!r} is not a CLIP tokenizer folder: it has no {name}. Expected "
            "vocab.json and merges.txt (plus optionally tokenizer_config.json and "
            "special_tokens_map.json), as in a diffusers pipeline's tokenizer/ folder")
    settings = _folder_settings(folder)
    tokens = {k: settings[k] for k in ("start_token", "end_token", "unk_token")
              if k in settings}
    return cls(fs.join(folder, "vocab.json"), fs.join(folder, "merges.txt"),
               max_length=settings.get("max_length", 77) if max_length is None else max_length,
               pad_token=settings.get("pad_token", END) if pad_token is None else pad_token,
               **tokens)

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    texts = _as_list(texts)
    encoded = [self.encode(t) for t in texts]
    room = self.max_length - 2
    dropped = [len(ids) - room for ids in encoded if len(ids) > room]
    if dropped:  # one line per batch, not per caption: datasets hold many long ones
      logging.warning("CLIPTokenizer: %d of %d texts longer than max_length=%d tokens "
                      "(start and end included) were cut, dropping %d tokens (at most %d "
                      "from one text)", len(dropped), len(texts), self.max_length,
                      sum(dropped), max(dropped))
    rows = [_frame(ids, self.start_id, self.end_id, self.pad_id, self.max_length)
            for ids in encoded]
    return np.asarray(rows, np.int32).reshape(len(rows), self.max_length)

  def encode(self, text: str) -> list[int]:
    """Ids of `text` without the start/end markers or padding."""
    ids = []
    for word in split_words(clean_text(_as_text(text))):
      if word in (START, END) and word in self.vocab:  # typed in the text: still special
        ids.append(self.vocab[word])
        continue
      if word not in self._cache:
        if len(self._cache) >= _CACHE_SIZE:
          self._cache.clear()
        self._cache[word] = self._bpe("".join(_BYTE_CHARS[b] for b in word.encode("utf-8")))
      ids.extend(self._cache[word])
    return ids

  def _bpe(self, word: str) -> tuple[int, ...]:
    """Merges the lowest-ranked adjacent pair, everywhere in the word, until none is left."""
    parts = [*word[:-1], word[-1] + _WORD_END]
    while len(parts) > 1:
      best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, _NEVER))
      if best not in self.ranks:
        break
      merged, k = [], 0
      while k < len(parts):
        if k + 1 < len(parts) and (parts[k], parts[k + 1]) == best:
          merged.append(parts[k] + parts[k + 1])
          k += 2
        else:
          merged.append(parts[k])
          k += 1
      parts = merged
    return tuple(self.vocab.get(part, self.unk_id) for part in parts)

  def decode(self, ids: Sequence[int]) -> str:
    """Cleaned text back from ids: the start marker skipped, stopped at the end marker
    (so padding goes, whatever the pad token)."""
    data = bytearray()
    for i in (int(i) for i in ids):
      if i == self.end_id:
        break
      token = self.decoder.get(i)
      if i == self.start_id or token is None:
        continue
      if token.endswith(_WORD_END):
        data += bytes(_CHAR_BYTES[c] for c in token[:-len(_WORD_END)]) + b" "
      else:
        data += bytes(_CHAR_BYTES[c] for c in token)
    return data.decode("utf-8", errors="replace").strip()


def _folder_settings(folder: str) -> dict:
  """Special tokens and length from a transformers tokenizer folder's json files.

  special_tokens_map.json wins over tokenizer_config.json: SD2's diffusers folder says
  "<|endoftext|>" in the second and "!" in the first, and "!" (id 0) is what SD2 pads with.
  """
  settings = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = fs.join(folder, name)
    if not fs.isfile(path):
      continue
    config = json.loads(fs.read_text(path))
    for key, ours in (("bos_token", "start_token"), ("eos_token", "end_token"),
                      ("unk_token", "unk_token"), ("pad_token", "pad_token")):
      token = config.get(key)
      if isinstance(token, dict):  # a serialized AddedToken
        token = token.get("content")
      if isinstance(token, str):
        settings[ours] = token
    length = config.get("model_max_length")
    # transformers writes a huge number (1e30) for "no limit"; CLIP's is 77.
    if isinstance(length, (int, float)) and 2 <= length <= 1 << 20:
      settings["max_length"] = int(length)
  return settings


def _dirname(path: str) -> str:
  return posixpath.dirname(path) if fs.is_remote(path) else os.path.dirname(path)


def make_tokenizer(vocab_file: str = "", max_length: int | None = None,
                   pad_token: str | int | None = None):
  """The tokenizer a vocabulary path names: empty -> bytes; a BERT `vocab.txt` ->
  WordPiece; a CLIP tokenizer folder (vocab.json + merges.txt) or its vocab.json -> CLIP.

  `max_length` None means the CLIP folder's model_max_length, else 77; `pad_token` (CLIP
  only) overrides the folder's.
  """
  if not vocab_file:
    return ByteTokenizer(max_length or 77)
  vocab_file = os.fspath(vocab_file)
  if vocab_file.endswith(".json"):
    if posixpath.basename(vocab_file.replace(os.sep, "/")) != "vocab.json":
      raise ValueError(f"{vocab_file!r}: for a CLIP tokenizer name its folder or the "
                       "vocab.json in it (merges.txt is read from beside it)")
    return CLIPTokenizer.from_folder(_dirname(vocab_file), max_length, pad_token)
  if fs.isdir(vocab_file):
    if fs.isfile(fs.join(vocab_file, "vocab.txt")):
      return WordPieceTokenizer(fs.join(vocab_file, "vocab.txt"), max_length or 77)
    return CLIPTokenizer.from_folder(vocab_file, max_length, pad_token)
  return WordPieceTokenizer(vocab_file, max_length or 77)
