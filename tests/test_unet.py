"""The LDM UNet: parity with diffusers' UNet2DConditionModel, and its weight exchange."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ldm_jax.convert.torch_layout import (StateMismatchError, export_state, import_state,
                                          torch_leaves)
from ldm_jax.convert.unet import (diffusers_config, from_compvis, load_unet, save_unet,
                                  spec_from_diffusers_config, to_compvis)
from ldm_jax.models.unet import (LegacyAttention, ResBlock, SpatialTransformer, UNetModel,
                                 UNetSpec, abstract_unet, timestep_embedding)

# SD v1 topology at reduced width: heads by count, conv projections, cross-attention.
SD1 = UNetSpec(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=(4, 2, 1),
               num_res_blocks=1, channel_mult=(1, 2, 2), num_heads=2,
               use_spatial_transformer=True, context_dim=24)
# SD v2 style: a fixed head width, linear projections, two transformer layers.
SD2 = dataclasses.replace(SD1, num_heads=-1, num_head_channels=16,
                          use_linear_in_transformer=True, transformer_depth=2,
                          attention_resolutions=(2, 1))
# Class-conditional with scale-shift ResBlocks, attention only below the top level.
CLASSES = dataclasses.replace(SD1, num_classes=7, use_scale_shift_norm=True,
                              attention_resolutions=(2,), num_res_blocks=2)
# lsun-churches style: legacy attention, resampling inside ResBlocks (CompVis layout only).
LEGACY = UNetSpec(in_channels=4, out_channels=4, model_channels=32,
                  attention_resolutions=(1, 2), num_res_blocks=1, channel_mult=(1, 2),
                  num_heads=2, use_scale_shift_norm=True, resblock_updown=True)
# celebahq style: legacy attention by head width, conv resampling; here class-conditional.
CELEBAHQ = UNetSpec(in_channels=3, out_channels=3, model_channels=32,
                    attention_resolutions=(2, 4), num_res_blocks=1, channel_mult=(1, 2, 2),
                    num_heads=-1, num_head_channels=16, num_classes=7)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  """These tiny torch models run in milliseconds on one thread but take seconds when two
  threads spin against XLA's on a busy two-core machine."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _inputs(spec, seed=0, size=16):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, size, size, spec.in_channels)).astype(np.float32)
  t = np.array([3, 871])
  context = (rng.normal(size=(2, 5, spec.context_dim)).astype(np.float32)
             if spec.context_dim else None)
  y = np.array([1, 6]) if spec.num_classes else None
  return x, t, context, y


def _diffusers(spec, seed=0):
  from diffusers import UNet2DConditionModel
  config = {k: v for k, v in diffusers_config(spec, sample_size=16).items()
            if not k.startswith("_")}
  model = UNet2DConditionModel(**config).eval()
  torch.manual_seed(seed)
  with torch.no_grad():  # every weight random, so no zero init can hide a wrong formula
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return model


def _ours_from(ref, spec):
  model = abstract_unet(spec)
  import_state(model, {k: v.numpy() for k, v in ref.state_dict().items()}, "diffusers")
  return model


