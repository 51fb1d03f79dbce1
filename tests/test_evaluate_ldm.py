"""FID / IS of LDM samples: the trainer's evaluation, the library and the evaluate CLI
against an independent computation (the same sampler calls by hand, the Inception network,
SciPy's sqrtm), reruns, reference statistics and errors.

The heavy part runs once, in one subprocess (SCRIPT): it trains a tiny class-conditional
LDM with FID in its evaluation, evaluates the checkpoint, recomputes everything by hand
and writes what it found; the tests read that. A subprocess because OpenBLAS with two
threads spins for many seconds per 2048x2048 eigendecomposition on a busy 2-core
machine, and its thread count is fixed when NumPy loads.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import scipy.linalg
from absl import flags

from conftest import cpu_env

flags.FLAGS.mark_as_parsed()  # grain reads absl flags

HERE = os.path.dirname(os.path.abspath(__file__))
# The evaluator's features and the hand-made ones come from two compiled Inception programs;
# they agree to about 1e-8 relative in FID, SciPy's root against an eigendecomposition.
RTOL = 1e-6


def _env():
  return cpu_env(OPENBLAS_NUM_THREADS="1",
                 PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))


SCRIPT = textwrap.dedent("""
    import importlib.util, json, os, sys
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import jax, jax.numpy as jnp, numpy as np, scipy.linalg
    from flax import nnx
    from conftest import VQ_F4_SMALL
    from ldm_jax.convert import save_autoencoder
    from ldm_jax.convert.files import write_safetensors
    from ldm_jax.data.pipeline import eval_batches
    from ldm_jax.train.ldm_eval import evaluate_ldm_workdir
    from ldm_jax.eval.workdir import apply_overrides, load_run_config
    from ldm_jax.models import inception
    from ldm_jax.models.autoencoder import build_autoencoder
    from ldm_jax.train import checkpoint, ldm_trainer
    from ldm_jax.train.ldm_setup import abstract_state, condition_spec

    root = sys.argv[1]
    workdir = os.path.join(root, "run")
    weights = os.path.join(root, "inception.safetensors")
    write_safetensors(inception.random_state(0), weights)
    first_stage = os.path.join(root, "vq.safetensors")
    save_autoencoder(build_autoencoder(VQ_F4_SMALL, nnx.Rngs(0)), first_stage,
                     format="compvis")
    spec = importlib.util.spec_from_file_location("cin", "configs/ldm_cin256.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")  # class-conditional, 20 DDIM steps, guidance 3
    config.first_stage.path = first_stage
    # A large learning rate, so that two steps move the zero-initialized output layers
    # enough for the samples to depend on their labels.
    config.optim.base_learning_rate = 1e-2
    config.train.update(num_steps=2, eval_every=2, eval_examples=12)  # the whole split
    config.eval.inception_weights = weights
    out = {"train": ldm_trainer.train_and_evaluate(config, workdir)}

    # By hand: the checkpoint on one device, each batch's own labels, the same keys.
    saved = load_run_config(workdir)
    run = ldm_trainer.build_run(saved, workdir, check_training_data=False)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract_state(saved, run.spec, run.programs))
    state, _ = checkpoint.restore_state_only(workdir, target)
    sampler = ldm_trainer.make_sampler(run)
    graphdef, net_state = nnx.split(inception.make_inception(weights))
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    found = {"samples": [], "reals": [], "logits": [], "constant": []}
    labels = []
    for i, batch in enumerate(eval_batches(run.data, "validation", batch_size=2,
                                           conditions=condition_spec(saved))):
      key = jax.random.fold_in(jax.random.key(0), i)
      mask = np.asarray(batch["mask"])
      label = jnp.asarray(batch["label"])
      images = forward(net_state, sampler(state, {"label": label}, run.first_stage_state,
                                          key, num=2))
      found["samples"].append(np.asarray(images["pool"])[mask])
      found["logits"].append(np.asarray(images["logits_unbiased"])[mask])
      found["reals"].append(np.asarray(forward(net_state, batch["image"])["pool"])[mask])
      if i < 2:  # the first 4 examples again, all with label 0
        same = sampler(state, {"label": jnp.zeros_like(label)}, run.first_stage_state, key,
                       num=2)
        found["constant"].append(np.asarray(forward(net_state, same)["pool"])[mask])
      labels.extend(np.asarray(batch["label"])[mask].tolist())
    np.savez(os.path.join(root, "by_hand.npz"),
             **{k: np.concatenate(v) for k, v in found.items()})
    out["labels"] = labels

    # Reference statistics of the real images with a shifted mean, pytorch-fid's format.
    reals = np.concatenate(found["reals"]).astype(np.float64)
    shift = np.random.default_rng(0).normal(0, 0.05, reals.shape[1])
    np.savez(os.path.join(root, "ref.npz"), mu=reals.mean(0) + shift,
             sigma=np.cov(reals, rowvar=False))
    # 3 examples: the second batch is half padding, which must not count.
    out["with_reference"] = evaluate_ldm_workdir(workdir, apply_overrides(
        saved, num_examples=3, reference_stats=os.path.join(root, "ref.npz")))
    print("RESULT", json.dumps(out))
