"""SD's CLIP text encoders: parity with transformers' CLIPTextModel and open_clip's
TextTransformer on random weights, the single-file SD1 / SD2 layouts, and the export."""

import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ldm_jax.convert.files import WeightFileError, read_tensors
from ldm_jax.convert.text_encoder import (from_open_clip, load_text_encoder, save_text_encoder,
                                          to_open_clip)
from ldm_jax.convert.torch_layout import StateMismatchError
from ldm_jax.models.clip import SD1_TEXT, SD2_TEXT, CLIPTextSpec, CLIPTextTransformer

VOCAB, EOS = 1000, 999  # CLIP's end-of-text id is the largest of its vocabulary
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _ids(pad: int, seed: int = 0) -> np.ndarray:
  """Two captions of different lengths: start id, words, end-of-text, then padding."""
  rng = np.random.default_rng(seed)
  ids = np.full((2, 77), pad, np.int64)
  for row, n in enumerate((9, 30)):
    ids[row, 0] = EOS - 1
    ids[row, 1:n] = rng.integers(3, EOS - 1, n - 1)
    ids[row, n] = EOS
  return ids


def _randomize(model, seed=0, scale=0.2):
  """Every weight random, so no default init can hide a wrong formula; large enough that
  the MLP works outside the activation's linear range (quick GELU's 1.702 matters)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      norm_scale = name.endswith("weight") and p.ndim == 1  # LayerNorm gains near 1
      p.copy_(1 + 0.1 * torch.randn_like(p) if norm_scale else torch.randn_like(p) * scale)
  return model.eval()


def _close(ours, theirs):
  np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), atol=ATOL, rtol=ATOL)


def _transformers_model(projection=False, seed=0, **config):
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
  values = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=48, eos_token_id=2, bos_token_id=0, pad_token_id=1)
  values.update(config)
  klass = CLIPTextModelWithProjection if projection else CLIPTextModel
  return _randomize(klass(CLIPTextConfig(**values)), seed)


# --- open_clip without its package import ------------------------------------------------


@pytest.fixture(scope="module")
def open_clip_transformer():
  """open_clip's `transformer` module, loaded without running open_clip/__init__.py:
  the package imports torchvision at import time, and no torchvision wheel imports beside
  this torch build (DESIGN.md). Of torchvision, `open_clip.utils` only names
  `FrozenBatchNorm2d` (to freeze vision towers), so a stand-in holds that one name while
  the module loads; every stand-in leaves sys.modules afterwards."""
  import transformers  # noqa: F401  (settles its optional-package probes first)
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    # A declared test dependency: missing, it fails rather than quietly skip SD2's parity.
    pytest.fail("open-clip-torch is not installed: pip install --no-deps open-clip-torch==3.3.0")
  folder = list(spec.submodule_search_locations)[0]
  saved = {k: v for k, v in sys.modules.items()
           if k == "open_clip" or k.startswith(("open_clip.", "torchvision"))}
  package = types.ModuleType("open_clip")
  package.__path__ = [folder]
  stand_ins = {"open_clip": package}
  try:
    import torchvision.ops.misc  # noqa: F401
  except ImportError:
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    ops = types.ModuleType("torchvision.ops")
    ops.misc = misc
    vision = types.ModuleType("torchvision")
    vision.ops = ops
    stand_ins.update({"torchvision": vision, "torchvision.ops": ops,
                      "torchvision.ops.misc": misc})
  sys.modules.update(stand_ins)
  try:
    module = importlib.import_module("open_clip.transformer")
  finally:
    for name in [k for k in sys.modules
                 if k == "open_clip" or k.startswith(("open_clip.", "torchvision"))]:
      del sys.modules[name]
    sys.modules.update(saved)
  return module


def _open_clip_tower(oc, width=128, heads=2, layers=3, output_dim=48, seed=0):
  """SD2's ViT-H text tower topology, reduced: exact GELU, causal mask, argmax pooling."""
  tower = oc.TextTransformer(context_length=77, vocab_size=VOCAB, width=width, heads=heads,
                             layers=layers, output_dim=output_dim, act_layer=torch.nn.GELU,
                             norm_layer=oc.LayerNorm, pool_type="argmax")
  return _randomize(tower, seed)


def _sd2_embedder_reference(tower, ids):
  """What SD2's FrozenOpenCLIPEmbedder(layer="penultimate") computes: every block but
  the last, with the causal mask, then ln_final."""
  with torch.no_grad():
    x = tower.token_embedding(ids) + tower.positional_embedding
    for block in tower.transformer.resblocks[:-1]:
      x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x)


def _write_safetensors(tensors, path):
  from safetensors.torch import save_file
  save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


# --- transformers folders ---------------------------------------------------------------


