"""Condition encoders and tokenizers: shapes, PyTorch parity, BERT tokenization parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from ldm_jax.data.tokenizer import ByteTokenizer, WordPieceTokenizer, make_tokenizer
from ldm_jax.models.conditioners import ClassEmbedder, TextEncoder, TextEncoderSpec

SPEC = TextEncoderSpec(vocab_size=50, max_length=12, width=32, depth=2, heads=2, head_dim=8)


class TorchTextEncoder(nn.Module):
  """The same text transformer, written from its description with torch.nn pieces."""

  def __init__(self, spec):
    super().__init__()
    self.spec = spec
    inner = spec.heads * spec.head_dim
    self.tok = nn.Embedding(spec.vocab_size, spec.width)
    self.pos = nn.Parameter(torch.zeros(spec.max_length, spec.width))
    self.blocks = nn.ModuleList()
    for _ in range(spec.depth):
      self.blocks.append(nn.ModuleDict(dict(
          norm1=nn.LayerNorm(spec.width), q=nn.Linear(spec.width, inner, bias=False),
          k=nn.Linear(spec.width, inner, bias=False), v=nn.Linear(spec.width, inner, bias=False),
          out=nn.Linear(inner, spec.width), norm2=nn.LayerNorm(spec.width),
          fc1=nn.Linear(spec.width, spec.width * spec.mlp_mult),
          fc2=nn.Linear(spec.width * spec.mlp_mult, spec.width))))
    self.final = nn.LayerNorm(spec.width)

  def forward(self, tokens):
    b, n = tokens.shape
    h, d = self.spec.heads, self.spec.head_dim
    x = self.tok(tokens) + self.pos[:n]
    for blk in self.blocks:
      y = blk["norm1"](x)
      q, k, v = (blk[name](y).view(b, n, h, d).transpose(1, 2) for name in "qkv")
      attn = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)
      x = x + blk["out"]((attn @ v).transpose(1, 2).reshape(b, n, h * d))
      x = x + blk["fc2"](nn.functional.gelu(blk["fc1"](blk["norm2"](x))))
    return self.final(x)


def _copy_weights(model: TextEncoder, ref: TorchTextEncoder):
  t = lambda a: torch.from_numpy(np.array(a[...]))
  with torch.no_grad():
    ref.tok.weight.copy_(t(model.token_embedding.embedding))
    ref.pos.copy_(t(model.position_embedding))
    for ours, theirs in zip(model.blocks, ref.blocks):
      for name, linear in (("q", ours.attn.to_q), ("k", ours.attn.to_k), ("v", ours.attn.to_v),
                           ("out", ours.attn.to_out), ("fc1", ours.fc1), ("fc2", ours.fc2)):
        theirs[name].weight.copy_(t(linear.kernel).T)
        if linear.bias is not None:
          theirs[name].bias.copy_(t(linear.bias))
      for name, norm in (("norm1", ours.norm1), ("norm2", ours.norm2)):
        theirs[name].weight.copy_(t(norm.scale))
        theirs[name].bias.copy_(t(norm.bias))
    ref.final.weight.copy_(t(model.final_norm.scale))
    ref.final.bias.copy_(t(model.final_norm.bias))


def _randomize(model, seed=0):
  """Every parameter random, so no zero or one initialization can hide a wrong formula."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [0.3 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


def test_text_encoder_matches_torch():
  model = _randomize(TextEncoder(SPEC, rngs=nnx.Rngs(0)))
  ref = TorchTextEncoder(SPEC).eval()
  _copy_weights(model, ref)
  tokens = np.random.default_rng(0).integers(0, SPEC.vocab_size, (3, 10))
  ours = np.asarray(model(jnp.asarray(tokens)))
  with torch.no_grad():
    theirs = ref(torch.from_numpy(tokens)).numpy()
  assert ours.shape == (3, 10, SPEC.width)
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_text_encoder_remat_and_length_check():
  import dataclasses
  model = _randomize(TextEncoder(SPEC, rngs=nnx.Rngs(0)))
  remat = _randomize(TextEncoder(dataclasses.replace(SPEC, remat=True), rngs=nnx.Rngs(0)))
  tokens = jnp.arange(24).reshape(2, 12) % SPEC.vocab_size
  loss = lambda m: jnp.sum(m(tokens)**2)
  g1 = nnx.grad(loss)(model)
  g2 = nnx.grad(loss)(remat)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="max_length"):
    model(jnp.zeros((1, 13), jnp.int32))


