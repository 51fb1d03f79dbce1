"""Shared test helpers: tiny autoencoder specs and NHWC <-> NCHW bridges to PyTorch."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole session, inherited by the commands tests start:
# the tests train, resume, sample and evaluate the same tiny programs many times over, and
# on a 2-core machine compiling them is most of the suite's time. Fresh per session, so a
# test never leans on what an earlier session compiled.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="ldm_jax_test_xla_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# Tests run tiny programs whose LLVM optimization takes far longer than running them (a
# threefry init compiles in 1 s at the default level, 0.3 s here); the semantics are XLA's
# either way.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

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


def cpu_env(devices: int | None = None, **extra) -> dict:
  """The environment for a command a test starts: this session's JAX settings (the shared
  compilation cache, the XLA flags) plus `devices` simulated CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  if devices:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
  return env


def to_torch(x):
  import torch
  return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()


def from_torch(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def _saved_first_stage(tmp_path_factory, spec, name):
  from flax import nnx

  from ldm_jax.convert import save_autoencoder
  from ldm_jax.models.autoencoder import build_autoencoder
  path = tmp_path_factory.mktemp("first_stage") / f"{name}.safetensors"
  save_autoencoder(build_autoencoder(spec, nnx.Rngs(0)), path, format="compvis")
  return path


@pytest.fixture(scope="session")
def kl_weights(tmp_path_factory):
  """A KL_F8_SMALL autoencoder in the CompVis layout, for LDM configs' first_stage.path."""
  return _saved_first_stage(tmp_path_factory, KL_F8_SMALL, "kl")


@pytest.fixture(scope="session")
def vq_weights(tmp_path_factory):
  """A VQ_F4_SMALL autoencoder in the CompVis layout."""
  return _saved_first_stage(tmp_path_factory, VQ_F4_SMALL, "vq")


@pytest.fixture
def images():
  """Two 32x32 images in [-1, 1] (smooth plus noise, so every layer sees structure)."""
  key1, key2 = jax.random.split(jax.random.key(7))
  grid = np.linspace(-1, 1, 32, dtype=np.float32)
  smooth = np.stack(np.meshgrid(grid, grid), -1).sum(-1, keepdims=True) / 2
  noise = np.asarray(jax.random.uniform(key1, (2, 32, 32, 3), minval=-0.5, maxval=0.5))
  return np.clip(smooth[None] + noise, -1, 1).astype(np.float32)