def test_transformers_folder_matches_clip_text_model(tmp_path):
  ref = _transformers_model()
  ref.save_pretrained(tmp_path / "te")
  spec, model = load_text_encoder(tmp_path / "te")
  assert (spec.width, spec.depth, spec.heads, spec.mlp_dim, spec.activation) == (
      128, 3, 2, 256, "quick_gelu")
  assert (spec.output_layer, spec.pooling, spec.projection_dim) == ("last", "argmax", 0)
  ids = _ids(pad=EOS)  # SD1 pads with end-of-text: argmax must take the first one
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(ids))
  enc = model.encode(jnp.asarray(ids))
  _close(enc.context, out.last_hidden_state)
  _close(enc.pooled, out.pooler_output)
  assert enc.embeds is None
  np.testing.assert_array_equal(np.asarray(model(jnp.asarray(ids))), np.asarray(enc.context))


def test_with_projection_gelu_first_eos_and_torch_bin(tmp_path):
  eos = 5  # a newer config: pool at the first eos id, not at the largest id
  ref = _transformers_model(projection=True, hidden_act="gelu", eos_token_id=eos, seed=1)
  ref.save_pretrained(tmp_path / "te")
  # The same folder as a pickled state dict (older exports), read with weights_only=True.
  torch.save(ref.state_dict(), tmp_path / "te" / "pytorch_model.bin")
  os.remove(tmp_path / "te" / "model.safetensors")
  spec, model = load_text_encoder(tmp_path / "te")
  assert (spec.activation, spec.pooling, spec.eos_token_id, spec.projection_dim) == (
      "gelu", "eos", eos, 48)
  ids = _ids(pad=0)
  ids[:, 4] = eos  # before the largest id: the two pooling rules disagree here
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(ids))
  enc = model.encode(jnp.asarray(ids))
  _close(enc.context, out.last_hidden_state)
  _close(enc.embeds, out.text_embeds)


# --- single-file SD checkpoints ---------------------------------------------------------


def test_sd2_single_file_matches_open_clip(tmp_path, open_clip_transformer):
  tower = _open_clip_tower(open_clip_transformer)
  # SD2 checkpoints hold the CLIP model beside the UNet; logit_scale is the CLIP model's.
  tensors = {f"cond_stage_model.model.{k}": v for k, v in tower.state_dict().items()}
  tensors["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
  tensors["model.diffusion_model.out.2.weight"] = torch.zeros(4, 8, 3, 3)
  _write_safetensors(tensors, tmp_path / "sd2.safetensors")
  spec, model = load_text_encoder(tmp_path / "sd2.safetensors")
  assert (spec.width, spec.depth, spec.heads, spec.activation, spec.output_layer) == (
      128, 3, 2, "gelu", "penultimate")
  assert len(model.text_model.encoder.layers) == 2  # the unused last block is not built
  ids = _ids(pad=0)  # open_clip pads with 0
  _close(model(jnp.asarray(ids)), _sd2_embedder_reference(tower, torch.from_numpy(ids)))

  # All blocks, read at the last layer: open_clip's own text features.
  _, full = load_text_encoder(read_tensors(tmp_path / "sd2.safetensors"), output_layer="last")
  with torch.no_grad():
    features = tower(torch.from_numpy(ids))
  _close(full.encode(jnp.asarray(ids)).embeds, features)


def test_open_clip_names_round_trip(open_clip_transformer):
  tower = _open_clip_tower(open_clip_transformer, layers=2)
  theirs = {k: v.numpy() for k, v in tower.state_dict().items()}
  back = to_open_clip(from_open_clip(theirs))
  assert set(back) == set(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(back[key], value)


def test_sd1_single_file_and_sub_dict(tmp_path):
  ref = _transformers_model(seed=2)
  # SD1 files hold the hub's names, `text_model.` included (transformers 5 drops it).
  tensors = {f"cond_stage_model.transformer.text_model.{k}": v
             for k, v in ref.state_dict().items()}
  tensors["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3)
  _write_safetensors(tensors, tmp_path / "sd1.safetensors")
  ids = _ids(pad=EOS)
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(ids))
  spec, model = load_text_encoder(tmp_path / "sd1.safetensors")
  assert (spec.activation, spec.output_layer, spec.heads) == ("quick_gelu", "last", 2)
  enc = model.encode(jnp.asarray(ids))
  _close(enc.context, out.last_hidden_state)
  _close(enc.pooled, out.pooler_output)
  # A pipeline loader's sub-dict, prefix removed (here transformers 5's bare names).
  sub = {k: v.numpy() for k, v in ref.state_dict().items()}
  _, again = load_text_encoder(sub)
  np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))), np.asarray(enc.context))
  # The head split is not in the weights: an override for towers without 64-wide heads.
  spec4, _ = load_text_encoder(sub, num_heads=4)
  assert spec4.heads == 4


