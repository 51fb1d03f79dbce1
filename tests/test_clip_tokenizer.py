"""CLIPTokenizer against transformers' CLIPTokenizer and open_clip's, on vocabularies the
test writes itself (no downloads): a small BPE learned here, laid out as CLIP's vocab.json
is, and CLIP's real merges when the open_clip package (which ships them) is installed.
"""

import collections
import gzip
import html
import importlib.util
import json
import logging
import os
import pickle
import random
import sys
import unicodedata

import numpy as np
import pytest

from ldm_jax.data import tokenizer as tokenizer_lib
from ldm_jax.data.tokenizer import (ByteTokenizer, CLIPTokenizer, WordPieceTokenizer,
                                    make_tokenizer)

import ftfy  # a main dependency
import transformers  # the [test] extra installs it

START, END = "<|startoftext|>", "<|endoftext|>"
FIXED = [
    "", "a photo of a cat", "A Photo Of A CAT", "Don't you DARE, it's   fine\n\n\tok",
    "we're here, they've gone, I'm sure you'll see, he'd say 'tis", "hello'sworld",
    "'s 're 've 'm 'll 'd 't 'x ''s", "café Ｃａｆé naïve cafe\u0301 résumé", "Straße İstanbul ǅ",
    "猫と犬 東京タワー 한국어 漢字", "emoji 🐱🚀👍🏽 mix ❤️", "fish &amp; chips &lt;3 &amp;amp; &eacute;",
    "<b>&amp;</b> a < b", "1234567 3.14 ½ ² ٣", "it’s “quoted” — dash", "Ã©tÃ© mojibake",
    "<|endoftext|> inside", "a<|startoftext|>b", "!!!??? ...,,, --- ###", "нет мира",
    "नमस्ते दुनिया", "مرحبا بالعالم", "ﬁne ligature", "tab\tsep\u3000ideo\u00a0nbsp",
    "zero\u200bwidth", "ctrl\x00\x07chars", "a \u2028 b\r\nc", "   leading and trailing   ",
    "MiXeD CaSe 4K HDR 8k", "trending on artstation, octane render, 4k, highly detailed",
    "x" * 300, " ".join(["word"] * 100), "a, " * 60, "über " * 50 + "end",
]
# Random strings over characters the small vocabulary merges and ones it does not.
_ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789   ''\"!?.,;:-")
             + list("_()[]{}&#@/\\\n\téü漢字🙂ß") + ["&amp;", "don't", " it's", "photo", "  "])
_rng = random.Random(0)
TEXTS = FIXED + ["".join(_rng.choice(_ALPHABET) for _ in range(_rng.randint(0, 100)))
                 for _ in range(300)]


def clip_clean(text):
  """OpenAI CLIP's cleaning before the normalizer transformers' (Rust) tokenizer applies,
  which lacks ftfy and HTML unescaping."""
  return html.unescape(html.unescape(ftfy.fix_text(text)))


def byte_chars():
  """CLIP's byte -> character table, in vocabulary order (written out here, not imported,
  so the test checks the module's own table)."""
  kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
  return [chr(b) for b in kept] + [chr(256 + n) for n in range(256 - len(kept))], kept


def byte_encode(word):
  chars, kept = byte_chars()
  table = dict(zip(kept + [b for b in range(256) if b not in kept], chars))
  return "".join(table[b] for b in word.encode("utf-8"))


def learn_merges(texts, count):
  """A few hundred BPE merges on byte-encoded words: enough to exercise ranks."""
  words = collections.Counter()
  for text in texts:
    for word in tokenizer_lib.split_words(clip_clean(text).lower()):
      encoded = byte_encode(word)
      words[tuple(encoded[:-1]) + (encoded[-1] + "</w>",)] += 1
  merges = []
  for _ in range(count):
    pairs = collections.Counter()
    for word, n in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    joined = collections.Counter()
    for word, n in words.items():
      out, k = [], 0
      while k < len(word):
        if word[k:k + 2] == best:
          out.append(word[k] + word[k + 1])
          k += 2
        else:
          out.append(word[k])
          k += 1
      joined[tuple(out)] += n
    words = joined
  return merges


def write_vocab(folder, merges):
  """vocab.json + merges.txt as CLIP lays them out: bytes, bytes + </w>, merges, specials."""
  chars, _ = byte_chars()
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [START, END]
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return str(folder)