def _compiled(fn):
  """jax.jit without XLA's backend optimizations: on a small CPU, compiling a whole UNet
  that way is several times faster than an optimized build or eager per-op compilation."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _apply(module, *args):
  graphdef, state = nnx.split(module)
  call = _compiled(lambda state, *args: nnx.merge(graphdef, state)(*args))
  return np.asarray(call(state, *(None if a is None else jnp.asarray(a) for a in args)))


def _run(model, x, t, context=None, y=None):
  return _apply(model, x, t, context, y)


def _random(spec, seed=0):
  """Every weight random (zero-initialized outputs too), drawn in NumPy."""
  model, rng = abstract_unet(spec), np.random.default_rng(seed)
  import_state(model, {k: (rng.normal(size=leaf.shape) * 0.2).astype(np.float32)
                       for k, leaf in torch_leaves(model).items()}, "random")
  return model


@pytest.mark.parametrize("spec", [SD1, SD2, CLASSES], ids=["sd1", "sd2", "classes"])
def test_matches_diffusers(spec):
  ref = _diffusers(spec)
  model = _ours_from(ref, spec)
  x, t, context, y = _inputs(spec)
  ours = _run(model, x, t, context, y)
  with torch.no_grad():
    theirs = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                 encoder_hidden_states=torch.from_numpy(context),
                 class_labels=None if y is None else torch.from_numpy(y)).sample
  np.testing.assert_allclose(np.asarray(ours), theirs.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_timestep_embedding_is_cos_first():
  t = np.array([0, 5, 999])
  emb = np.asarray(timestep_embedding(jnp.asarray(t), 8))
  freqs = np.exp(-np.log(10000) * np.arange(4) / 4)
  np.testing.assert_allclose(emb, np.concatenate([np.cos(t[:, None] * freqs),
                                                  np.sin(t[:, None] * freqs)], 1), atol=1e-5)


def test_updown_resblock_matches_diffusers_resnet():
  from diffusers.models.resnet import ResnetBlock2D
  for direction, kwargs in (("down", {"down": True}), ("up", {"up": True})):
    ref = ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=48, groups=32, eps=1e-5,
                        time_embedding_norm="scale_shift", **kwargs).eval()
    with torch.no_grad():
      for p in ref.parameters():
        p.copy_(torch.randn_like(p) * 0.2)
    spec = dataclasses.replace(LEGACY, use_scale_shift_norm=True)
    block = nnx.eval_shape(lambda: ResBlock(32, 48, 64, spec, rngs=nnx.Rngs(0),
                                            resample=direction))
    import_state(block, {k: v.numpy() for k, v in ref.state_dict().items()}, "diffusers")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 8, 8, 32)).astype(np.float32)
    emb = rng.normal(size=(2, 48)).astype(np.float32)
    with torch.no_grad():
      theirs = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(emb))
    np.testing.assert_allclose(_apply(block, x, emb), theirs.permute(0, 2, 3, 1).numpy(),
                               atol=1e-4, err_msg=direction)


def test_legacy_attention_matches_the_reference_formula():
  """CompVis AttentionBlock written out in torch: qkv conv1d, per-head [q, k, v] blocks,
  q and k each scaled by ch^-1/4, softmax over keys, proj_out, residual."""
  heads, channels = 2, 32
  block = nnx.eval_shape(lambda: LegacyAttention(
      channels, dataclasses.replace(LEGACY, num_heads=heads), rngs=nnx.Rngs(0)))
  tensors = {k: torch.randn(leaf.shape) * 0.3 for k, leaf in torch_leaves(block).items()}
  import_state(block, {k: v.numpy() for k, v in tensors.items()}, "test")
  x = torch.randn(2, channels, 4, 4)
  b, c, h, w = x.shape
  xn = torch.nn.functional.group_norm(x.reshape(b, c, -1), 32, tensors["norm.weight"],
                                      tensors["norm.bias"], 1e-5)
  qkv = torch.nn.functional.conv1d(xn, tensors["qkv.weight"], tensors["qkv.bias"])
  q, k, v = qkv.reshape(b * heads, 3 * c // heads, -1).split(c // heads, dim=1)
  scale = (c // heads)**-0.25
  weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
  a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
  out = x + torch.nn.functional.conv1d(a, tensors["proj_out.weight"],
                                       tensors["proj_out.bias"]).reshape(b, c, h, w)
  ours = _apply(block, x.permute(0, 2, 3, 1).numpy())
  np.testing.assert_allclose(ours, out.permute(0, 2, 3, 1).numpy(), atol=1e-4)


@pytest.mark.parametrize("spec", [LEGACY, CELEBAHQ], ids=["churches", "celebahq"])
def test_legacy_unet_from_ldm_ckpt_matches_reference(tmp_path, spec):
  """A Lightning .ckpt of an independent torch UNet (keys under model.diffusion_model.,
  an EMA copy beside them) loads with its architecture read from the weights."""
  from unet_reference import ReferenceUNet
  torch.manual_seed(0)
  ref = ReferenceUNet(spec).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  state = {f"model.diffusion_model.{k}": v for k, v in ref.state_dict().items()}
  state["model_ema.decay"] = torch.tensor(0.9999)
  state["model_ema.diffusion_modelout2bias"] = torch.zeros(spec.out_channels)
  torch.save({"state_dict": state, "global_step": 7}, tmp_path / "last.ckpt")
  with pytest.raises(ValueError, match="head split"):
    load_unet(tmp_path / "last.ckpt")
  heads = ({"num_heads": spec.num_heads} if spec.num_head_channels == -1
           else {"num_head_channels": spec.num_head_channels})
  model = load_unet(tmp_path / "last.ckpt", **heads)
  assert model.spec == spec
  x, t, _, y = _inputs(spec)
  ours = _run(model, x, t, y=y)
  with torch.no_grad():
    theirs = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                 None if y is None else torch.from_numpy(y))
  np.testing.assert_allclose(np.asarray(ours), theirs.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def _flat(model):
  return {k: np.asarray(v) for k, v in export_state(model).items()}


@pytest.mark.parametrize("spec", [SD1, CLASSES, LEGACY], ids=["sd1", "classes", "legacy"])
def test_compvis_round_trip_and_keys(tmp_path, spec):
  model = _random(spec, seed=1)
  path = tmp_path / "unet.safetensors"
  save_unet(model, path, format="compvis")
  _assert_same_weights(load_unet(path), model)
  compvis = to_compvis(export_state(model), spec)
  assert "input_blocks.0.0.weight" in compvis and "out.2.weight" in compvis
  assert "time_embed.0.weight" in compvis and "middle_block.1.norm.weight" in compvis
  assert any(k.startswith("output_blocks.") and ".in_layers.0." in k for k in compvis)
  assert from_compvis(compvis, spec).keys() == export_state(model).keys()
  if spec.num_classes:
    assert "label_emb.weight" in compvis


def _sorted(spec):
  """Weights and config.json list attention levels from the top; specs may list any order."""
  return dataclasses.replace(spec, attention_resolutions=tuple(sorted(
      spec.attention_resolutions)))


def _assert_same_weights(a, b):
  a, b = _flat(a), _flat(b)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_ldm_checkpoint_keys(tmp_path):
  from ldm_jax.convert.files import write_safetensors
  model = _random(SD2, seed=2)
  compvis = to_compvis(export_state(model), SD2)
  ckpt = {f"model.diffusion_model.{k}": v for k, v in compvis.items()}
  ckpt["first_stage_model.decoder.conv_out.weight"] = np.zeros((3, 4, 3, 3), np.float32)
  ckpt["cond_stage_model.transformer.final_layer_norm.weight"] = np.ones(24, np.float32)
  ema = _random(SD2, seed=3)
  ckpt.update({"model_ema.diffusion_model" + k.replace(".", ""): v
               for k, v in to_compvis(export_state(ema), SD2).items()})
  ckpt["model_ema.num_updates"] = np.array(10, np.int32)
  write_safetensors(ckpt, tmp_path / "ldm.safetensors")
  _assert_same_weights(load_unet(tmp_path / "ldm.safetensors", spec=SD2), model)
  inferred = load_unet(tmp_path / "ldm.safetensors", num_head_channels=16)
  assert inferred.spec == _sorted(SD2)
  _assert_same_weights(inferred, model)
  _assert_same_weights(load_unet(tmp_path / "ldm.safetensors", num_head_channels=16,
                                 ema=True), ema)
  del ckpt["model_ema.diffusion_modelout2weight"]
  write_safetensors(ckpt, tmp_path / "ldm.safetensors")
  with pytest.raises(StateMismatchError, match="no complete EMA copy.*out2weight"):
    load_unet(tmp_path / "ldm.safetensors", spec=SD2, ema=True)


@pytest.mark.parametrize("spec", [SD1, SD2, CLASSES], ids=["sd1", "sd2", "classes"])
def test_diffusers_round_trip(tmp_path, spec):
  model = _random(spec, seed=2)
  save_unet(model, tmp_path / "unet", format="diffusers")
  again = load_unet(tmp_path / "unet")  # spec read from config.json
  assert again.spec == _sorted(spec)
  _assert_same_weights(again, model)


def test_diffusers_reads_our_folder(tmp_path):
  from diffusers import UNet2DConditionModel
  model = _random(SD1, seed=2)
  save_unet(model, tmp_path / "unet", format="diffusers")
  ref = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
  x, t, context, _ = _inputs(SD1, seed=3)
  with torch.no_grad():
    theirs = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                 encoder_hidden_states=torch.from_numpy(context)).sample
  np.testing.assert_allclose(_run(model, x, t, context), theirs.permute(0, 2, 3, 1).numpy(),
                             atol=1e-4)


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="cannot hold"):
    save_unet(_random(LEGACY), tmp_path / "x", format="diffusers")
  model = _random(SD1)
  save_unet(model, tmp_path / "unet.safetensors", format="compvis")
  with pytest.raises(StateMismatchError, match="wrong shape"):
    load_unet(tmp_path / "unet.safetensors", spec=dataclasses.replace(SD1, context_dim=16))
  with pytest.raises(ValueError, match="context"):
    model(jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match="num_heads or num_head_channels"):
    UNetSpec(num_heads=-1, num_head_channels=-1)
  with pytest.raises(ValueError, match="divisible by num_heads=3"):
    dataclasses.replace(SD1, num_heads=3)
  config = dict(diffusers_config(SD1), class_embed_type="timestep", norm_eps=1e-6)
  with pytest.raises(ValueError, match="class_embed_type='timestep'"):
    spec_from_diffusers_config(config)


def test_fresh_unet_predicts_zero():
  """The reference zero-initializes every residual branch's last layer and the output conv."""
  small = dataclasses.replace(LEGACY, channel_mult=(1,), attention_resolutions=(1,))
  graphdef, _ = nnx.split(abstract_unet(small))
  model = nnx.merge(graphdef, _compiled(lambda: nnx.state(UNetModel(small,
                                                                    rngs=nnx.Rngs(0))))())
  weights = export_state(model)
  last = [k for k in weights if k.split(".")[-2] in ("conv2", "proj_out", "conv_out")]
  assert len(last) == 2 * (5 + 4 + 1)  # 5 resnets, 4 attentions, conv_out; weight and bias
  assert all(not weights[k].any() for k in last)
  assert all(weights[k].std() > 0 for k in weights if k.endswith(("conv1.weight", "qkv.weight")))
  x, t, _, _ = _inputs(small, size=8)
  assert not _run(model, x, t).any()
  for linear in (False, True):
    block = SpatialTransformer(32, dataclasses.replace(SD1, use_linear_in_transformer=linear),
                               rngs=nnx.Rngs(0))
    assert not block.proj_out.kernel[...].any() and not block.proj_out.bias[...].any()


