"""Shared test helpers: tiny autoencoder specs and NHWC <-> NCHW bridges to PyTorch."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest

from ldm_jax.models.autoencoder import AutoencoderSpec

# kl-f8 topology at reduced width: four levels, no attention inside the levels.
KL_F8_SMALL = AutoencoderSpec(kind="kl", resolution=32, ch=32, ch_mult=(1, 2, 4, 4),
                              num_res_blocks=2, z_channels=4, embed_dim=4)
# kl-f16 topology: attention inside the lowest level (16 of 256 -> 2 of 32).
KL_F16_SMALL = AutoencoderSpec(kind="kl", resolution=32, ch=32, ch_mult=(1, 1, 2, 2, 4),
                               num_res_blocks=2, attn_resolutions=(2,), z_channels=16,
                               embed_dim=16)
# vq-f4 topology.
VQ_F4_SMALL = AutoencoderSpec(kind="vq", resolution=32, ch=32, ch_mult=(1, 2, 4),
                              num_res_blocks=2, z_channels=3, embed_dim=3, n_embed=64)


def to_torch(x):
  import torch
  return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()


def from_torch(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


@pytest.fixture
def images():
  """Two 32x32 images in [-1, 1] (smooth plus noise, so every layer sees structure)."""
  key1, key2 = jax.random.split(jax.random.key(7))
  grid = np.linspace(-1, 1, 32, dtype=np.float32)
  smooth = np.stack(np.meshgrid(grid, grid), -1).sum(-1, keepdims=True) / 2
  noise = np.asarray(jax.random.uniform(key1, (2, 32, 32, 3), minval=-0.5, maxval=0.5))
  return np.clip(smooth[None] + noise, -1, 1).astype(np.float32)