def write_diffusers_folder(folder, merges, pad_token, config_pad_token=END,
                           model_max_length=77):
  """A diffusers pipeline's tokenizer/ folder. SD2's says pad "<|endoftext|>" in
  tokenizer_config.json and "!" in special_tokens_map.json (which wins)."""
  write_vocab(folder, merges)
  token = lambda t: {"content": t, "lstrip": False, "normalized": True, "rstrip": False,
                     "single_word": False}
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"add_prefix_space": False, "bos_token": token(START), "do_lower_case": True,
               "eos_token": token(END), "errors": "replace",
               "model_max_length": model_max_length, "pad_token": config_pad_token,
               "tokenizer_class": "CLIPTokenizer", "unk_token": token(END)}, f)
  with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
    json.dump({"bos_token": token(START), "eos_token": token(END), "pad_token": pad_token,
               "unk_token": token(END)}, f)
  return str(folder)


@pytest.fixture(scope="module")
def merges():
  return learn_merges(TEXTS[:150], 400)


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory, merges):
  return write_diffusers_folder(tmp_path_factory.mktemp("sd1") / "tokenizer", merges, END)


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory, merges):
  return write_diffusers_folder(tmp_path_factory.mktemp("sd2") / "tokenizer", merges, "!")


def reference_ids(folder, texts, **kwargs):
  ref = transformers.CLIPTokenizer.from_pretrained(folder, **kwargs)
  out = ref(texts, padding="max_length", max_length=77, truncation=True)
  return np.asarray(out["input_ids"]), ref


def comparable(texts, pad_token=END):
  # Python lower-cases a final Σ to ς, the Rust normalizer to σ: the Python references
  # (open_clip, transformers 4's slow tokenizer) agree with us there.
  texts = [t for t in texts if "Σ" not in t]
  if pad_token == "!":
    # transformers makes every "!" in the text the pad token (id 0; diffusers issue
    # #4153); SD2 was trained with open_clip, which BPE-encodes it: we do as open_clip.
    texts = [t for t in texts if "!" not in clip_clean(t)]
  return texts


@pytest.mark.parametrize("folder_name,pad_token", [("sd1_folder", END), ("sd2_folder", "!")])
def test_matches_transformers(folder_name, pad_token, request):
  folder = request.getfixturevalue(folder_name)
  ours = CLIPTokenizer.from_folder(folder)
  texts = comparable(TEXTS, pad_token)
  assert len(texts) > 200
  ids = ours(texts)
  assert ids.shape == (len(texts), 77) and ids.dtype == np.int32
  # transformers 5 keeps only the Rust tokenizer (CLIPTokenizerFast is the same class),
  # which skips ftfy and HTML unescaping: hand it CLIP's cleaning first ...
  expected, ref = reference_ids(folder, [clip_clean(t) for t in texts])
  np.testing.assert_array_equal(ids, expected)
  assert ours.pad_id == ref.pad_token_id and ours.vocab_size == len(ref)
  assert (ours.start_id, ours.end_id) == (ref.bos_token_id, ref.eos_token_id)
  # ... and texts cleaning leaves alone it must tokenize as given.
  plain = [t for t in texts if clip_clean(t) == unicodedata.normalize("NFC", t)]
  assert len(plain) > 150
  np.testing.assert_array_equal(CLIPTokenizer.from_folder(folder)(plain),
                                reference_ids(folder, plain)[0])
  fast = getattr(transformers, "CLIPTokenizerFast", None)
  if fast is not None and fast is not transformers.CLIPTokenizer:
    out = fast.from_pretrained(folder)([clip_clean(t) for t in texts], padding="max_length",
                                       max_length=77, truncation=True)
    np.testing.assert_array_equal(ids, np.asarray(out["input_ids"]))