# --- export -----------------------------------------------------------------------------


def test_save_round_trip_through_transformers(tmp_path, open_clip_transformer):
  from transformers import CLIPTextModel, CLIPTextModelWithProjection
  tower = _open_clip_tower(open_clip_transformer, seed=3)
  tensors = {f"cond_stage_model.model.{k}": v.numpy() for k, v in tower.state_dict().items()}
  spec, model = load_text_encoder(tensors)  # SD2: penultimate
  save_text_encoder(model, tmp_path / "out")
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["num_hidden_layers"] == 2 and config["hidden_act"] == "gelu"
  ref = CLIPTextModelWithProjection.from_pretrained(tmp_path / "out").eval()
  ids = _ids(pad=0)
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(ids))
  enc = model.encode(jnp.asarray(ids))
  _close(enc.context, out.last_hidden_state)
  _close(enc.embeds, out.text_embeds)
  # Read back: the same network, now 2 blocks read at the last layer.
  spec2, again = load_text_encoder(tmp_path / "out")
  assert (spec2.depth, spec2.output_layer) == (2, "last")
  np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))), np.asarray(enc.context))
  save_text_encoder(again, tmp_path / "out")  # a previous export is replaced

  sd1 = CLIPTextTransformer(CLIPTextSpec(vocab_size=VOCAB, width=64, depth=2, heads=4,
                                         mlp_dim=128), rngs=nnx.Rngs(0))
  save_text_encoder(sd1, tmp_path / "sd1")
  ref1 = CLIPTextModel.from_pretrained(tmp_path / "sd1").eval()
  ids1 = _ids(pad=EOS)
  with torch.no_grad():
    out1 = ref1(input_ids=torch.from_numpy(ids1))
  enc1 = sd1.encode(jnp.asarray(ids1))
  _close(enc1.context, out1.last_hidden_state)
  _close(enc1.pooled, out1.pooler_output)


# --- errors -----------------------------------------------------------------------------


def test_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(WeightFileError, match="no config.json"):
    load_text_encoder(tmp_path / "empty")
  (tmp_path / "noweights").mkdir()
  (tmp_path / "noweights" / "config.json").write_text("{}")
  with pytest.raises(WeightFileError, match="no weights"):
    load_text_encoder(tmp_path / "noweights")
  with pytest.raises(WeightFileError, match="no text encoder weights"):
    load_text_encoder(tmp_path / "missing.safetensors")
  unet_only = {"model.diffusion_model.out.2.weight": np.zeros((4, 8, 3, 3), np.float32)}
  with pytest.raises(StateMismatchError, match="no CLIP text encoder"):
    load_text_encoder(unet_only)
  with pytest.raises(ValueError, match="output_layer"):
    load_text_encoder(unet_only, output_layer="third")
  ref = _transformers_model()
  broken = {f"cond_stage_model.transformer.{k}": v.numpy() for k, v in ref.state_dict().items()
            if "layers.1.mlp.fc2" not in k}
  with pytest.raises(StateMismatchError, match="missing.*layers.1.mlp.fc2"):
    load_text_encoder(broken)


def test_presets_and_spec_checks():
  assert (SD1_TEXT.width, SD1_TEXT.depth, SD1_TEXT.heads, SD1_TEXT.activation) == (
      768, 12, 12, "quick_gelu")
  assert (SD2_TEXT.width, SD2_TEXT.depth, SD2_TEXT.heads, SD2_TEXT.activation,
          SD2_TEXT.output_layer, SD2_TEXT.computed_depth) == (1024, 24, 16, "gelu",
                                                              "penultimate", 23)
  with pytest.raises(ValueError, match="activation"):
    CLIPTextSpec(activation="relu")
  with pytest.raises(ValueError, match="divisible"):
    CLIPTextSpec(width=100, heads=3)


def test_bfloat16_compute_and_remat_under_jit():
  spec = CLIPTextSpec(vocab_size=VOCAB, width=64, depth=2, heads=4, mlp_dim=128,
                      activation="gelu", projection_dim=16)
  exact = CLIPTextTransformer(spec, rngs=nnx.Rngs(0))
  fast = CLIPTextTransformer(
      dataclasses.replace(spec, dtype="bfloat16", remat=True), rngs=nnx.Rngs(0))
  ids = jnp.asarray(_ids(pad=0))
  ours = nnx.jit(lambda m, x: m.encode(x))(fast, ids)
  want = exact.encode(ids)
  assert ours.context.dtype == jnp.float32 and ours.embeds.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(ours.context), np.asarray(want.context), atol=0.1)
  np.testing.assert_allclose(np.asarray(ours.embeds), np.asarray(want.embeds), atol=0.1)
