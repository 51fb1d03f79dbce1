"""The train step on 8 simulated CPU devices with a (data, fsdp) mesh."""

import json
import subprocess
import sys
import textwrap

import pytest

from ldm_jax.train import mesh as mesh_lib
from conftest import cpu_env

SCRIPT = textwrap.dedent("""
    import json, os
    import jax, jax.numpy as jnp, numpy as np
    from ldm_jax.config_lib import autoencoder_config
    from ldm_jax.train import autoencoder_step as step_lib, mesh as mesh_lib
    from ldm_jax.train.autoencoder_setup import build_programs
    from ldm_jax.models.autoencoder import build_autoencoder
    from flax import nnx

    config = autoencoder_config(kind="kl", embed_dim=4, z_channels=4, ch_mult=(1, 2),
                                batch_size=8, loss=dict(disc_start=3), arg="tiny")
    config.model.ch_mult = (1, 2)
    config.train.mesh = dict(data=4, fsdp=2)
    spec, programs = build_programs(config)
    mesh = mesh_lib.make_mesh(config.train.mesh)
    state = step_lib.new_state(build_autoencoder(spec), step_lib.build_discriminator(
        programs.loss, spec.dtype, 0), programs, False, 0)
    shardings = mesh_lib.state_shardings(mesh, state)
    state = jax.device_put(state, shardings)
    batch_sharding = mesh_lib.batch_sharding(mesh, leading_dims=1)
    step = step_lib.jit_train_step(programs, mesh, shardings)
    rng = np.random.default_rng(0)
    images = np.clip(rng.normal(0, 0.5, (1, 8, 32, 32, 3)), -1, 1).astype(np.float32)
    batch = {"image": jax.device_put(images, batch_sharding)}
    losses = []
    for _ in range(6):
      state, metrics = step(state, batch, None)
      losses.append(float(metrics["rec_loss"]))
    kernel = state.params["decoder"]["up"][0]["block"][0]["conv1"]["kernel"][...]
    print("RESULT", json.dumps({
        "devices": jax.device_count(),
        "kernel_spec": str(kernel.sharding.spec),
        "kernel_shards": len({str(s.index) for s in kernel.addressable_shards}),
        "batch_spec": str(batch["image"].sharding.spec),
        "losses": losses}))
""")


def test_train_step_on_8_devices_shards_and_learns(tmp_path):
  env = cpu_env(devices=8)
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(lines[-1][len("RESULT "):])
  assert result["devices"] == 8
  assert "fsdp" in result["kernel_spec"]  # parameters split along the fsdp axis
  assert result["kernel_shards"] == 2  # two distinct pieces (replicated over data)
  assert "data" in result["batch_spec"] and "fsdp" in result["batch_spec"]
  losses = result["losses"]
  assert losses[-1] < losses[0] * 0.95, losses


def test_mesh_shape_errors():
  assert mesh_lib.mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2)
  with pytest.raises(ValueError, match="needs 6 devices but 8"):
    mesh_lib.mesh_shape({"data": 3, "fsdp": 2}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    mesh_lib.mesh_shape({"data": -1, "fsdp": 3}, 8)
  with pytest.raises(ValueError, match="at most one may be -1"):
    mesh_lib.mesh_shape({"data": -1, "fsdp": -1}, 8)