def test_pad_conventions(sd1_folder, sd2_folder):
  sd1, sd2 = CLIPTokenizer.from_folder(sd1_folder), CLIPTokenizer.from_folder(sd2_folder)
  assert sd1.pad_id == sd1.end_id == sd1.vocab[END] == sd1.vocab_size - 1
  assert sd2.pad_id == sd2.vocab["!"] == 0
  a, b = sd1(["a photo"])[0], sd2(["a photo"])[0]
  n = int(np.argmax(a == sd1.end_id)) + 1  # ids up to the end marker are the same
  np.testing.assert_array_equal(a[:n], b[:n])
  assert (a[n:] == sd1.end_id).all() and (b[n:] == 0).all()
  # In the text "!" stays the word-final "!" token, as open_clip (which trained SD2) has it.
  assert sd2.encode("wow!")[-1] == sd2.vocab["!</w>"] != sd2.pad_id
  # open_clip's own convention, or any other, by override (a token or an id).
  assert CLIPTokenizer.from_folder(sd1_folder, pad_token="!").pad_id == 0
  assert CLIPTokenizer.from_folder(sd2_folder, pad_token=END).pad_id == sd2.end_id
  assert CLIPTokenizer.from_folder(sd1_folder, pad_token=0).pad_id == 0
  with pytest.raises(ValueError, match="no token"):
    CLIPTokenizer.from_folder(sd1_folder, pad_token="<pad>")


def test_from_files_and_lengths(tmp_path, merges, sd1_folder):
  bare = write_vocab(tmp_path / "bare", merges)  # no json settings: transformers' defaults
  tok = CLIPTokenizer(os.path.join(bare, "vocab.json"), os.path.join(bare, "merges.txt"))
  assert tok.max_length == 77 and tok.pad_id == tok.end_id
  np.testing.assert_array_equal(tok(TEXTS[:20]), CLIPTokenizer.from_folder(sd1_folder)(TEXTS[:20]))
  unlimited = write_diffusers_folder(tmp_path / "big", merges, END, model_max_length=int(1e30))
  assert CLIPTokenizer.from_folder(unlimited).max_length == 77
  short = write_diffusers_folder(tmp_path / "short", merges, END, model_max_length=16)
  assert CLIPTokenizer.from_folder(short).max_length == 16
  assert CLIPTokenizer.from_folder(short)(["a"]).shape == (1, 16)
  assert CLIPTokenizer.from_folder(short, max_length=8).max_length == 8


def test_truncation_warns_once_per_call(sd1_folder, caplog):
  tok = CLIPTokenizer.from_folder(sd1_folder)
  long = " ".join(["a"] * 90)  # 90 tokens: 75 kept between start and end
  with caplog.at_level(logging.WARNING):
    ids = tok([long, "a cat", long + " a"])
  records = [r for r in caplog.records if "CLIPTokenizer" in r.getMessage()]
  assert len(records) == 1
  message = records[0].getMessage()
  assert "2 of 3 texts" in message and "dropping 31 tokens" in message
  assert "at most 16" in message
  assert ids[0, -1] == ids[2, -1] == tok.end_id and (ids[0, 1:-1] == tok.vocab["a</w>"]).all()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    tok(["a cat"])
  assert not [r for r in caplog.records if "CLIPTokenizer" in r.getMessage()]


def test_missing_files(tmp_path, sd1_folder):
  folder = tmp_path / "tokenizer"
  folder.mkdir()
  (folder / "vocab.json").write_text(open(os.path.join(sd1_folder, "vocab.json")).read())
  with pytest.raises(FileNotFoundError, match=r"no merges\.txt.*tokenizer/ folder"):
    CLIPTokenizer.from_folder(str(folder))
  with pytest.raises(FileNotFoundError, match=r"no merges\.txt"):
    make_tokenizer(str(folder))
  with pytest.raises(FileNotFoundError, match=r"no vocab\.json"):
    make_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="merges"):
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def test_make_tokenizer(tmp_path, sd1_folder, sd2_folder):
  assert isinstance(make_tokenizer(""), ByteTokenizer)
  assert make_tokenizer("").max_length == 77
  for path in (sd1_folder, os.path.join(sd1_folder, "vocab.json")):
    tok = make_tokenizer(path)
    assert isinstance(tok, CLIPTokenizer) and tok.max_length == 77
  assert make_tokenizer(sd2_folder).pad_id == 0
  assert make_tokenizer(sd2_folder, 32, pad_token=END).max_length == 32
  assert make_tokenizer(sd2_folder, pad_token=END).pad_id == make_tokenizer(sd1_folder).pad_id
  with pytest.raises(ValueError, match="vocab.json"):
    make_tokenizer(os.path.join(sd1_folder, "tokenizer_config.json"))
  vocab_txt = tmp_path / "vocab.txt"
  vocab_txt.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\ncat\n")
  assert isinstance(make_tokenizer(str(vocab_txt)), WordPieceTokenizer)
  assert isinstance(make_tokenizer(str(tmp_path)), WordPieceTokenizer)  # a BERT folder


