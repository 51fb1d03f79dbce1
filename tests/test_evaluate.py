"""Evaluation end to end: rFID during training, the evaluate CLI's reports, reference
statistics, and the same numbers on 8 simulated devices as on one."""

import json
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
from absl import flags

from ldm_jax.convert.files import write_safetensors
from ldm_jax.eval import fid
from ldm_jax.eval.setup import eval_config
from ldm_jax.models import inception
from conftest import cpu_env

flags.FLAGS.mark_as_parsed()  # grain reads absl flags



def _run(*args):
  proc = subprocess.run([sys.executable, "-m", *args], env=cpu_env(), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / "random.safetensors"
  write_safetensors(inception.random_state(0), path)
  return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, inception_file):
  """A tiny run with rFID in its validation (2 steps, evaluated at 0 and 2)."""
  path = tmp_path_factory.mktemp("run")
  _run("ldm_jax.main", "--config=configs/kl_f8.py:tiny", f"--workdir={path}",
       "--config.train.num_steps=2", f"--config.eval.inception_weights={inception_file}")
  return path


def test_training_validation_reports_rfid(workdir):
  lines = [json.loads(l) for l in (workdir / "val_metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [0, 2]
  for line in lines:
    assert {"psnr", "psnr_std", "ssim", "ssim_std", "rfid"} <= line.keys()
    assert np.isfinite(line["rfid"]) and line["rfid"] > 0


def test_evaluate_cli_writes_reports_matching_training(workdir, inception_file):
  proc = _run("ldm_jax.evaluate", f"--workdir={workdir}")  # weights from the saved config
  report = json.loads((workdir / "eval" / "step_0000002.json").read_text())
  table = (workdir / "eval" / "step_0000002.md").read_text()
  assert report["step"] == 2 and report["inception_weights"] == inception_file
  assert report["num_examples"] == 12  # the built-in validation split
  assert "| rFID ↓ |" in table and "| PSNR (dB) ↑ |" in table and " ± " in table
  assert "| PSNR (dB) ↑ |" in proc.stdout
  assert list((workdir / "eval").glob("events.out.tfevents.*"))
  # The trainer's validation at the last step scored the same 12 images the same way.
  trained = json.loads((workdir / "val_metrics.jsonl").read_text().splitlines()[-1])
  for key in ("psnr", "psnr_std", "ssim", "rfid"):
    np.testing.assert_allclose(report["metrics"][key], trained[key], rtol=1e-5, err_msg=key)


def test_reference_stats_give_the_same_rfid(workdir, inception_file, tmp_path):
  """Statistics of the validation images from the reference-stats code replace the inputs'
  own: the same rFID as the CLI's report, which computed them in its pass."""
  from ldm_jax.data.spec import DataSpec
  from ldm_jax.eval.reference import compute_reference_stats
  from ldm_jax.eval.workdir import apply_overrides, load_run_config
  from ldm_jax.train.autoencoder_eval import evaluate_autoencoder_workdir
  config = load_run_config(str(workdir))
  out = str(tmp_path / "val.npz")
  assert compute_reference_stats(DataSpec.from_config(config.data), "validation", inception_file, out,
                                 batch_size=4) == 12
  mu, sigma = fid.load_stats(out)
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
  report = json.loads((workdir / "eval" / "step_0000002.json").read_text())
  config = apply_overrides(config, reference_stats=out)
  with_reference = evaluate_autoencoder_workdir(str(workdir), config)
  assert with_reference["reference_stats"] == out
  np.testing.assert_allclose(with_reference["metrics"]["rfid"], report["metrics"]["rfid"],
                             rtol=1e-5)


def test_tiled_evaluation_is_close_to_whole_images(workdir):
  """`--tile`: the 32x32 validation crops encoded and decoded as 16-pixel tiles (8 latent
  positions, blended over 2) score close to whole-image reconstruction, and the report
  says it was tiled. Not equal: each tile's GroupNorm statistics and attention see only
  the tile."""
  from ldm_jax.eval.workdir import load_run_config
  from ldm_jax.train.autoencoder_eval import evaluate_autoencoder_workdir
  config = load_run_config(str(workdir))
  config.eval.inception_weights = ""  # PSNR / SSIM suffice here
  whole = evaluate_autoencoder_workdir(str(workdir), config)
  tiled = evaluate_autoencoder_workdir(str(workdir), config, tile=16)
  assert "tile" not in whole and (tiled["tile"], tiled["tile_overlap"]) == (16, 0.25)
  assert tiled["num_examples"] == whole["num_examples"] == 12
  assert abs(tiled["metrics"]["psnr"] - whole["metrics"]["psnr"]) < 1.0, (tiled, whole)
  assert tiled["metrics"]["psnr"] != whole["metrics"]["psnr"]  # the tiles really ran
  with pytest.raises(ValueError, match="multiple of the model's downsampling factor 2"):
    evaluate_autoencoder_workdir(str(workdir), config, tile=15)


def test_evaluate_cli_errors(workdir, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "ldm_jax.evaluate", f"--workdir={workdir}",
       f"--inception_weights={tmp_path / 'missing.safetensors'}"],
      env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "ldm_jax.convert.inception_weights" in proc.stderr and "Traceback" not in proc.stderr
  proc = subprocess.run([sys.executable, "-m", "ldm_jax.evaluate", f"--workdir={tmp_path}"],
                        env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "training workdir" in proc.stderr


def test_training_with_missing_inception_weights_stops_before_compiling(tmp_path):
  from ldm_jax.config_lib import autoencoder_config
  from ldm_jax.train.autoencoder_trainer import build_run
  config = autoencoder_config(kind="kl", embed_dim=4, z_channels=4, ch_mult=(1, 2),
                              batch_size=2, loss={}, arg="tiny")
  config.eval.inception_weights = str(tmp_path / "missing.safetensors")
  with pytest.raises(FileNotFoundError, match="ldm_jax.convert.inception_weights"):
    build_run(config, str(tmp_path))


def test_eval_config_checks():
  config = ml_collections.ConfigDict({"eval": {"inception_weight": "x"}})
  with pytest.raises(ValueError, match="unknown config keys eval"):
    eval_config(config)
  with pytest.raises(ValueError, match="needs the Inception"):
    eval_config(ml_collections.ConfigDict({"eval": {"reference_stats": "a.npz"}}))
  assert eval_config(ml_collections.ConfigDict({"data": {}})).num_examples == 0  # old runs


SHARDED = textwrap.dedent("""
    import json
    import jax, numpy as np
    from flax import nnx
    from ldm_jax.config_lib import autoencoder_config
    from ldm_jax.eval.reconstruction import ReconstructionEvaluator
    from ldm_jax.models import inception
    from ldm_jax.models.autoencoder import build_autoencoder
    from ldm_jax import mesh as mesh_lib
    from ldm_jax.train import autoencoder_step as step_lib
    from ldm_jax.train.autoencoder_setup import build_programs

    config = autoencoder_config(kind="kl", embed_dim=4, z_channels=4, ch_mult=(1, 2),
                                batch_size=8, loss=dict(), arg="tiny")
    spec, programs = build_programs(config)
    state = step_lib.new_state(build_autoencoder(spec), step_lib.build_discriminator(
        programs.loss, spec.dtype, 0), programs, False, 0)
    net = inception.inception_from_state(inception.random_state(0), "random")
    rng = np.random.default_rng(0)
    batches = []
    for valid in (8, 3):  # the second batch is padded, as eval_batches pads
      image = np.clip(rng.normal(0, 0.5, (8, 32, 32, 3)), -1, 1).astype(np.float32)
      batches.append({"image": image, "mask": np.arange(8) < valid})
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
      mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1}, devices)
      placed = jax.device_put(state, mesh_lib.state_shardings(mesh, state))
      result = ReconstructionEvaluator(step_lib.reconstruct_fn(programs),
                                       mesh_lib.batch_sharding(mesh), inception=net).evaluate(
          placed, batches, grid=False)
      out[name] = {"metrics": result.metrics, "devices": len(devices),
                   "mu": result.recon_stats.mean().tolist(),
                   "sigma": result.recon_stats.covariance()[:64, :64].tolist(),
                   "input_mu": result.input_stats.mean().tolist()}
    print("RESULT", json.dumps(out))
""")


def test_sharded_evaluation_equals_one_device():
  proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                        timeout=600,
                        env=cpu_env(devices=8))
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = json.loads(lines[-1][len("RESULT "):])
  one, eight = out["one"], out["eight"]
  assert (one["devices"], eight["devices"]) == (1, 8)
  assert one["metrics"]["num_examples"] == eight["metrics"]["num_examples"] == 11
  for key, value in one["metrics"].items():
    np.testing.assert_allclose(eight["metrics"][key], value, rtol=1e-4, err_msg=key)
  for key in ("mu", "sigma", "input_mu"):
    np.testing.assert_allclose(eight[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_validation_grid_shows_only_real_images():
  """A split smaller than the batch: eval_batches pads it with blank images (mask False);
  the grid the trainer writes holds the real ones only, no grey rows."""
  import jax
  from ldm_jax import mesh as mesh_lib
  from ldm_jax.eval.reconstruction import ReconstructionEvaluator
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:1])
  evaluator = ReconstructionEvaluator(lambda state, x, key: (x * 0.5, None),
                                      mesh_lib.batch_sharding(mesh))
  image = np.linspace(-1, 1, 4 * 16 * 16 * 3, dtype=np.float32).reshape(4, 16, 16, 3)
  result = evaluator.evaluate(None, [{"image": image, "mask": np.arange(4) < 3}])
  assert result.metrics["num_examples"] == 3
  assert result.grid.shape == (3, 16, 32, 3)
  np.testing.assert_allclose(result.grid[:, :, :16], image[:3])