""")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  root = tmp_path_factory.mktemp("ldm_fid")
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(root)], env=_env(),
                        capture_output=True, text=True, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
  out = json.loads(lines[-1][len("RESULT "):])
  with np.load(root / "by_hand.npz") as f:
    out.update({k: f[k].astype(np.float64) for k in f.files})
  out["root"] = root
  return out


def _fid_sqrtm(mu1, features1, mu2, features2):
  """The Fréchet distance by its definition with SciPy's sqrtm, in float64, on the span of
  the centered features: both covariances live there (fewer images than dimensions), so
  their traces and the spectrum of their product are those of the 2048-d matrices."""
  centered = np.concatenate([features1 - features1.mean(0), features2 - features2.mean(0)])
  basis = np.linalg.qr(centered.T)[0]
  s1 = np.cov(features1 @ basis, rowvar=False)
  s2 = np.cov(features2 @ basis, rowvar=False)
  with warnings.catch_warnings():  # singular (rank-deficient), as expected
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(covmean).real)


def _inception_score(logits, splits):
  """torch-fidelity's convention: rows shuffled with RandomState(2020), then `splits`."""
  logits = logits[np.random.RandomState(2020).permutation(len(logits))]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for part in np.array_split(np.arange(len(p)), splits):
    q = p[part].mean(0, keepdims=True)
    scores.append(np.exp(np.mean(np.sum(p[part] * (np.log(p[part]) - np.log(q)), 1))))
  return np.mean(scores), np.std(scores)


def _fid(result, n=None):
  samples, reals = result["samples"][:n], result["reals"][:n]
  return _fid_sqrtm(samples.mean(0), samples, reals.mean(0), reals)


def test_training_fid_and_is_equal_an_independent_computation(result):
  """The trainer scored train.eval_examples=12 (the whole split) at its last step."""
  train = result["train"]
  assert np.isfinite(train["train/loss"])
  assert len(result["samples"]) == 12
  assert len(set(result["labels"])) == 2  # both validation photos: two conditions
  np.testing.assert_allclose(train["eval/fid"], _fid(result), rtol=RTOL)
  score, std = _inception_score(result["logits"], 6)  # 12 samples: 6 splits of 2
  np.testing.assert_allclose(train["eval/is"], score, rtol=1e-9)
  np.testing.assert_allclose(train["eval/is_std"], std, rtol=RTOL)
  assert std > 0


def test_samples_are_conditioned_on_their_own_examples(result):
  """The same keys with label 0 for the first 4 examples (label 1) give other samples,
  and an FID far outside the tolerance of the right labels' (two training steps leave the
  labels a small effect, far above the float noise)."""
  assert result["labels"][:4] == [1, 1, 1, 1]
  right = _fid(result, 4)
  constant, reals = result["constant"], result["reals"][:4]
  wrong = _fid_sqrtm(constant.mean(0), constant, reals.mean(0), reals)
  assert abs(wrong - right) > 100 * RTOL * right


def test_fid_against_reference_statistics_without_padding(result):
  report = result["with_reference"]
  assert report["num_examples"] == 3 and report["is_splits"] == 1
  assert report["reference_stats"] == str(result["root"] / "ref.npz")
  with np.load(result["root"] / "ref.npz") as f:
    mu = f["mu"]
  samples = result["samples"][:3]
  expected = _fid_sqrtm(samples.mean(0), samples, mu, result["reals"])  # their sigma
  np.testing.assert_allclose(report["metrics"]["fid"], expected, rtol=RTOL)
  reals = result["reals"][:3]
  assert abs(report["metrics"]["fid"] - _fid_sqrtm(samples.mean(0), samples, reals.mean(0),
                                                   reals)) > 1.0
  score, _ = _inception_score(result["logits"][:3], 1)
  np.testing.assert_allclose(report["metrics"]["is"], score, rtol=1e-9)