def test_decode_and_pickle(sd1_folder, sd2_folder):
  for folder in (sd1_folder, sd2_folder):
    tok = CLIPTokenizer.from_folder(folder)
    ids = tok(["A photo of a CAT!", "café 猫 🙂 don't", ""])
    assert tok.decode(ids[0]) == "a photo of a cat !"
    assert tok.decode(ids[1]) == "café 猫 🙂 don 't"
    assert tok.decode(ids[2]) == ""
    copy = pickle.loads(pickle.dumps(tok))  # grain workers receive the tokenizer pickled
    np.testing.assert_array_equal(copy(TEXTS[:30]), tok(TEXTS[:30]))


def test_without_ftfy(sd1_folder, monkeypatch, caplog):
  tok = CLIPTokenizer.from_folder(sd1_folder)
  monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy raises ImportError
  monkeypatch.setattr(tokenizer_lib, "_ftfy_missing_logged", False)
  with caplog.at_level(logging.WARNING):
    ids = tok(["cafe\u0301 &amp; it’s", "more"])
  assert sum("ftfy is not installed" in r.getMessage() for r in caplog.records) == 1
  # NFC and HTML unescaping still happen; the curly apostrophe stays, so no contraction.
  assert tok.decode(ids[0]) == "café & it ’ s"


def _open_clip_tokenizer_module():
  """open_clip's tokenizer.py on its own: the package's __init__ needs torchvision."""
  spec = importlib.util.find_spec("open_clip")
  # The README's test command installs open-clip-torch: its absence is a broken setup,
  # not a reason to skip the comparison with the real merges.
  assert spec is not None and spec.submodule_search_locations, (
      "open_clip is not installed: pip install --no-deps open-clip-torch==3.3.0")
  root = spec.submodule_search_locations[0]
  module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer",
                                                       os.path.join(root, "tokenizer.py"))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)  # needs ftfy and regex (transformers brings it)
  return module, os.path.join(root, "bpe_simple_vocab_16e6.txt.gz")


def test_real_clip_vocabulary_matches_open_clip_and_transformers(tmp_path):
  """CLIP's own 48894 merges (shipped inside open_clip), in HF's vocab.json layout."""
  module, bpe_path = _open_clip_tokenizer_module()
  with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")[1:49152 - 256 - 2 + 1]
  folder = write_diffusers_folder(tmp_path / "tokenizer", [tuple(l.split()) for l in lines],
                                  END)
  ours = CLIPTokenizer.from_folder(folder)
  assert ours.vocab_size == 49408 and ours.pad_id == ours.end_id == 49407
  assert ours.start_id == 49406
  texts = comparable(TEXTS)
  expected, _ = reference_ids(folder, [clip_clean(t) for t in texts])
  np.testing.assert_array_equal(ours(texts), expected)
  # open_clip names its specials <start_of_text>/<end_of_text>: leave them out of the text.
  texts = [t for t in TEXTS if "<|" not in t] + ["! !! !!!", "wow!"]
  ours = CLIPTokenizer.from_folder(folder, pad_token="!")
  reference = module.SimpleTokenizer(bpe_path=bpe_path)  # pads with 0, as SD2 does
  np.testing.assert_array_equal(ours(texts), reference(texts).numpy())
  # The ids diffusers issue #4153 quotes for open_clip.
  assert ours.encode("! !! !!!") == [256, 748, 995]


def test_reads_a_gcs_folder(gcs_bucket, sd2_folder):
  from ldm_jax import fs
  folder = f"{gcs_bucket}/clip_tokenizer/tokenizer"
  for name in os.listdir(sd2_folder):
    fs.write_bytes(fs.join(folder, name), open(os.path.join(sd2_folder, name), "rb").read())
  remote = make_tokenizer(folder)
  assert isinstance(remote, CLIPTokenizer) and remote.pad_id == 0
  local = CLIPTokenizer.from_folder(sd2_folder)
  np.testing.assert_array_equal(remote(TEXTS[:20]), local(TEXTS[:20]))
  assert make_tokenizer(fs.join(folder, "vocab.json")).pad_id == 0
  with pytest.raises(FileNotFoundError, match="no vocab.json"):
    make_tokenizer(f"{gcs_bucket}/clip_tokenizer")