def test_dropout_only_with_rngs():
  spec = dataclasses.replace(SD1, channel_mult=(1,), attention_resolutions=(1,), dropout=0.5)
  model = _random(spec)
  x, t, context, _ = (None if a is None else jnp.asarray(a) for a in _inputs(spec, size=8))
  graphdef, state = nnx.split(model)
  train = _compiled(lambda state, key: nnx.merge(graphdef, state)(
      x, t, context, rngs=nnx.Rngs(dropout=key)))
  a, b = train(state, jax.random.key(0)), train(state, jax.random.key(1))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  np.testing.assert_array_equal(_run(model, x, t, context),
                                _run(_random(dataclasses.replace(spec, dropout=0.0)), x, t,
                                     context))


def test_remat_and_bfloat16():
  small = dataclasses.replace(SD1, channel_mult=(1,), attention_resolutions=(1,))
  plain = _random(small)
  remat = _random(dataclasses.replace(small, remat=True))
  x, t, context = (jnp.asarray(a) for a in _inputs(small, size=8)[:3])

  def grads(model):
    graphdef, state = nnx.split(model)
    loss = lambda state: jnp.mean(nnx.merge(graphdef, state)(x, t, context)**2)
    return _compiled(jax.grad(loss))(state)

  for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  out = _run(_random(dataclasses.replace(small, dtype="bfloat16")), x, t, context)
  assert out.dtype == np.float32
  reference = _run(plain, x, t, context)
  np.testing.assert_allclose(out, reference, atol=0.05 * np.abs(reference).max())
