"""Tiled encode and decode (ldm_jax.models.tiling): against diffusers' `enable_tiling` on the
same weights, against the untiled call, and the per-tile program's memory.

The model is a two-level (f2) AutoencoderKL with mid-block attention, 32 and 64 channels.
TILE = 32 sample pixels is 16 latent positions: stride 12, overlap 4 latent (8 pixels), the
diffusers geometry at overlap 0.25.
"""

import warnings

import numpy as np
import pytest
import torch
from conftest import from_torch, to_torch

from ldm_jax.convert import load_autoencoder
from ldm_jax.convert.autoencoder import diffusers_config
from ldm_jax.models import tiling
from ldm_jax.models.autoencoder import AutoencoderSpec

warnings.filterwarnings("ignore", message=".*accelerate.*")
import diffusers  # the [test] extra installs it

SPEC = AutoencoderSpec(kind="kl", resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                       z_channels=4, embed_dim=4)
TILE = 32
TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(diffusers AutoencoderKL with tiling on at TILE, ldm_jax model with its weights)."""
  config = diffusers_config(SPEC, 0.18215)
  config.pop("_class_name")
  torch.manual_seed(0)
  reference = diffusers.AutoencoderKL(**config).eval()
  with torch.no_grad():
    for name, p in reference.named_parameters():
      if "norm" in name:  # GroupNorm starts at 1/0; move it so per-tile statistics matter
        p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("tiling") / "vae"
  reference.save_pretrained(path)
  model = load_autoencoder(path)
  reference.enable_tiling()
  reference.tile_sample_min_size = TILE
  reference.tile_latent_min_size = TILE // 2
  reference.tile_overlap_factor = 0.25
  return reference, model


def _latent(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# A 28x40 latent: diffusers starts rows at 0, 12, 24 and columns at 0, 12, 24, 36, the last
# of each only 4 latent positions long; (28 - 16) and (40 - 16) are multiples of the
# stride, so the shifted tiling's tiles are diffusers' full ones and nothing else.
Z_SHAPE = (1, 28, 40, 4)


def test_truncated_edges_reproduce_diffusers_tiled_decode(pair):
  reference, model = pair
  z = _latent(Z_SHAPE, 0)
  with torch.no_grad():
    expected = from_torch(reference.decode(to_torch(z)).sample)  # tiled: 28 > 16
    reference.disable_tiling()
    untiled = from_torch(reference.decode(to_torch(z)).sample)
    reference.enable_tiling()
  got = np.asarray(tiling.tiled_decode(model, z, TILE, edges="truncate"))
  assert got.shape == expected.shape == (1, 56, 80, 3)
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
  assert np.abs(expected - untiled).max() > 1e-2  # diffusers did tile: not a trivial match


def test_truncated_edges_reproduce_diffusers_tiled_encode(pair):
  reference, model = pair
  x = np.random.default_rng(1).uniform(-1, 1, (2, 56, 80, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference.encode(to_torch(x)).latent_dist  # tiled: 80 > 32
  got = tiling.tiled_encode(model, x, TILE, edges="truncate")
  np.testing.assert_allclose(got.mean, from_torch(expected.mean), atol=TOL, rtol=0)
  np.testing.assert_allclose(got.logvar, from_torch(expected.logvar), atol=TOL, rtol=0)


def test_shifted_edges_match_diffusers_where_the_tiles_coincide(pair):
  """Fixed-shape tiles cannot equal diffusers everywhere: diffusers always decodes a
  short edge tile. Here that sliver (4 latent rows / columns) covers the last overlap
  band; everywhere else the tiles are the same and so are the outputs. In the band the
  shifted tiling keeps the last full tile, which is diffusers' decoder on that window."""
  reference, model = pair
  z = _latent(Z_SHAPE, 0)
  with torch.no_grad():
    expected = from_torch(reference.decode(to_torch(z)).sample)
    # The last tile (latent rows 12:28, columns 24:40) alone: no larger than a tile, so
    # diffusers decodes it whole.
    corner = from_torch(reference.decode(to_torch(z[:, 12:, 24:])).sample)
  got = np.asarray(tiling.tiled_decode(model, z, TILE))
  band = 2 * 4  # the overlap, in pixels
  np.testing.assert_allclose(got[:, :-band, :-band], expected[:, :-band, :-band], atol=TOL,
                             rtol=0)
  # The corner tile past its own blend zones (it starts at pixel 24, 48).
  np.testing.assert_allclose(got[:, 24 + band:, 48 + band:], corner[:, band:, band:],
                             atol=TOL, rtol=0)
  assert np.abs(got[:, -band:] - expected[:, -band:]).max() > 1e-2  # the sliver differs


