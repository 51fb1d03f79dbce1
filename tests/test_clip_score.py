"""The CLIP score: ldm_jax's CLIP image tower against transformers' CLIPModel on random
weights, its preprocessing against CLIPImageProcessor, the whole score against a direct
torch computation, and the generation evaluator's clip_score row."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.convert.clip_vision import load_clip_model, load_vision_encoder
from ldm_jax.convert.files import WeightFileError
from ldm_jax.eval.clip_score import Preprocess, load_clip_scorer
from ldm_jax.eval.generation import GenerationEvaluator
from ldm_jax.eval.workdir import markdown_table

from sd_fixtures import PROMPTS, perturb, vocab_size, write_tokenizer

import transformers  # the [test] extra installs it
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4)
CAPTIONS = (*PROMPTS, "a red dog", "the moon painting")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  """A tiny CLIPModel saved as transformers saves it, with its tokenizer and image
  processor files in the same folder (as openai/clip-* hub folders hold them)."""
  folder = tmp_path_factory.mktemp("clip")
  write_tokenizer(folder)
  vocab = json.loads((folder / "vocab.json").read_text())
  end, start = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size(folder), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                       eos_token_id=end, bos_token_id=start, pad_token_id=end),
      vision_config=VISION, projection_dim=16)
  torch.manual_seed(0)
  model = perturb(transformers.CLIPModel(config), scale=0.2)
  with torch.no_grad():  # projections and the class token far from their small init
    for p in (model.visual_projection.weight, model.text_projection.weight,
              model.vision_model.embeddings.class_embedding):
      p.normal_(0, 0.5)
  model.save_pretrained(folder)
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                              crop_size={"height": 32, "width": 32})
  processor.save_pretrained(folder)
  return folder, model.eval(), processor


def _images(n, h, w, seed=0):
  """uint8 photos stand-ins: smooth colour ramps plus noise (resizing must do real work)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  base = np.stack([yy, xx, (yy + xx) / 2], -1)[None] * rng.uniform(100, 255, (n, 1, 1, 3))
  return np.clip(base + rng.normal(0, 25, (n, h, w, 3)), 0, 255).astype(np.uint8)


def _signed(images):  # uint8 -> [-1, 1], exactly what an 8-bit sample maps back to
  return jnp.asarray(images.astype(np.float32) / 127.5 - 1.0)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def test_image_embeddings_match_transformers(clip_folder):
  folder, model, _ = clip_folder
  pixels = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
  spec, vision = load_vision_encoder(folder)
  assert (spec.image_size, spec.patch_size, spec.projection_dim) == (32, 8, 16)
  out = vision.encode(jnp.asarray(pixels))
  with torch.no_grad():
    theirs = model.get_image_features(pixel_values=_nchw(pixels))
    theirs = getattr(theirs, "pooler_output", theirs)
    pooled = model.vision_model(pixel_values=_nchw(pixels)).pooler_output
  np.testing.assert_allclose(np.asarray(out.embeds), theirs.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out.pooled), pooled.numpy(), atol=1e-4, rtol=1e-4)


def test_vision_only_folders(clip_folder, tmp_path):
  """CLIPVisionModelWithProjection (keys with vision_model.) and a bare CLIPVisionModel
  (transformers 5 saves it without the prefix) load the same tower."""
  folder, model, _ = clip_folder
  pixels = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  config = transformers.CLIPVisionConfig(**VISION, projection_dim=16)
  with_proj = transformers.CLIPVisionModelWithProjection(config).eval()
  bare = transformers.CLIPVisionModel(config).eval()
  with_proj.vision_model.load_state_dict(model.vision_model.state_dict())
  with_proj.visual_projection.load_state_dict(model.visual_projection.state_dict())
  bare.load_state_dict(model.vision_model.state_dict())
  with_proj.save_pretrained(tmp_path / "proj")
  bare.save_pretrained(tmp_path / "bare")
  with torch.no_grad():
    embeds = with_proj(pixel_values=_nchw(pixels)).image_embeds.numpy()
    pooled = bare(pixel_values=_nchw(pixels)).pooler_output.numpy()
  _, ours = load_vision_encoder(tmp_path / "proj")
  np.testing.assert_allclose(np.asarray(ours.encode(jnp.asarray(pixels)).embeds), embeds,
                             atol=1e-4, rtol=1e-4)
  spec, ours = load_vision_encoder(tmp_path / "bare")
  out = ours.encode(jnp.asarray(pixels))
  assert spec.projection_dim == 0 and out.embeds is None
  np.testing.assert_allclose(np.asarray(out.pooled), pooled, atol=1e-4, rtol=1e-4)


def test_text_embeddings_match_transformers(clip_folder):
  folder, model, _ = clip_folder
  parts = load_clip_model(folder)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
  ids = tokenizer(list(CAPTIONS), padding="max_length", max_length=77,
                  return_tensors="pt").input_ids
  with torch.no_grad():
    theirs = model.get_text_features(input_ids=ids)
    theirs = getattr(theirs, "pooler_output", theirs)
  ours = parts.text.encode(jnp.asarray(ids.numpy())).embeds
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(32, 32), (40, 56), (64, 48)])
def test_preprocessing_matches_clip_image_processor(clip_folder, shape):
  folder, _, processor = clip_folder
  images = _images(3, *shape)
  theirs = processor(images=list(images), return_tensors="np").pixel_values
  ours = np.transpose(np.asarray(Preprocess.from_folder(folder, 32)(_signed(images))),
                      (0, 3, 1, 2))
  assert ours.shape == theirs.shape
  if shape == (32, 32):  # no resize: exact
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
  else:  # PIL's fixed-point filter may round a rare pixel to the next 8-bit level
    step = 1 / 255 / np.asarray(processor.image_std).min()
    assert np.abs(ours - theirs).max() <= 1.01 * step
    assert np.mean(np.abs(ours - theirs) > 1e-5) < 0.005