def test_evaluate_cli_reruns_the_training_numbers_and_writes_reports(result):
  workdir = result["root"] / "run"
  proc = subprocess.run([sys.executable, "-m", "ldm_jax.evaluate", f"--workdir={workdir}"],
                        env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads((workdir / "eval" / "step_0000002.json").read_text())
  assert report["step"] == 2 and report["num_examples"] == 12  # eval.num_examples=0: all
  # A fresh process, a restored checkpoint: the identical numbers the trainer wrote.
  assert report["metrics"] == {k: result["train"][f"eval/{k}"] for k in ("fid", "is", "is_std")}
  assert (report["sampler"], report["steps"], report["guidance"]) == ("ddim", 20, 3.0)
  assert report["weights"] == "ema" and report["seed"] == 0 and report["batch_size"] == 2
  assert report["is_splits"] == 6 and report["reference_stats"] == ""
  table = (workdir / "eval" / "step_0000002.md").read_text()
  assert "| FID ↓ |" in table and "| IS ↑ |" in table and " ± " in table
  assert "12 samples (ddim, 20 steps, guidance 3) conditioned on `validation`" in table
  assert "| FID ↓ |" in proc.stdout
  assert list((workdir / "eval").glob("events.out.tfevents.*"))


def test_evaluate_cli_sampler_flags_reach_the_run(result):
  """--steps beyond the schedule is the run's own config error, raised before anything
  is sampled: the flags replace config.sample.*."""
  workdir = result["root"] / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "ldm_jax.evaluate", f"--workdir={workdir}", "--steps=5000",
       "--sampler=plms", "--guidance=2"],
      env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "sample.steps=5000 must be in [1, 1000]" in proc.stderr
  assert "sample + score" not in proc.stderr  # no progress bar: nothing was sampled


def _ldm_config(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cin", "configs/ldm_cin256.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.first_stage.path = str(tmp_path / "vq.safetensors")
  return config


def test_errors_before_anything_is_built(tmp_path, monkeypatch):
  from ldm_jax.config_lib import autoencoder_config
  from ldm_jax.train import ldm_eval
  from ldm_jax.eval.workdir import apply_overrides
  config = _ldm_config(tmp_path)

  def fail(*args, **kwargs):
    raise AssertionError("built or compiled before the Inception check")

  monkeypatch.setattr(ldm_eval.ldm_trainer, "build_run", fail)
  monkeypatch.setattr(ldm_eval.ldm_trainer, "make_sampler", fail)
  with pytest.raises(FileNotFoundError,
                     match=r"(?s)No Inception weights file configured.*convert\.inception_weights"):
    ldm_eval.evaluate_ldm_workdir(str(tmp_path), apply_overrides(config))
  missing = apply_overrides(config, inception_weights=str(tmp_path / "missing.safetensors"))
  with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*convert\.inception_weights"):
    ldm_eval.evaluate_ldm_workdir(str(tmp_path), missing)
  # Unknown eval keys, and flags for the other kind of run.
  bad = config.copy_and_resolve_references()
  bad.eval.inception_weight = "x.safetensors"
  with pytest.raises(ValueError, match=r"unknown config keys eval\.\['inception_weight'\]"):
    apply_overrides(bad)
  with pytest.raises(ValueError, match="lpips_weights"):
    apply_overrides(config, lpips_weights="lpips.safetensors")
  autoencoder = autoencoder_config(kind="kl", embed_dim=4, z_channels=4, ch_mult=(1, 2),
                                   batch_size=2, loss={}, arg="tiny")
  with pytest.raises(ValueError, match=r"sample\.\['sampler', 'steps'\] apply to LDM"):
    apply_overrides(autoencoder, sampler="plms", steps=3)
  overridden = apply_overrides(config, sampler="plms", steps=3, guidance=1.5)
  assert (overridden.sample.sampler, overridden.sample.steps,
          overridden.sample.guidance_scale) == ("plms", 3, 1.5)
  assert config.sample.sampler == "ddim"  # the saved config itself is left alone


def test_training_config_checks(result, tmp_path, monkeypatch):
  from ldm_jax.train import ldm_step, ldm_trainer
  from ldm_jax.train.ldm_setup import check_config
  config = _ldm_config(tmp_path)
  config.eval.extra = 1
  with pytest.raises(ValueError, match=r"unknown config keys eval\.\['extra'\]"):
    check_config(config)
  old = _ldm_config(tmp_path)
  del old["eval"]  # a config.json saved before the block existed
  check_config(old)
  # A configured but missing Inception file stops training before anything is
  # initialized, compiled or written.
  config = _ldm_config(result["root"])  # its vq.safetensors
  config.eval.inception_weights = str(tmp_path / "missing.safetensors")

  def fail(*args, **kwargs):
    raise AssertionError("initialized or compiled before the Inception check")

  for name in ("new_state", "jit_train_step"):
    monkeypatch.setattr(ldm_step, name, fail)
  monkeypatch.setattr(ldm_trainer, "make_sampler", fail)
  workdir = tmp_path / "run"
  with pytest.raises(FileNotFoundError, match="ldm_jax.convert.inception_weights"):
    ldm_trainer.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()