def test_tiled_decode_approaches_the_untiled_one(pair):
  """A 48x64 latent (96x128 image). A tiled decode is an approximation: each tile
  normalizes with its own GroupNorm statistics and attends within itself, and this tiny
  random model (one channel per group at 32 channels) feels that everywhere, not only at
  the seams. Measured away from the seams, mean (99th percentile) |tiled - untiled|:
  0.064 (0.26) at tile 32, 0.026 (0.10) at tile 64, against a mean |output| of 0.27; a
  misplaced blend or tile would be of the output's own size."""
  _, model = pair
  z = _latent((1, 48, 64, 4), 2)
  untiled = np.asarray(model.decode(z))
  # A tile at least the image is the plain call.
  np.testing.assert_allclose(np.asarray(tiling.tiled_decode(model, z, 128)), untiled,
                             atol=1e-5, rtol=0)
  scale = np.abs(untiled).mean()

  errors, p99_bound = {}, {32: 0.4, 64: 0.15}
  for tile in (32, 64):
    got = np.asarray(tiling.tiled_decode(model, z, tile))
    latent_tile = tile // 2
    stride = int(latent_tile * 0.75)
    rows = tiling._axis(48, latent_tile, stride, "shift")
    cols = tiling._axis(64, latent_tile, stride, "shift")
    # Away from the seams: outside every blend zone and 4 px from every crop boundary.
    far = np.ones(got.shape[1:3], bool)
    for axis, along in ((rows, 0), (cols, 1)):
      for start in axis.starts[1:]:
        lo, hi = 2 * start - 4, 2 * (start + axis.blend) + 4
        if along == 0:
          far[lo:hi] = False
        else:
          far[:, lo:hi] = False
    assert far.mean() > 0.1
    diff = np.abs(got - untiled)[:, far]
    errors[tile] = diff.mean()
    assert np.quantile(diff, 0.99) < p99_bound[tile], tile
  assert errors[64] < 0.04 and errors[64] < 0.15 * scale
  assert errors[32] < 0.1
  assert errors[64] < 0.5 * errors[32]  # larger tiles, closer to the untiled decode


def test_one_fixed_tile_shape_and_bounded_memory(pair, monkeypatch):
  _, model = pair
  small, large = (1, 24, 32, 4), (1, 48, 64, 4)
  tile_bytes = [tiling.lower_tile(model, s, TILE).compile().memory_analysis().temp_size_in_bytes
                for s in (small, large)]
  whole_bytes = [tiling.lower_tile(model, s, 2 * s[2]).compile().memory_analysis()
                 .temp_size_in_bytes for s in (small, large)]
  assert tile_bytes[0] == tile_bytes[1] > 0
  assert whole_bytes[1] > 4 * whole_bytes[0] > 4 * tile_bytes[0]
  encode_bytes = [tiling.lower_tile(model, (1, 2 * s[1], 2 * s[2], 3), TILE, method="encode")
                  .compile().memory_analysis().temp_size_in_bytes for s in (small, large)]
  assert encode_bytes[0] == encode_bytes[1] > 0
  whole_encode = [tiling.lower_tile(model, (1, 2 * s[1], 2 * s[2], 3), 4 * s[2],
                                    method="encode").compile().memory_analysis()
                  .temp_size_in_bytes for s in (small, large)]
  assert whole_encode[1] > 4 * whole_encode[0] > 4 * encode_bytes[0]

  # Every tile of a tiled decode goes through the same jitted step at one shape.
  shapes = []
  step = tiling._step

  def recording(graphdef, method, state, x):
    shapes.append(x.shape)
    return step(graphdef, method, state, x)

  monkeypatch.setattr(tiling, "_step", recording)
  before = step._cache_size()
  tiling.tiled_decode(model, _latent(large, 3), TILE)
  assert set(shapes) == {(1, 16, 16, 4)} and len(shapes) == 4 * 5  # rows 0 12 24 32
  assert step._cache_size() - before <= 1  # compiled at most once (earlier tests may have)


def test_bad_arguments(pair):
  _, model = pair
  z = _latent((1, 20, 20, 4), 4)
  with pytest.raises(ValueError, match="multiple of the model's downsampling factor 2"):
    tiling.tiled_decode(model, z, 31)
  with pytest.raises(ValueError, match="overlap"):
    tiling.tiled_decode(model, z, TILE, overlap=0.75)
  with pytest.raises(ValueError, match="edges"):
    tiling.tiled_decode(model, z, TILE, edges="pad")
  with pytest.raises(ValueError, match="multiples of the downsampling factor"):
    tiling.tiled_encode(model, np.zeros((1, 41, 40, 3), np.float32), TILE)