def test_class_embedder():
  embedder = ClassEmbedder(11, 16, rngs=nnx.Rngs(0))
  out = embedder(jnp.array([0, 3, embedder.null_class]))
  assert out.shape == (3, 1, 16) and embedder.null_class == 10
  np.testing.assert_array_equal(out[1, 0], embedder.embedding.embedding[...][3])
  with pytest.raises(ValueError, match="null"):
    ClassEmbedder(1, 4, rngs=nnx.Rngs(0))


def test_byte_tokenizer():
  tok = ByteTokenizer(max_length=10)
  ids = tok(["héllo", "a much longer caption"])
  assert ids.shape == (2, 10) and ids.dtype == np.int32
  assert ids[0, 0] == tok.start_id and tok.end_id in ids[0] and ids[0, -1] == tok.pad_id
  assert tok.decode(ids[0]) == "héllo"
  assert ids[1, -1] == tok.end_id  # cut, but still ends with the end marker
  assert ids.max() < tok.vocab_size
  assert isinstance(make_tokenizer(""), ByteTokenizer)


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat",
         "dog", "##s", "run", "##ning", "cafe", ",", ".", "!", "un", "##believ", "##able",
         "猫", "on", "mars", "'", "##'", "s"]


@pytest.fixture
def vocab_file(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
  return str(path)


def test_wordpiece_matches_huggingface_tokenizers(vocab_file):
  from tokenizers import BertWordPieceTokenizer
  reference = BertWordPieceTokenizer(vocab_file, lowercase=True, strip_accents=True,
                                     clean_text=True, handle_chinese_chars=True)
  reference.enable_truncation(16)
  reference.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
  texts = ["A photo of the cats running!", "Café, CAFÉ.", "unbelievable dogs on mars",
           "the 猫 cat", "zebra crossing", "the cat's photo\tof\na dog", "",
           "dogs " * 20]
  ours = WordPieceTokenizer(vocab_file, max_length=16)(texts)
  theirs = np.asarray([e.ids for e in reference.encode_batch(texts)])
  np.testing.assert_array_equal(ours, theirs)


def test_wordpiece_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab"):
    WordPieceTokenizer(str(tmp_path / "missing.txt"))
  bad = tmp_path / "bad.txt"
  bad.write_text("a\nb\n")
  with pytest.raises(ValueError, match="special tokens"):
    WordPieceTokenizer(str(bad))


def test_conditioner_null_conditions():
  from ldm_jax.models.conditioners import Conditioner
  tok = ByteTokenizer(max_length=SPEC.max_length)
  text = Conditioner("text", rngs=nnx.Rngs(0), text=dataclasses_replace(SPEC, vocab_size=259),
                     null_tokens=tok([""])[0])
  null = text.null_fields(3)
  np.testing.assert_array_equal(null["tokens"], np.stack([tok([""])[0]] * 3))
  assert text(null).shape == (3, SPEC.max_length, SPEC.width) and text.fields == ("tokens",)
  label = Conditioner("class", rngs=nnx.Rngs(0), num_classes=5, embed_dim=8)
  np.testing.assert_array_equal(label.null_fields(2)["label"], [4, 4])
  assert label({"label": jnp.array([0, 1])}).shape == (2, 1, 8)
  assert Conditioner("none", rngs=nnx.Rngs(0))({}) is None
  with pytest.raises(ValueError, match="cond.kind"):
    Conditioner("concat", rngs=nnx.Rngs(0))


def dataclasses_replace(spec, **changes):
  import dataclasses
  return dataclasses.replace(spec, **changes)
