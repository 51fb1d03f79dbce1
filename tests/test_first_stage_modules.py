"""First-stage building blocks checked against independent NumPy / PyTorch computations.

Covers DiagonalGaussian, VectorQuantizer (values, gradients, remap, diffusers parity),
the CompVis blocks (ResnetBlock, AttnBlock, Downsample, Upsample) against torch.nn.functional
on the same weights, AutoencoderSpec validation, attn_type "none", the VQModel LDM interface,
bfloat16 compute and rematerialization.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from ldm_jax.convert.torch_layout import export_state, import_state, torch_leaves
from ldm_jax.models.autoencoder import (AttnBlock, AutoencoderSpec, Downsample, ResnetBlock,
                                        Upsample, VQModel, abstract_autoencoder,
                                        build_autoencoder)
from ldm_jax.models.distributions import DiagonalGaussian
from ldm_jax.models.layers import Normalize
from ldm_jax.models.quantize import VectorQuantizer

from conftest import from_torch, to_torch

# A tiny two-level topology with attention inside the 8x8 level and in mid.
TINY_KL = AutoencoderSpec(kind="kl", resolution=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(4,), z_channels=4, embed_dim=4)
TINY_VQ = AutoencoderSpec(kind="vq", resolution=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(4,), z_channels=3, embed_dim=3, n_embed=16)


def _rand(shape, seed, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _randomize_norms(module, seed=0):
  """GroupNorm affine parameters away from (1, 0), so the tests see them."""
  state = export_state(module)
  rng = np.random.default_rng(seed)
  for key, value in state.items():
    if isinstance(module, nnx.GroupNorm) or ".norm" in "." + key:
      base = 1.0 if key.endswith("weight") else 0.0
      state[key] = (base + 0.2 * rng.standard_normal(value.shape)).astype(np.float32)
  import_state(module, state, "test")
  return {k: torch.from_numpy(v.copy()) for k, v in export_state(module).items()}


def _jitted(model, fn):
  """`fn(model, *args)` compiled once (eager op-by-op dispatch is slow on a busy CPU)."""
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
  return lambda *args: compiled(state, *args)


def _images(res=8, batch=2, seed=3):
  return np.clip(_rand((batch, res, res, 3), seed, 0.6), -1, 1)


# ---------------------------------------------------------------------------------------
# 1. DiagonalGaussian


def _gaussian(seed=0, shape=(2, 4, 5, 3)):
  mean = _rand(shape, seed)
  logvar = _rand(shape, seed + 1, 0.7)
  return mean, logvar


def test_from_moments_splits_mean_first_and_clips_logvar():
  mean, logvar = _gaussian()
  logvar[0, 0, 0, 0] = -55.0
  logvar[1, 1, 1, 1] = 33.0
  moments = np.concatenate([mean, logvar], axis=-1)
  g = DiagonalGaussian.from_moments(jnp.asarray(moments))
  np.testing.assert_array_equal(np.asarray(g.mean), mean)
  expected = np.clip(logvar, -30.0, 20.0)
  np.testing.assert_array_equal(np.asarray(g.logvar), expected)
  assert float(g.logvar[0, 0, 0, 0]) == -30.0 and float(g.logvar[1, 1, 1, 1]) == 20.0
  np.testing.assert_array_equal(np.asarray(g.mode()), mean)


def test_sample_is_mean_plus_std_times_same_eps():
  mean, logvar = _gaussian(3)
  g = DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))
  key = jax.random.key(11)
  eps = np.asarray(jax.random.normal(key, mean.shape, jnp.float32))
  expected = mean + np.exp(0.5 * logvar.astype(np.float64)) * eps
  np.testing.assert_allclose(np.asarray(g.sample(key)), expected, rtol=1e-6, atol=1e-6)
  # Different keys give different samples.
  assert not np.allclose(np.asarray(g.sample(jax.random.key(12))), expected)


def test_kl_to_standard_normal():
  mean, logvar = _gaussian(5)
  g = DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))
  m, lv = mean.astype(np.float64), logvar.astype(np.float64)
  expected = 0.5 * np.sum(m**2 + np.exp(lv) - 1.0 - lv, axis=(1, 2, 3))
  kl = np.asarray(g.kl())
  assert kl.shape == (2,)
  np.testing.assert_allclose(kl, expected, rtol=1e-5)
  # KL of N(0, I) to itself is zero.
  zero = DiagonalGaussian(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)))
  np.testing.assert_allclose(np.asarray(zero.kl()), [0.0], atol=1e-7)


def test_kl_between_gaussians_closed_form():
  m1, lv1 = _gaussian(7)
  m2, lv2 = _gaussian(9)
  p = DiagonalGaussian(jnp.asarray(m1), jnp.asarray(lv1))
  q = DiagonalGaussian(jnp.asarray(m2), jnp.asarray(lv2))
  # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2
  m1, lv1, m2, lv2 = (a.astype(np.float64) for a in (m1, lv1, m2, lv2))
  s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
  per = np.log(s2 / s1) + (s1**2 + (m1 - m2)**2) / (2 * s2**2) - 0.5
  np.testing.assert_allclose(np.asarray(p.kl(q)), per.sum(axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(p.kl(p)), [0.0, 0.0], atol=1e-4)


def test_nll_matches_numpy():
  mean, logvar = _gaussian(13)
  x = _rand(mean.shape, 14)
  g = DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))
  m, lv, x64 = mean.astype(np.float64), logvar.astype(np.float64), x.astype(np.float64)
  # -log N(x; m, var) summed over H, W, C.
  logpdf = -0.5 * (np.log(2 * np.pi) + lv + (x64 - m)**2 / np.exp(lv))
  np.testing.assert_allclose(np.asarray(g.nll(jnp.asarray(x))), -logpdf.sum(axis=(1, 2, 3)),
                             rtol=1e-5)


# ---------------------------------------------------------------------------------------
# 2. VectorQuantizer


def _quantizer(n=16, d=4, seed=0, **kw):
  return VectorQuantizer(n, d, rngs=nnx.Rngs(seed), **kw)


def _brute_force_indices(z, codes):
  flat = z.reshape(-1, z.shape[-1]).astype(np.float64)
  c = codes.astype(np.float64)
  d2 = ((flat[:, None, :] - c[None, :, :])**2).sum(-1)
  return d2.argmin(1).reshape(z.shape[:-1])


def test_codebook_init_uniform_within_one_over_n():
  n = 64
  q = _quantizer(n, 8, seed=1)
  codes = np.asarray(q.codebook())
  assert codes.shape == (n, 8) and codes.dtype == np.float32
  assert np.all(np.abs(codes) <= 1.0 / n)
  assert codes.max() > 0.8 / n and codes.min() < -0.8 / n  # spans the interval
  assert abs(codes.mean()) < 0.1 / n


def test_indices_are_nearest_codes_and_zq_is_codebook_rows():
  q = _quantizer(16, 4, seed=2)
  codes = np.asarray(q.codebook())
  # Latents near (scaled) codebook rows so the nearest code is unambiguous but nontrivial.
  z = _rand((2, 3, 5, 4), 21, 0.05)
  out = q(jnp.asarray(z))
  idx = np.asarray(out.indices)
  assert idx.shape == (2, 3, 5)
  np.testing.assert_array_equal(idx, _brute_force_indices(z, codes))
  assert len(np.unique(idx)) > 3
  np.testing.assert_allclose(np.asarray(out.z_q), codes[idx], atol=1e-7)


def test_loss_value_legacy_and_not():
  z = _rand((2, 3, 3, 4), 22, 0.05)
  for legacy in (True, False):
    q = _quantizer(16, 4, seed=3, beta=0.25, legacy=legacy)
    out = q(jnp.asarray(z))
    zq = np.asarray(q.codebook())[np.asarray(out.indices)].astype(np.float64)
    mse = np.mean((zq - z)**2)
    np.testing.assert_allclose(float(out.loss), (1 + 0.25) * mse, rtol=1e-5)


def _vq_grads(legacy, z, beta=0.25):
  q = _quantizer(16, 4, seed=4, beta=beta, legacy=legacy)
  graphdef, params, rest = nnx.split(q, nnx.Param, ...)

  def loss_fn(params, z):
    return nnx.merge(graphdef, params, rest)(z).loss

  g_params, g_z = jax.grad(loss_fn, argnums=(0, 1))(params, jnp.asarray(z))
  g_code = np.asarray(g_params["embedding"]["embedding"][...])
  out = q(jnp.asarray(z))
  return q, out, np.asarray(g_z), g_code


@pytest.mark.parametrize("legacy", [True, False])
def test_loss_gradients_put_beta_on_the_right_term(legacy):
  beta = 0.25
  z = _rand((2, 3, 3, 4), 23, 0.05)
  q, out, g_z, g_code = _vq_grads(legacy, z, beta)
  codes = np.asarray(q.codebook()).astype(np.float64)
  idx = np.asarray(out.indices).reshape(-1)
  zq = codes[idx].reshape(z.shape)
  n = z.size
  w_z, w_code = (1.0, beta) if legacy else (beta, 1.0)
  np.testing.assert_allclose(g_z, w_z * 2 * (z - zq) / n, rtol=1e-5, atol=1e-9)
  expected_code = np.zeros_like(codes)
  np.add.at(expected_code, idx, (w_code * 2 * (zq - z) / n).reshape(-1, z.shape[-1]))
  np.testing.assert_allclose(g_code, expected_code, rtol=1e-5, atol=1e-9)
  assert np.abs(g_code).max() > 0


def test_straight_through_gradient():
  q = _quantizer(16, 4, seed=5)
  z = jnp.asarray(_rand((2, 3, 3, 4), 24, 0.05))
  g = jnp.asarray(_rand((2, 3, 3, 4), 25))
  grad = jax.grad(lambda z: jnp.sum(q(z).z_q * g))(z)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(g), rtol=1e-6, atol=1e-7)


def _remap_setup(**kw):
  """8 well-separated codes; z hits codes 0..7 exactly at known positions."""
  q = _quantizer(8, 2, seed=6, **kw)
  angles = np.arange(8) * 2 * np.pi / 8
  codes = np.stack([np.cos(angles), np.sin(angles)], -1).astype(np.float32) * 0.1
  q.embedding.embedding[...] = jnp.asarray(codes)
  original = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [5, 3, 1, 0]])
  z = codes[original][None] + _rand((1, 3, 4, 2), 26, 1e-3)
  return q, codes, original, z


def test_remap_extra_renumbers_into_used_subset_and_lookup_inverts():
  used = [1, 3, 5]
  q, codes, original, z = _remap_setup(remap=used, unknown_index="extra")
  out = q(jnp.asarray(z))
  idx = np.asarray(out.indices)[0]
  pos = {c: i for i, c in enumerate(used)}
  expected = np.vectorize(lambda c: pos.get(int(c), len(used)))(original)
  np.testing.assert_array_equal(idx, expected)
  # z_q is still the nearest code of the full codebook.
  np.testing.assert_allclose(np.asarray(out.z_q)[0], codes[original], atol=1e-7)
  # lookup() maps remapped indices back to the full codebook for known codes.
  looked = np.asarray(q.lookup(out.indices))[0]
  known = np.isin(original, used)
  np.testing.assert_allclose(looked[known], codes[original][known], atol=0)
  # The extra token reads as used[0] (reference: set to 0 before unmapping).
  np.testing.assert_allclose(looked[~known], np.broadcast_to(codes[used[0]], looked[~known].shape))


def test_remap_int_unknown_index_and_npy_path(tmp_path):
  used = np.array([2, 3, 7])
  path = tmp_path / "used.npy"
  np.save(path, used)
  q, codes, original, z = _remap_setup(remap=str(path), unknown_index=-1)
  idx = np.asarray(q(jnp.asarray(z)).indices)[0]
  pos = {int(c): i for i, c in enumerate(used)}
  np.testing.assert_array_equal(idx, np.vectorize(lambda c: pos.get(int(c), -1))(original))


def test_remap_random_needs_key_and_fills_in_range():
  used = [1, 3, 5]
  q, codes, original, z = _remap_setup(remap=used, unknown_index="random")
  with pytest.raises(ValueError, match="key"):
    q(jnp.asarray(z))
  idx = np.asarray(q(jnp.asarray(z), key=jax.random.key(0)).indices)[0]
  known = np.isin(original, used)
  pos = {c: i for i, c in enumerate(used)}
  np.testing.assert_array_equal(idx[known], [pos[int(c)] for c in original[known]])
  assert np.all((idx[~known] >= 0) & (idx[~known] < len(used)))


def test_vector_quantizer_matches_diffusers():
  from diffusers.models.autoencoders.vae import VectorQuantizer as DFVectorQuantizer
  n, d = 32, 4
  q = _quantizer(n, d, seed=7, beta=0.25, legacy=True)
  ref = DFVectorQuantizer(n, d, beta=0.25, legacy=True, remap=None)
  with torch.no_grad():
    ref.embedding.weight.copy_(torch.from_numpy(np.array(q.codebook())))
  z = _rand((2, 4, 5, d), 27, 0.03)
  out = q(jnp.asarray(z))
  with torch.no_grad():
    zq_t, loss_t, (_, _, idx_t) = ref(to_torch(z))
  np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), idx_t.reshape(-1).numpy())
  np.testing.assert_allclose(np.asarray(out.z_q), from_torch(zq_t), atol=1e-6)
  np.testing.assert_allclose(float(out.loss), float(loss_t), atol=1e-6)


# ---------------------------------------------------------------------------------------
# 3. Blocks against torch.nn.functional on the same weights


def _gn(x, w, b):
  return F.group_norm(x, 32, w, b, eps=1e-6)


def _torch_resnet(x, p):
  h = F.conv2d(F.silu(_gn(x, p["norm1.weight"], p["norm1.bias"])), p["conv1.weight"],
               p["conv1.bias"], padding=1)
  h = F.conv2d(F.silu(_gn(h, p["norm2.weight"], p["norm2.bias"])), p["conv2.weight"],
               p["conv2.bias"], padding=1)
  if "nin_shortcut.weight" in p:
    x = F.conv2d(x, p["nin_shortcut.weight"], p["nin_shortcut.bias"])
  return x + h


def _torch_attn(x, p):
  b, c, hh, ww = x.shape
  hn = _gn(x, p["norm.weight"], p["norm.bias"])
  q, k, v = (F.conv2d(hn, p[f"{n}.weight"], p[f"{n}.bias"]) for n in "qkv")
  q = q.reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
  k = k.reshape(b, c, hh * ww)  # b, c, hw
  w_ = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # b, hw(q), hw(k)
  v = v.reshape(b, c, hh * ww)
  h = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
  return x + F.conv2d(h, p["proj_out.weight"], p["proj_out.bias"])


@pytest.mark.parametrize("in_ch,out_ch", [(32, 64), (64, 64)])
def test_resnet_block_matches_torch(in_ch, out_ch):
  block = ResnetBlock(in_ch, out_ch, dropout=0.0, dtype=jnp.float32, rngs=nnx.Rngs(in_ch))
  assert (block.nin_shortcut is not None) == (in_ch != out_ch)
  p = _randomize_norms(block, seed=in_ch)
  assert ("nin_shortcut.weight" in p) == (in_ch != out_ch)
  x = _rand((2, 6, 6, in_ch), 31)
  got = np.asarray(block(jnp.asarray(x)))
  with torch.no_grad():
    want = from_torch(_torch_resnet(to_torch(x), p))
  assert got.shape == (2, 6, 6, out_ch)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_attn_block_matches_torch():
  block = AttnBlock(32, dtype=jnp.float32, rngs=nnx.Rngs(1))
  p = _randomize_norms(block, seed=1)
  x = _rand((2, 4, 5, 32), 32)
  got = np.asarray(block(jnp.asarray(x)))
  with torch.no_grad():
    want = from_torch(_torch_attn(to_torch(x), p))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_downsample_matches_torch():
  block = Downsample(32, dtype=jnp.float32, rngs=nnx.Rngs(2))
  p = {k: torch.from_numpy(v.copy()) for k, v in export_state(block).items()}
  x = _rand((2, 8, 8, 32), 33)
  got = np.asarray(block(jnp.asarray(x)))
  assert got.shape == (2, 4, 4, 32)
  with torch.no_grad():
    want = from_torch(F.conv2d(F.pad(to_torch(x), (0, 1, 0, 1)), p["conv.weight"],
                               p["conv.bias"], stride=2, padding=0))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Asymmetric: symmetric padding 1 gives a different result.
  with torch.no_grad():
    sym = from_torch(F.conv2d(to_torch(x), p["conv.weight"], p["conv.bias"], stride=2,
                              padding=1))
  assert not np.allclose(got, sym, atol=1e-3)


def test_upsample_matches_torch():
  block = Upsample(32, dtype=jnp.float32, rngs=nnx.Rngs(3))
  p = {k: torch.from_numpy(v.copy()) for k, v in export_state(block).items()}
  x = _rand((2, 3, 4, 32), 34)
  got = np.asarray(block(jnp.asarray(x)))
  assert got.shape == (2, 6, 8, 32)
  with torch.no_grad():
    up = F.interpolate(to_torch(x), scale_factor=2.0, mode="nearest")
    want = from_torch(F.conv2d(up, p["conv.weight"], p["conv.bias"], padding=1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 4. AutoencoderSpec validation


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(kind="gan"), "kind"),
    (dict(kind="vq", n_embed=0), "n_embed"),
    (dict(ch=48, ch_mult=(1, 2)), "48.*multiple of 32"),
    (dict(attn_type="linear"), "attn_type"),
])
def test_spec_validation(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    AutoencoderSpec(**kwargs)


def test_spec_from_config_unknown_key():
  with pytest.raises(ValueError, match="z_chanels"):
    AutoencoderSpec.from_config({"kind": "kl", "z_chanels": 4})
  spec = AutoencoderSpec.from_config({"kind": "vq", "n_embed": 8, "ch_mult": [1, 2],
                                      "attn_resolutions": [16]})
  assert spec.ch_mult == (1, 2) and spec.attn_resolutions == (16,)


# ---------------------------------------------------------------------------------------
# 5. attn_type "none"


def test_attn_type_none_has_no_attention_modules():
  with_attn = dataclasses.replace(TINY_VQ, attn_resolutions=(8, 4))
  keys = torch_leaves(abstract_autoencoder(with_attn))
  assert any("attn" in k for k in keys)
  assert any(k.startswith("encoder.down.0.attn.0.") for k in keys)
  none = dataclasses.replace(with_attn, attn_type="none")
  keys = torch_leaves(abstract_autoencoder(none))
  assert not [k for k in keys if "attn" in k]
  assert "encoder.mid.block_1.conv1.weight" in keys
  assert "decoder.mid.block_2.conv2.weight" in keys


# ---------------------------------------------------------------------------------------
# 6. VQModel LDM semantics


@pytest.fixture(scope="module")
def vq_model():
  model = build_autoencoder(TINY_VQ, nnx.Rngs(0))
  assert isinstance(model, VQModel)
  # Spread the codebook to the latent's scale so quantization picks several codes.
  h = np.asarray(model.encode(jnp.asarray(_images())))
  codes = h.reshape(-1, 3)[np.random.default_rng(0).choice(h.size // 3, 16, replace=False)]
  model.quantize.embedding.embedding[...] = jnp.asarray(codes * 1.3 + 0.01)
  return model


def test_vq_encode_returns_prequant_latent(vq_model):
  x = jnp.asarray(_images())
  h = np.asarray(vq_model.encode(x))
  assert h.shape == (2, 4, 4, 3) and h.dtype == np.float32
  codes = np.asarray(vq_model.quantize.codebook())
  dist = ((h.reshape(-1, 1, 3) - codes[None])**2).sum(-1).min(1)
  assert dist.min() > 1e-8  # no latent sits on the codebook


def test_vq_decode_quantizes_first_and_decode_code(vq_model):
  h = vq_model.encode(jnp.asarray(_images()))
  codes = np.asarray(vq_model.quantize.codebook())
  idx = _brute_force_indices(np.asarray(h), codes)
  assert len(np.unique(idx)) > 1
  zq = jnp.asarray(codes[idx])
  via_decode = np.asarray(vq_model.decode(h))
  via_zq = np.asarray(vq_model.decode(zq, force_not_quantize=True))
  np.testing.assert_allclose(via_decode, via_zq, rtol=1e-5, atol=1e-5)
  via_code = np.asarray(vq_model.decode_code(jnp.asarray(idx)))
  np.testing.assert_allclose(via_code, via_zq, rtol=1e-5, atol=1e-5)
  # Not quantizing gives a different image.
  assert not np.allclose(np.asarray(vq_model.decode(h, force_not_quantize=True)), via_zq,
                         atol=1e-4)


def test_vq_call_matches_encode_quantize_decode(vq_model):
  x = jnp.asarray(_images())
  rec, quantized = vq_model(x)
  h = vq_model.encode(x)
  np.testing.assert_allclose(np.asarray(rec), np.asarray(vq_model.decode(h)), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(quantized.indices),
                                _brute_force_indices(np.asarray(h),
                                                     np.asarray(vq_model.quantize.codebook())))


def test_vq_decode_with_random_remap_needs_no_key():
  spec = dataclasses.replace(TINY_VQ, remap=list(range(8)), unknown_index="random")
  model = build_autoencoder(spec, nnx.Rngs(0))
  h = model.encode(jnp.asarray(_images()))
  rec = model.decode(h)
  assert np.all(np.isfinite(np.asarray(rec)))


# ---------------------------------------------------------------------------------------
# 7. bfloat16 compute


def test_bfloat16_compute_keeps_float32_params_and_matches():
  x = jnp.asarray(_images())
  f32 = build_autoencoder(TINY_KL, nnx.Rngs(0))
  _randomize_norms(f32, seed=5)
  bf16 = build_autoencoder(dataclasses.replace(TINY_KL, dtype="bfloat16"), nnx.Rngs(1))
  import_state(bf16, export_state(f32), "f32 model")
  params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
  assert params and all(p.dtype == jnp.float32 for p in params)
  assert bf16.encoder.conv_in.dtype == jnp.bfloat16

  run = lambda m, x: (m.encode(x).mean, m.decode(m.encode(x).mode()))
  mean32, rec32 = _jitted(f32, run)(x)
  mean16, rec16 = _jitted(bf16, run)(x)
  assert mean16.dtype == jnp.float32
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                           / np.linalg.norm(np.asarray(b, np.float64)))
  assert rel(mean16, mean32) < 5e-2
  assert rec16.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(rec16)))
  assert 0 < rel(rec16, rec32) < 5e-2


def test_groupnorm_computes_in_float32_for_bfloat16_input():
  norm = Normalize(64, rngs=nnx.Rngs(0))
  p = _randomize_norms(norm, seed=2)
  assert not np.allclose(p["weight"].numpy(), 1.0)
  x = jnp.asarray(_rand((2, 5, 5, 64), 35, 3.0) + 2.0).astype(jnp.bfloat16)
  out = norm(x)
  assert out.dtype == jnp.float32
  x32 = np.asarray(x.astype(jnp.float32))
  with torch.no_grad():
    want = from_torch(_gn(to_torch(x32), p["weight"], p["bias"]))
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
  # Every norm inside a bfloat16 model is this float32 GroupNorm.
  model = abstract_autoencoder(dataclasses.replace(TINY_KL, dtype="bfloat16"))
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.GroupNorm)]
  assert norms and all(isinstance(m, Normalize) and m.dtype == jnp.float32 for m in norms)


# ---------------------------------------------------------------------------------------
# 8. Rematerialization


def _param_grads(model, loss_of_model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = lambda params: loss_of_model(nnx.merge(graphdef, params, rest))
  return jax.tree.leaves(jax.jit(jax.grad(fn))(params))


def test_remat_gives_same_gradients():
  """Through every remat'd block kind: ResnetBlock, AttnBlock (level and mid), both halves."""
  x = jnp.asarray(_images())

  def loss(model):
    rec, post = model(x)
    return jnp.mean((rec - x)**2) + 1e-3 * jnp.mean(post.kl())

  plain = build_autoencoder(TINY_KL, nnx.Rngs(0))
  remat = build_autoencoder(dataclasses.replace(TINY_KL, remat=True), nnx.Rngs(1))
  import_state(remat, export_state(plain), "plain")
  g_plain, g_remat = _param_grads(plain, loss), _param_grads(remat, loss)
  assert len(g_plain) == len(g_remat) > 0
  for a, b in zip(g_plain, g_remat):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)


def test_remat_with_dropout_gives_same_gradients():
  spec = AutoencoderSpec(kind="kl", resolution=8, ch=32, ch_mult=(1,), num_res_blocks=1,
                         z_channels=4, embed_dim=4, dropout=0.5)
  x = jnp.asarray(_images())
  grads = []
  for remat in (True, False):
    model = build_autoencoder(dataclasses.replace(spec, remat=remat), nnx.Rngs(0))
    loss = lambda m, rngs: jnp.mean(m.encoder(x, rngs)**2)
    grads.append(jax.tree.leaves(nnx.state(nnx.grad(loss)(model, nnx.Rngs(dropout=1)))))
  assert max(float(np.abs(g).max()) for g in grads[1]) > 0
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