def _torch_clip_score(model, processor, folder, images, captions):
  """Per-sample 100 * cos as torchmetrics' CLIPScore computes it, with transformers'
  own processor and tokenizer."""
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
  pixels = torch.from_numpy(processor(images=list(images), return_tensors="np").pixel_values)
  ids = tokenizer(list(captions), padding=True, return_tensors="pt")
  with torch.no_grad():
    img = model.get_image_features(pixel_values=pixels)
    txt = model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
  img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
  img = img / img.norm(p=2, dim=-1, keepdim=True)
  txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
  return (100 * (img * txt).sum(-1)).numpy()


# At 40x56 the two-pass 8-bit resize reproduces PIL's bit for bit on these images; where
# PIL's fixed-point weights round a rare pixel the other way (0.1% of them at 64x48, see
# above), a random-weight tower moves the score by ~4e-3.
@pytest.mark.parametrize("shape", [(32, 32), (40, 56)])
def test_clip_score_equals_torch(clip_folder, shape):
  folder, model, processor = clip_folder
  images = _images(len(CAPTIONS), *shape, seed=3)
  theirs = _torch_clip_score(model, processor, folder, images, CAPTIONS)
  scorer = load_clip_scorer(folder)
  ours = scorer.score(_signed(images), np.asarray(CAPTIONS))
  assert np.ptp(theirs) > 1  # the pairs differ: a wrong pairing would show
  tol = 1e-3
  np.testing.assert_allclose(ours, theirs, atol=tol)
  assert abs(max(ours.mean(), 0) - max(theirs.mean(), 0)) < tol


class _FakeInception(nnx.Module):
  """Stands in for InceptionV3 (its outputs' names and ranks), at no compile cost."""

  def __init__(self):
    self.proj = nnx.Linear(3, 8, rngs=nnx.Rngs(0))

  def __call__(self, images):
    pool = self.proj(images.mean(axis=(1, 2)))
    return {"pool": pool, "logits_unbiased": jnp.concatenate([pool, -pool], -1)}


def _evaluate(clip_scorer, batches, images):
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = NamedSharding(mesh, P("data"))

  def sample_fn(state, batch, index, key, num):
    return jax.device_put(jnp.asarray(images[index]), sharding)

  evaluator = GenerationEvaluator(sample_fn, mesh, sharding, _FakeInception(),
                                  clip_scorer=clip_scorer)
  return evaluator.evaluate(None, batches)


def test_generation_evaluator_reports_clip_score(clip_folder):
  folder, _, _ = clip_folder
  scorer = load_clip_scorer(folder)
  images = [_signed(_images(4, 32, 32, seed=s)) for s in (4, 5)]
  captions = [np.asarray(CAPTIONS), np.asarray(["a cat", "a dog", "", ""])]
  masks = [np.ones(4, bool), np.asarray([True, True, False, False])]  # padded last batch
  batches = [{"image": np.asarray(im), "mask": m, "caption": c}
             for im, m, c in zip(images, masks, captions)]
  out = _evaluate(scorer, batches, images)
  direct = np.concatenate([scorer.score(im, c)[m] for im, c, m in zip(images, captions, masks)])
  assert out.metrics["num_examples"] == 6
  np.testing.assert_allclose(out.clip_scores, direct, atol=1e-5)
  assert out.metrics["clip_score"] == pytest.approx(max(direct.mean(), 0), abs=1e-4)
  assert out.metrics["clip_score_std"] == pytest.approx(direct.std(), abs=1e-4)
  # The CLIP folder's tokenizer ids given directly score the same.
  same = _evaluate(scorer, [{**b, "clip_tokens": scorer.tokenize(b.pop("caption"))}
                            for b in [dict(b) for b in batches]], images)
  assert same.metrics["clip_score"] == pytest.approx(out.metrics["clip_score"], abs=1e-5)
  table = markdown_table({"step": 1, "split": "val", "num_examples": 6, "weights": "ema",
                          "metrics": out.metrics})
  assert "| CLIP score ↑ |" in table

  plain = _evaluate(None, batches, images)
  assert "clip_score" not in plain.metrics and plain.clip_scores is None
  assert plain.metrics["fid"] == pytest.approx(out.metrics["fid"])
  with pytest.raises(ValueError, match="caption"):
    _evaluate(scorer, [{k: v for k, v in b.items() if k != "caption"} for b in batches],
              images)


def test_not_a_clip_folder(tmp_path, clip_folder):
  with pytest.raises(WeightFileError, match="no config.json"):
    load_clip_scorer(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert",
                                                    "architectures": ["BertModel"]}))
  with pytest.raises(WeightFileError, match="not a transformers CLIP model folder"):
    load_clip_scorer(tmp_path)
  with pytest.raises(WeightFileError, match="not a transformers CLIP model folder"):
    load_vision_encoder(tmp_path)
  vision = tmp_path / "vision"
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(vision)
  with pytest.raises(WeightFileError, match="CLIPModel"):  # one tower is not a CLIP model
    load_clip_scorer(vision)
  with pytest.raises(WeightFileError, match="no CLIP model folder"):
    load_clip_scorer(tmp_path / "missing")


def test_eval_config_key(tmp_path):
  import ml_collections
  from ldm_jax.eval.setup import eval_clip_scorer, eval_config
  config = ml_collections.ConfigDict({"eval": {}})
  assert eval_config(config).clip_model == "" and eval_clip_scorer(config) is None
  config.eval.clip_model = str(tmp_path / "nowhere")
  with pytest.raises(WeightFileError):
    eval_clip_scorer(config)
