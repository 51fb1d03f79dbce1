"""gs:// works wherever a local path does, against a real GCS API: fake-gcs-server on
127.0.0.1 (tests/conftest.py: gcs_bucket), reached through STORAGE_EMULATOR_HOST alone.

In-process: ldm_jax.outputs' atomic replacement and refusal rules on gs://. End to end,
six commands on gs:// workdirs: an autoencoder trained, stopped by SIGTERM and resumed
(bit for bit against a local uninterrupted run), exported, evaluated; an LDM trained on
its latents (first_stage.path = the gs:// workdir) and sampled. Nothing named `gs:` may
appear on the local disk.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from absl import flags

from conftest import autoencoder_checkpoint as _state, cpu_env
from ldm_jax import fs, outputs
from ldm_jax.outputs import OutputError

flags.FLAGS.mark_as_parsed()  # grain reads absl flags (the in-process training run)

REPO = Path(__file__).resolve().parents[1]
STEPS = 4  # configs' tiny variant: log every step, evaluate and save every 2


def _unique(bucket: str, name: str) -> str:
  return f"{bucket}/{name}-{uuid.uuid4().hex[:8]}"


# --- The layer itself ------------------------------------------------------------------


def test_workdir_lock_on_gcs_is_exclusive_and_a_dead_holder_is_taken_over(gcs_bucket):
  """The lock object is created with ifGenerationMatch=0: a second holder is refused
  while the first lives, the object is gone after release, and a holder on this host
  whose process has exited is taken over."""
  import socket

  from ldm_jax.train import workdir_lock
  workdir = _unique(gcs_bucket, "lock")
  lock = f"{workdir}/{workdir_lock.LOCK_FILE}"
  with workdir_lock.hold(workdir):
    holder = json.loads(fs.read_text(lock))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(workdir_lock.WorkdirLocked, match=f"in use by process {os.getpid()}"):
      with workdir_lock.hold(workdir):
        pass
    with pytest.raises(workdir_lock.WorkdirLocked):
      workdir_lock.check_free(workdir)
    assert json.loads(fs.read_text(lock)) == holder  # the refused run changed nothing
  assert not fs.exists(lock)

  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  fs.write_text(lock, json.dumps({"host": socket.gethostname(),
                                  "pid": int(gone.stdout), "started": "earlier"}))
  with workdir_lock.hold(workdir):
    assert json.loads(fs.read_text(lock))["pid"] == os.getpid()
  assert not fs.exists(lock)


def _write_folder(out, value, fail=False):
  with outputs.atomic_path(out, outputs.AUTOENCODER) as tmp:
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps({"v": value}))
    (tmp / "weights.bin").write_bytes(bytes([value]) * 10)
    if fail:
      raise RuntimeError("the writer died")


def _value(out):
  return json.loads(fs.read_text(f"{out}/config.json"))["v"]


def test_atomic_replace_of_a_folder_and_a_file_on_gcs(gcs_bucket):
  base = _unique(gcs_bucket, "atomic")
  out = f"{base}/vae"
  _write_folder(out, 1)
  assert outputs.output_kind(out) == outputs.AUTOENCODER and _value(out) == 1
  _write_folder(out, 2)  # a previous export of the same kind is replaced
  assert fs.listdir(out) == [outputs.MARKER_FILE, "config.json", "weights.bin"]
  assert _value(out) == 2 and fs.read_bytes(f"{out}/weights.bin") == b"\2" * 10
  with pytest.raises(RuntimeError, match="died"):  # a failed write changes nothing
    _write_folder(out, 3, fail=True)
  assert _value(out) == 2 and fs.listdir(base) == ["vae"]

  # A process that died mid-swap: its temporary holds the old output (copied aside and
  # marked done), the target only part of the new one. The next write of the target puts
  # the old one back before it starts.
  host = outputs._owner().rsplit("-", 1)[0]
  container = f"{base}/.vae{outputs._TMP_TAG}{host}-{2**22 + 1}-dead"
  fs.copy(out, f"{container}/{outputs._PREVIOUS}", last=(outputs.MARKER_FILE,))
  fs.write_text(f"{container}/{outputs._PREVIOUS_DONE}", "")
  fs.remove(f"{out}/{outputs.MARKER_FILE}")
  fs.write_text(f"{out}/config.json", json.dumps({"v": 99}))
  with pytest.raises(RuntimeError, match="died"):
    _write_folder(out, 4, fail=True)
  assert outputs.output_kind(out) == outputs.AUTOENCODER and _value(out) == 2
  assert fs.listdir(base) == ["vae"]

  # A file: one upload replaces it; a reader never sees part of one.
  from ldm_jax.convert.files import read_tensors, write_safetensors
  weights = f"{base}/w.safetensors"
  for value in (1.0, 2.0):
    write_safetensors({"x": np.full(3, value, np.float32)}, weights)
  np.testing.assert_array_equal(read_tensors(weights)["x"], [2.0] * 3)
  assert outputs.output_kind(weights) == outputs.WEIGHTS
  assert fs.listdir(base) == ["vae", "w.safetensors"]


def test_refusal_rules_hold_on_gcs(gcs_bucket):
  from PIL import Image

  from ldm_jax.data import latents
  from ldm_jax.train.export import check_export_target
  from ldm_jax.train.images import check_grid_path, save_grid
  base = _unique(gcs_bucket, "rules")
  with fs.open(f"{base}/photo.png", "wb") as f:  # a PNG ldm_jax did not write
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(f, format="PNG")
  with pytest.raises(OutputError, match="a file ldm_jax did not write"):
    save_grid(np.ones((4, 4, 3), np.uint8), f"{base}/photo.png", overwrite=False)
  with pytest.raises(OutputError, match="is a folder"):
    check_grid_path(base)
  with pytest.raises(OutputError, match="is a file, not a folder"):
    check_grid_path(f"{base}/photo.png/x.png")
  with pytest.raises(OutputError, match="bucket gs://no-such-bucket-ldm-jax does not exist"):
    check_grid_path("gs://no-such-bucket-ldm-jax/x.png")
  grid = f"{base}/grid.png"
  for value in (1, 2):  # the command's own grid is replaced
    save_grid(np.full((4, 4, 3), value, np.uint8), check_grid_path(grid), overwrite=False)
  assert outputs.output_kind(grid) == outputs.SAMPLES

  fs.write_text(f"{base}/mine/notes.txt", "keep me")
  with pytest.raises(OutputError, match=r"holds 1 entry ldm_jax did not write \(notes.txt\)"):
    outputs.check_target(f"{base}/mine", outputs.AUTOENCODER)
  with pytest.raises(OutputError, match="write a latent cache into it"):
    latents.check_cache_dir(f"{base}/mine")
  assert fs.read_text(f"{base}/mine/notes.txt") == "keep me"

  run = f"{base}/projects/run"
  fs.write_text(f"{run}/config.json", "{}")
  fs.write_text(f"{run}/checkpoints/2/commit_success.txt", "")
  for out, message in ((run, "is the workdir itself"), (f"{base}/projects", "holds the workdir"),
                       (f"{run}/checkpoints", "is a training workdir")):
    with pytest.raises(OutputError, match=message):
      check_export_target(run, out, "diffusers", outputs.AUTOENCODER, overwrite=True)
  with pytest.raises(OutputError, match="holds the training workdir .*projects/run"):
    outputs.check_target(base, outputs.AUTOENCODER, overwrite=True)
  assert fs.isfile(f"{run}/checkpoints/2/commit_success.txt")


def test_image_folder_and_latent_cache_on_gcs(gcs_bucket):
  """Images, class subfolders and captions read from gs://; the latent cache written to
  gs:// and streamed back by array_record straight from the emulator."""
  from flax import nnx
  from PIL import Image

  from ldm_jax.data import latents
  from ldm_jax.data.conditions import ConditionSpec
  from ldm_jax.data.pipeline import eval_batches
  from ldm_jax.data.sources import check_data, make_source
  from ldm_jax.data.spec import DataSpec
  from ldm_jax.models.autoencoder import AutoencoderSpec, build_autoencoder
  base = _unique(gcs_bucket, "data")
  rng = np.random.default_rng(0)
  for i in range(6):
    with fs.open(f"{base}/images/{('cat', 'dog')[i % 2]}/{i}.png", "wb") as f:
      Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(f, format="PNG")
  fs.write_text(f"{base}/images/cat/0.txt", "a cat")
  config = DataSpec.from_config(ml_collections.ConfigDict(dict(
      source="folder", path=f"{base}/images", split="train", val_split="validation",
      val_fraction=0.34, image_size=32, batch_size=2, random_crop=False, random_flip=False,
      num_workers=0, seed=0)))
  check_data(config)
  assert len(make_source(config, "train")) + len(make_source(config, "validation")) == 6

  model = build_autoencoder(AutoencoderSpec(kind="kl", resolution=32, ch=32, ch_mult=(1,),
                                            num_res_blocks=1, z_channels=4, embed_dim=4),
                            nnx.Rngs(0))
  conditions = ConditionSpec(fields=("label",))
  cache = f"{base}/cache"
  latents.check_cache_dir(cache)
  count = latents.write_cache(model, config, "train", cache, batch_size=2,
                              conditions=conditions)
  assert count == len(make_source(config, "train"))
  assert outputs.output_kind(cache) == outputs.LATENT_CACHE
  assert fs.listdir(cache) == [outputs.MARKER_FILE, "train-00000-of-00001.array_record"]
  records = list(latents.read_all(cache, "train"))
  first = next(eval_batches(config, "train", batch_size=2, process_index=0, process_count=1,
                            conditions=conditions))
  np.testing.assert_allclose(records[0]["mean"],
                             latents.moments(model, first["image"])["mean"][0], atol=1e-5)
  assert records[0]["label"] == first["label"][0]
  batch = next(latents.latent_iterator(cache, "train", global_batch_size=2, seed=0,
                                       process_index=0, process_count=1))
  assert batch["mean"].shape == (2,) + records[0]["mean"].shape


