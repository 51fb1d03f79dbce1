"""The latent cache: what is written equals the encoder's output, and it streams back."""

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import KL_F8_SMALL, VQ_F4_SMALL, cpu_env
from ldm_jax.data import builtin, latents
from ldm_jax.data.conditions import ConditionSpec
from ldm_jax.data.pipeline import eval_batches
from ldm_jax.models.autoencoder import build_autoencoder
from test_data import _config


@pytest.mark.parametrize("spec", [KL_F8_SMALL, VQ_F4_SMALL], ids=["kl", "vq"])
def test_cache_holds_the_encoder_moments_and_labels(tmp_path, spec):
  model = build_autoencoder(spec, nnx.Rngs(0))
  config = _config(image_size=32)
  conditions = ConditionSpec(fields=("label",))
  count = latents.write_cache(model, config, "validation", str(tmp_path), batch_size=5,
                              conditions=conditions)
  total = len(builtin.load_tiles("validation"))
  assert count == total  # padding examples are not written
  records = list(latents.read_all(str(tmp_path), "validation"))
  expected = next(eval_batches(config, "validation", batch_size=5, process_index=0,
                               process_count=1, conditions=conditions))
  stats = latents.moments(model, expected["image"])
  np.testing.assert_allclose(records[0]["mean"], stats["mean"][0], atol=1e-5)
  assert ("logvar" in records[0]) == (spec.kind == "kl")
  assert records[0]["label"] == expected["label"][0]

  it = latents.latent_iterator(str(tmp_path), "validation", global_batch_size=4, seed=0,
                               process_index=0, process_count=1)
  batch = next(it)
  assert batch["mean"].shape == (4,) + records[0]["mean"].shape
  z1 = latents.sample_latents(batch, jax.random.key(0))
  z2 = latents.sample_latents(batch, jax.random.key(1))
  assert np.allclose(z1, z2) == (spec.kind == "vq")


def test_missing_cache_says_how_to_make_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="cache_latents"):
    latents.latent_iterator(str(tmp_path), "train", global_batch_size=2, seed=0,
                            process_index=0, process_count=1)


def test_cache_command(tmp_path):
  import subprocess
  import sys

  from ldm_jax.convert import save_autoencoder
  weights = tmp_path / "vae.safetensors"
  save_autoencoder(build_autoencoder(KL_F8_SMALL, nnx.Rngs(0)), weights, format="compvis")
  out = tmp_path / "cache"
  proc = subprocess.run(
      [sys.executable, "-m", "ldm_jax.cache_latents", "--config=configs/ldm_txt2img.py:tiny",
       f"--config.first_stage.path={weights}", f"--out={out}", "--splits=validation",
       "--max_examples=3"],
      env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = list(latents.read_all(str(out), "validation"))
  assert len(records) == 3 and records[0]["tokens"].shape == (32,)
  assert records[0]["mean"].shape == (4, 4, 4)  # 32 px / 8