# --- End to end ------------------------------------------------------------------------


def _command(module, *args):
  return [sys.executable, "-m", module, *args]


def _run(cwd, module, *args, timeout=900):
  proc = subprocess.run(_command(module, *args), cwd=cwd, env=cpu_env(), capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr


def _wait_for(proc, needle, timeout=600):
  seen = []
  while True:
    line = proc.stderr.readline()
    if not line:
      proc.kill()
      raise AssertionError(f"{needle!r} never appeared:\n" + "".join(seen[-50:]))
    seen.append(line)
    if needle in line:
      return


def _listing(top):
  """Every object under `top` with its size."""
  return sorted((f"{root}/{name}", fs.getsize(f"{root}/{name}"))
                for root, _, files in fs.walk(top) for name in files)


def _no_local_gs(*, below=(), top=()):
  """No `gs:` anywhere under the folders `below`, nor directly in those in `top` (where
  os.makedirs("gs://b/x") or abspath would have put one)."""
  found = [os.path.join(f, n) for f in top for n in os.listdir(f) if n.startswith("gs:")]
  for folder in below:
    for root, dirs, files in os.walk(folder):
      found += [os.path.join(root, n) for n in dirs + files if n.startswith("gs:")]
  assert not found, f"local paths named gs: were created: {found}"


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
  """The commands' current directory: where a stray local `gs:/...` would appear."""
  return tmp_path_factory.mktemp("gcs_cwd")


@pytest.fixture(scope="module")
def ae_run(gcs_bucket, cwd):
  """An autoencoder workdir on gs://: kl_f8 tiny, SIGTERM after its first step line,
  then resumed to the end."""
  workdir = _unique(gcs_bucket, "ae")
  config = f"--config={REPO / 'configs' / 'kl_f8.py'}:tiny"
  proc = subprocess.Popen(_command("ldm_jax.main", config, f"--workdir={workdir}"), cwd=cwd,
                          env=cpu_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True)
  _wait_for(proc, f"step 1/{STEPS}")
  proc.send_signal(signal.SIGTERM)
  rest = proc.stderr.read()
  assert proc.wait(timeout=300) == 0, rest[-3000:]
  assert "preempted: checkpoint saved at step" in rest
  log = _run(cwd, "ldm_jax.main", config, f"--workdir={workdir}")
  assert "resuming from the checkpoint at step" in log
  return workdir


def test_autoencoder_on_gcs_trains_resumes_exports_and_evaluates(ae_run, cwd, tmp_path):
  from ldm_jax.convert import load_autoencoder
  from ldm_jax.train import autoencoder_trainer, checkpoint
  from ldm_jax.train.export import export_workdir
  workdir = ae_run
  assert checkpoint.saved_steps(workdir)[-1] == STEPS
  assert json.loads(fs.read_text(f"{workdir}/config.json"))["train"]["num_steps"] == STEPS
  assert fs.glob(f"{workdir}/images/val_*.png")
  lines = fs.read_text(f"{workdir}/val_metrics.jsonl").splitlines()
  assert json.loads(lines[-1])["step"] == STEPS
  assert fs.glob(f"{workdir}/events.out.tfevents.*")  # TensorBoard, mirrored
  assert outputs.output_kind(f"{workdir}/export/autoencoder") == outputs.AUTOENCODER

  # Bit for bit what a local run that was never interrupted ends with.
  spec = importlib.util.spec_from_file_location("kl_f8", REPO / "configs" / "kl_f8.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  local = tmp_path / "local"
  autoencoder_trainer.train_and_evaluate(module.get_config("tiny"), str(local))
  (step, remote_state), (_, local_state) = _state(workdir), _state(str(local))
  assert step == STEPS and remote_state.keys() == local_state.keys()
  for key in remote_state:
    np.testing.assert_array_equal(remote_state[key], local_state[key], err_msg=key)

  # Exports to gs://, read back from gs://: the command (compvis) and the library
  # (diffusers) give the trainer's own export's weights.
  compvis = _unique(fs.bucket(workdir), "exports") + "/ae.safetensors"
  _run(cwd, "ldm_jax.export", f"--workdir={workdir}", "--format=compvis", f"--out={compvis}")
  diffusers = compvis.replace("ae.safetensors", "ae_diffusers")
  assert export_workdir(workdir, diffusers, "diffusers") == STEPS
  kernels = [np.asarray(load_autoencoder(p).decoder.conv_out.kernel[...])
             for p in (f"{workdir}/export/autoencoder", compvis, diffusers)]
  np.testing.assert_array_equal(kernels[0], kernels[1])
  np.testing.assert_array_equal(kernels[0], kernels[2])

  # A second run while the workdir is held (a live holder: this test's process) is
  # refused in one line and changes nothing; the finished run released its own lock.
  lock = f"{workdir}/lock.json"
  assert not fs.exists(lock)
  fs.write_text(lock, json.dumps({"host": __import__("socket").gethostname(),
                                  "pid": os.getpid(), "started": "earlier"}))
  before = _listing(workdir)
  held = subprocess.run(_command("ldm_jax.main", f"--config={REPO / 'configs' / 'kl_f8.py'}:tiny",
                                 f"--workdir={workdir}", f"--config.train.num_steps={STEPS + 2}"),
                        cwd=cwd, env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert held.returncode == 1 and "Traceback" not in held.stderr, held.stderr[-3000:]
  assert [line for line in held.stderr.splitlines() if line.startswith("error:")] == [
      line for line in held.stderr.splitlines() if "is in use by process" in line]
  assert _listing(workdir) == before
  fs.remove(lock)

  _run(cwd, "ldm_jax.evaluate", f"--workdir={workdir}", "--num_examples=2")
  report = json.loads(fs.read_text(f"{workdir}/eval/step_{STEPS:07d}.json"))
  assert report["step"] == STEPS and np.isfinite(report["metrics"]["psnr"])
  assert fs.isfile(f"{workdir}/eval/step_{STEPS:07d}.md")
  assert fs.glob(f"{workdir}/eval/events.out.tfevents.*")
  _no_local_gs(below=(cwd, tmp_path), top=(REPO, tempfile.gettempdir()))


def test_ldm_on_gcs_trains_on_a_gcs_first_stage_samples_and_exports(ae_run, cwd):
  from ldm_jax.convert import load_autoencoder
  from ldm_jax.train import checkpoint
  from ldm_jax.train.export import export_ldm_workdir
  workdir = _unique(fs.bucket(ae_run), "ldm")
  _run(cwd, "ldm_jax.main", f"--config={REPO / 'configs' / 'ldm_txt2img.py'}:tiny",
       f"--workdir={workdir}", f"--config.first_stage.path={ae_run}",
       "--config.first_stage.downsample_factor=2")  # kl_f8:tiny keeps two levels
  assert checkpoint.saved_steps(workdir)[-1] == STEPS
  assert json.loads(fs.read_text(f"{workdir}/config.json"))["first_stage"]["path"] == ae_run
  assert fs.glob(f"{workdir}/images/samples_*.png")

  grid = f"{workdir}/grid.png"
  _run(cwd, "ldm_jax.sample", f"--workdir={workdir}", f"--out={grid}", "--num=2",
       "--batch=2", "--steps=2", "--prompt=a cat")
  assert outputs.output_kind(grid) == outputs.SAMPLES

  out = _unique(fs.bucket(ae_run), "exports") + "/ldm"
  assert export_ldm_workdir(workdir, out, "diffusers") == STEPS
  assert {"unet", "vae", outputs.MARKER_FILE} <= set(fs.listdir(out))
  load_autoencoder(out)  # its vae/
  _no_local_gs(below=(cwd,), top=(REPO, tempfile.gettempdir()))


# --- Two processes, fsdp across both, on gs:// -----------------------------------------

# kl_f8:tiny on 2 processes x 4 CPU devices, every parameter split over all 8 (the tiny
# model's small arrays stay whole, hence the fraction); validation at step 6 and 12.
PODLIKE = (f"--config={REPO / 'configs' / 'kl_f8.py'}:tiny", "--config.train.mesh.data=1",
           "--config.train.mesh.fsdp=8", "--config.data.batch_size=8",
           "--config.train.max_unsharded_fraction=1.0", "--config.train.num_steps=12",
           "--config.train.ckpt_every=4", "--config.train.preemption_every=5",
           "--config.train.eval_every=6", "--config.train.eval_at_start=False")


def _start_processes(workdir, port):
  env = cpu_env(devices=4)
  return [subprocess.Popen(
      _command("ldm_jax.main", *PODLIKE, f"--workdir={workdir}",
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}"),
      env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
      for i in range(2)]


def _finish(procs, timeout=600):
  logs = []
  for proc in procs:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    logs.append(err)
  return logs


def test_two_processes_save_the_same_step_on_sigterm_to_one_and_resume_bit_exact(
    gcs_bucket, tmp_path):
  import re
  sys.path.insert(0, str(REPO / "launch"))
  from local_multiprocess import _free_port
  from ldm_jax.train import checkpoint

  workdir = _unique(gcs_bucket, "pod")
  procs = _start_processes(workdir, _free_port())
  _wait_for(procs[0], "step 1/12")
  procs[1].send_signal(signal.SIGTERM)  # one host is preempted, the other is not
  logs = _finish(procs)
  saved = [re.findall(r"preempted: checkpoint saved at step (\d+)", log) for log in logs]
  assert saved[0] and saved[0] == saved[1], logs[0][-3000:] + logs[1][-3000:]
  step = int(saved[0][0])
  assert step in (5, 10)  # an agreed step (every train.preemption_every), not a save step
  assert checkpoint.saved_steps(workdir)[-1] == step

  resumed = _finish(_start_processes(workdir, _free_port()))
  assert f"resuming from the checkpoint at step {step}" in resumed[0]
  local = tmp_path / "uninterrupted"
  _finish(_start_processes(str(local), _free_port()))
  (done, remote_state), (_, local_state) = _state(workdir), _state(str(local))
  assert done == 12 and remote_state.keys() == local_state.keys()
  for key in remote_state:
    np.testing.assert_array_equal(remote_state[key], local_state[key], err_msg=key)
  _no_local_gs(top=(REPO, tempfile.gettempdir()))
