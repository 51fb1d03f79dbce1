"""Outputs never delete what ldm_jax did not write (exports, the latent cache, reports,
statistics, grids, weights), replace their own atomically, and the commands' bad inputs
fail in one line before any work."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from PIL import Image
from safetensors.numpy import save_file

from conftest import KL_F8_SMALL, cpu_env
from ldm_jax import outputs
from ldm_jax.convert import save_autoencoder
from ldm_jax.convert.files import write_safetensors
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.outputs import OutputError

flags.FLAGS.mark_as_parsed()  # grain reads absl flags (the trainer's data pipeline)


def _files(folder):
  """Every file under `folder` (hidden ones too) with its bytes."""
  return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
          if p.is_file()}


def _temps(folder):
  return [p for p in Path(folder).rglob("*") if ".ldm_jax-tmp-" in p.name]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A first-stage workdir: kl_f8 tiny, 2 steps, in-process (checkpoint at step 2 and the
  trainer's own export in W/export/autoencoder)."""
  from ldm_jax.train import autoencoder_trainer
  spec = importlib.util.spec_from_file_location("kl_f8", "configs/kl_f8.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.train.update(num_steps=2, eval_every=100, ckpt_every=2)
  workdir = tmp_path_factory.mktemp("run")
  autoencoder_trainer.train_and_evaluate(config, str(workdir))
  assert outputs.output_kind(workdir / "export" / "autoencoder") == outputs.AUTOENCODER
  return workdir


def test_export_never_replaces_the_workdir_or_a_foreign_folder(run, tmp_path):
  from ldm_jax.train.export import export_workdir
  before = _files(run)
  other_run = tmp_path / "other_run"
  (other_run / "checkpoints").mkdir(parents=True)
  projects = tmp_path / "projects"
  (projects / "old" / "run" / "checkpoints").mkdir(parents=True)
  for out, overwrite, message in ((run, False, "is the workdir itself"),
                                  (run, True, "is the workdir itself"),
                                  (run.parent, True, "holds the workdir"),
                                  (run / "checkpoints", True, "is a training workdir"),
                                  (other_run, True, "is a training workdir"),
                                  (projects, True, "holds the training workdir .*old/run")):
    with pytest.raises(OutputError, match=message):
      export_workdir(str(run), str(out), overwrite=overwrite)
  mine = tmp_path / "mine"
  (mine / "sub").mkdir(parents=True)
  (mine / "notes.txt").write_text("keep me")
  (mine / "sub" / "data.bin").write_bytes(b"\0")
  with pytest.raises(OutputError, match=r"holds 2 entries ldm_jax did not write \(notes.txt, "
                     r"sub\).*--overwrite"):
    export_workdir(str(run), str(mine))
  assert _files(mine) == {Path("notes.txt"): b"keep me", Path("sub/data.bin"): b"\0"}
  assert _files(run) == before and _files(other_run) == {}
  # --overwrite replaces a foreign folder (never a run, as above).
  assert export_workdir(str(run), str(mine), overwrite=True) == 2
  assert sorted(os.listdir(mine)) == [outputs.MARKER_FILE, "config.json",
                                      "diffusion_pytorch_model.safetensors"]
  assert not _temps(tmp_path) and _files(run) == before


def test_replacing_an_export_is_atomic_and_cleans_up(run, tmp_path, monkeypatch):
  import safetensors.numpy

  from ldm_jax.train.export import export_workdir
  out = tmp_path / "export"
  export_workdir(str(run), str(out))
  first = _files(out)
  # A temporary left by a killed process (no such pid) goes; one of a live process stays.
  host = outputs._owner().rsplit("-", 1)[0]  # pylint: disable=protected-access
  (tmp_path / f".export.ldm_jax-tmp-{host}-2147483647-dead" / "export").mkdir(parents=True)
  live = tmp_path / f".export.ldm_jax-tmp-{host}-{os.getppid()}-live"
  live.mkdir()

  def fail_half_way(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a file")
    raise OSError(28, "No space left on device", filename)

  monkeypatch.setattr(safetensors.numpy, "save_file", fail_half_way)
  with pytest.raises(OutputError, match="could not write .*export: No space left") as error:
    export_workdir(str(run), str(out))
  assert ".ldm_jax-tmp" not in str(error.value)
  assert _files(out) == first  # the previous export, untouched
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name])
  live.rmdir()
  monkeypatch.undo()

  # An export from before markers existed, and a fresh one, are both replaced in place.
  (out / outputs.MARKER_FILE).unlink()
  (out / "diffusion_pytorch_model.safetensors").write_bytes(b"old")
  export_workdir(str(run), str(out))
  assert _files(out) == first and not _temps(tmp_path)
  # What a user added to an export, or diffusers' own save_pretrained folder, is not ours.
  (out / "README.md").write_text("my notes")
  with pytest.raises(OutputError, match=r"also holds what ldm_jax did not write.*README.md"):
    export_workdir(str(run), str(out))
  (out / "README.md").unlink()
  (out / outputs.MARKER_FILE).unlink()
  config = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**config, "_diffusers_version": "0.30.0"}))
  with pytest.raises(OutputError, match="2 entries ldm_jax did not write"):
    export_workdir(str(run), str(out))


def test_stale_temporary_puts_back_an_output_moved_aside(tmp_path):
  """A process killed between moving the old output aside and moving the new one in."""
  target = tmp_path / "cache"
  host = outputs._owner().rsplit("-", 1)[0]  # pylint: disable=protected-access
  aside = tmp_path / f".cache.ldm_jax-tmp-{host}-2147483647-dead" / ".previous"
  aside.mkdir(parents=True)
  (aside / "a-00000-of-00001.array_record").write_bytes(b"records")
  with pytest.raises(RuntimeError, match="stop"):
    with outputs.atomic_path(target, outputs.LATENT_CACHE):
      raise RuntimeError("stop")
  assert _files(target) == {Path("a-00000-of-00001.array_record"): b"records"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_foreign_files_are_kept(tmp_path):
  from ldm_jax.eval import fid
  from ldm_jax.eval.workdir import check_reports, write_reports
  from ldm_jax.train.images import check_grid_path, save_grid
  model = build_autoencoder(KL_F8_SMALL)
  # A user's .safetensors: not replaced by an export or a converter unless asked.
  theirs = tmp_path / "theirs.safetensors"
  save_file({"x": np.zeros(2, np.float32)}, theirs)
  for write in (lambda **kw: save_autoencoder(model, theirs, format="compvis", **kw),
                lambda **kw: write_safetensors({"y": np.ones(1)}, theirs, **kw)):
    with pytest.raises(OutputError, match="a file ldm_jax did not write.*--overwrite"):
      write()
  assert set(safetensors_keys(theirs)) == {"x"}
  save_autoencoder(model, theirs, format="compvis", overwrite=True)
  assert outputs.output_kind(theirs) == outputs.AUTOENCODER
  save_autoencoder(model, theirs, format="compvis")  # now ours: replaced
  with pytest.raises(OutputError, match="an ldm_jax autoencoder export, not a weights file"):
    write_safetensors({"y": np.ones(1)}, theirs)

  # PNG grids: a user's picture stays; the sampling command's own rerun replaces its grid.
  photo = tmp_path / "photo.png"
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(photo)
  with pytest.raises(OutputError, match="a file ldm_jax did not write"):
    check_grid_path(str(photo))
  with pytest.raises(OutputError, match="a file ldm_jax did not write"):
    save_grid(np.ones((4, 4, 3), np.uint8), str(photo), overwrite=False)
  assert np.asarray(Image.open(photo)).max() == 0
  grid = tmp_path / "samples.png"
  for value in (1, 2):
    save_grid(np.full((4, 4, 3), value, np.uint8), str(check_grid_path(str(grid))),
              overwrite=False)
  assert np.asarray(Image.open(grid)).max() == 2
  assert outputs.output_kind(grid) == outputs.SAMPLES
  for path, message in ((tmp_path, "is a folder"), (tmp_path / "a.jpg", "ending in .png"),
                        (photo / "x.png", "is a file, not a folder")):
    with pytest.raises(OutputError, match=message):
      check_grid_path(str(path))

  # Reference statistics: pytorch-fid's file stays, ldm_jax's (even from before markers)
  # is replaced.
  mu, sigma = np.zeros(3), np.eye(3)
  np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
  with pytest.raises(OutputError, match="did not write"):
    fid.save_stats(tmp_path / "pytorch_fid.npz", mu, sigma)
  np.savez(tmp_path / "old.npz", mu=mu, sigma=sigma, num_examples=5)
  fid.save_stats(tmp_path / "old.npz", mu + 1, sigma, num_examples=6)
  assert outputs.output_kind(tmp_path / "old.npz") == outputs.REFERENCE_STATS
  np.testing.assert_array_equal(fid.load_stats(tmp_path / "old.npz")[0], mu + 1)

  # Evaluation reports: rewritten for the same step (also from before markers); a foreign
  # file where a report goes fails before the evaluation.
  report = {"step": 3, "split": "validation", "num_examples": 2, "weights": "ema",
            "metrics": {"psnr": 20.0}}
  json_path, md_path = write_reports(str(tmp_path), report)
  assert json.loads(Path(json_path).read_text())["step"] == 3
  assert Path(md_path).read_text().startswith("<!-- ldm_jax_output: eval_report -->\n")
  Path(json_path).write_text(json.dumps(report))  # as written before markers
  Path(md_path).write_text("Step 3, 2 images of `validation` (ema weights)\n\n| metric |\n")
  check_reports(str(tmp_path), 3)
  write_reports(str(tmp_path), report)
  (tmp_path / "eval" / "step_0000004.md").write_text("my notes")
  with pytest.raises(OutputError, match="step_0000004.md already exists"):
    check_reports(str(tmp_path), 4)
  assert not _temps(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(tmp_path, umask):
  """safetensors writes its files 0600: exports get 0o666 & ~umask, as open() gives."""
  model = build_autoencoder(KL_F8_SMALL)
  previous = os.umask(umask)
  try:
    write_safetensors({"x": np.zeros(2, np.float32)}, tmp_path / "w.safetensors")
    save_autoencoder(model, tmp_path / "vae", format="diffusers")
    save_autoencoder(model, tmp_path / "vae.safetensors", format="compvis")
  finally:
    os.umask(previous)
  files = [tmp_path / "w.safetensors", tmp_path / "vae.safetensors",
           *(p for p in (tmp_path / "vae").rglob("*") if p.is_file())]
  assert len(files) > 3
  for f in files:
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
  assert (tmp_path / "vae").stat().st_mode & 0o777 == 0o777 & ~umask


def test_grid_layout_fits_the_number_of_images():
  """No blank cells when a near-square layout exists; strips fall back to ceil(sqrt(n))
  columns with fewer blanks than columns."""
  from ldm_jax.train.images import grid, grid_columns
  columns = {n: grid_columns(n) for n in range(1, 27)}
  assert [columns[n] for n in (1, 2, 3, 4, 6, 7, 8, 9, 12, 16, 18, 24)] == [
      1, 2, 3, 2, 3, 7, 4, 3, 4, 4, 6, 6]
  assert [columns[n] for n in (11, 13, 17, 22, 26)] == [4, 4, 5, 5, 6]  # strips avoided
  for n, c in columns.items():
    rows = -(-n // c)
    assert rows <= c and rows * c - n < c, (n, c)
  one = grid(np.zeros((1, 4, 6, 3), np.float32))
  assert one.shape == (4, 6, 3) and one.min() == 128  # --num=1: the image, no black tiles
  assert grid(np.zeros((3, 4, 6, 3), np.float32)).shape == (4, 18, 3)


def safetensors_keys(path):
  from safetensors import safe_open
  with safe_open(str(path), framework="numpy") as f:
    return list(f.keys())


def test_latent_cache_folder_is_reused_never_emptied(tmp_path):
  from ldm_jax.data import latents
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "notes.txt").write_text("keep me")
  with pytest.raises(OutputError, match=r"1 entry ldm_jax did not write \(notes.txt\).*"
                     r"--overwrite .* to write a latent cache into it"):
    latents.check_cache_dir(str(cache))
  latents.check_cache_dir(str(cache), overwrite=True)
  shard = latents.shard_path(str(cache), "train", 0, 1)
  for data in (b"first", b"second"):  # each run's shard replaces the last one
    outputs.prepare_directory(cache, outputs.LATENT_CACHE, overwrite=data == b"first")
    with outputs.atomic_path(shard, outputs.LATENT_CACHE) as tmp:
      tmp.write_bytes(data)
  assert (cache / "notes.txt").read_text() == "keep me" and Path(shard).read_bytes() == b"second"
  latents.check_cache_dir(str(cache))  # marked: reused without --overwrite
  legacy = tmp_path / "legacy"  # a cache from before markers: shards only
  legacy.mkdir()
  (legacy / "validation-00000-of-00002.array_record").write_bytes(b"x")
  latents.check_cache_dir(str(legacy))


def test_checkpoint_steps_and_first_stage_override(run, tmp_path):
  from ldm_jax.eval.workdir import load_run_config
  from ldm_jax.train import checkpoint
  assert checkpoint.resolve_step(str(run)) == 2 and checkpoint.resolve_step(str(run), 2) == 2
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 3 .*saved steps: 2$"):
    checkpoint.resolve_step(str(run), 3)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    checkpoint.resolve_step(str(tmp_path), 3)
  with pytest.raises(ValueError, match="--first_stage applies to LDM runs"):
    load_run_config(str(run), first_stage="elsewhere")
  ldm = tmp_path / "ldm"
  ldm.mkdir()
  (ldm / "config.json").write_text(json.dumps({"stage": "ldm", "first_stage": {"path": "a"}}))
  assert load_run_config(str(ldm)).first_stage.path == "a"
  assert load_run_config(str(ldm), first_stage="moved/vae").first_stage.path == os.path.abspath(
      "moved/vae")
  assert load_run_config(str(ldm), first_stage="gs://b/vae").first_stage.path == "gs://b/vae"


@pytest.mark.parametrize("override, expected", [
    ("--config.model.foo=1",
     "error: --config.model.foo: the `model` block has no key 'foo'; its keys: "
     "attn_resolutions, attn_type, beta, ch, ch_mult,"),
    ("--config.trian.num_steps=1",
     "error: --config.trian.num_steps: the config has no block 'trian' (did you mean "
     "'train'?); its top-level keys: data, eval, loss, model, optim, train"),
    ("--config.train.mesh.dta=1",
     "error: --config.train.mesh.dta: the `train.mesh` block has no key 'dta' (did you mean "
     "'data'?); its keys: data, dcn_data, fsdp"),
])
def test_unknown_config_key_is_one_line(override, expected):
  """ml_collections' own failure (three chained tracebacks), explained by the parser the
  commands give absl.app.run."""
  from ml_collections import config_flags

  from ldm_jax.cli import parse_flags
  argv = ["main", "--config=configs/kl_f8.py:tiny", override]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  with pytest.raises(SystemExit) as error:
    parse_flags(argv, flag_values)
  assert str(error.value.code).startswith(expected) and "\n" not in str(error.value.code)
  argv = ["main", "--config=configs/kl_f8.py:tiny", "--config.train.mesh.data=2"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  parse_flags(argv, flag_values)
  assert flag_values.config.train.mesh.data == 2
  argv = ["main", "--config=configs/nope.py"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  with pytest.raises(SystemExit, match=r"^error: --config=configs/nope.py: cannot load it: "
                     r"\[Errno 2\] No such file"):
    parse_flags(argv, flag_values)


def test_export_command_refuses_the_workdir_in_one_line(run):
  before = _files(run)
  proc = subprocess.run([sys.executable, "-m", "ldm_jax.export", f"--workdir={run}",
                         f"--out={run}"], env=cpu_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: --out={run} is the workdir itself"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and "flags:" not in proc.stderr
  assert _files(run) == before


SAMPLE = r"""
import json, sys
from absl import flags
import ldm_jax.sample as sample
import ldm_jax.train.sample_inputs as sample_inputs

def stop(*args, **kwargs):
  raise RuntimeError("passed the checks")

sample_inputs.condition_fields = stop  # the first step after the checks: build nothing
results = []
for argv in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(["sample"] + argv)
    sample.main(["sample"])
  except flags.Error as e:
    results.append(f"flag error: {e}")
  except SystemExit as e:
    results.append(str(e.code))
  except RuntimeError as e:
    results.append(str(e))
print(json.dumps(results))
"""


def test_sample_command_checks_its_inputs_first(run, tmp_path):
  """Every bad input of the sampling command, in one process, before anything is built.
  The LDM workdir is the autoencoder run's checkpoints under an LDM config.json: what the
  checks read."""
  ldm = tmp_path / "ldm"
  shutil.copytree(run / "checkpoints", ldm / "checkpoints")
  (ldm / "config.json").write_text(json.dumps(
      {"stage": "ldm", "first_stage": {"path": "a"}, "cond": {"kind": "class"}, "sample": {}}))
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "photo.png")
  (tmp_path / "file.txt").write_text("")
  w = f"--workdir={ldm}"
  ok = f"--out={tmp_path / 'grid.png'}"
  cases = {
      (w, "--num=0"): "flag error: flag --num=0: 0 is not a positive integer",
      (w, "--num=-2"): "flag error: flag --num=-2: -2 is not a positive integer",
      (w, "--batch=0"): "flag error: flag --batch=0: 0 is not a positive integer",
      (w, ok, "--step=3"): f"error: no checkpoint of step 3 in {ldm / 'checkpoints'}; saved "
                           "steps: 2",
      # A folder: one PNG per image, written whole; never over what ldm_jax did not write.
      (w, f"--out={tmp_path}"): f"error: {tmp_path} already exists and holds 3 entries",
      (w, f"--out={tmp_path / 'grid.jpg'}"): "error: --out=",
      (w, f"--out={tmp_path / 'file.txt' / 'grid.png'}"): "error: cannot create",
      (w, f"--out={tmp_path / 'photo.png'}"): "error: ",
      (w, ok, "--guidance=-1"): "passed the checks",
      (w, ok, "--first_stage=moved"): "passed the checks",
      (f"--workdir={run}", ok): f"error: {run} holds an autoencoder run, not an LDM",
      (f"--workdir={run}", ok, "--first_stage=x"): "error: --first_stage applies to LDM runs",
      (w, ok, "--guidance=nan"): "error: --guidance=nan must be a finite number",
      (w, ok, "--eta=-inf"): "error: --eta=-inf must be a finite number",
      (w, ok, "--strength=inf"): "error: --strength=inf must be a finite number",
      (w, "--individual", ok): "error: --out=",
      (w, "--individual", f"--out={tmp_path / 'fresh'}"): "passed the checks",
      (w, f"--out={tmp_path / 'fresh'}/"): "passed the checks",
  }
  proc = subprocess.run([sys.executable, "-c", SAMPLE, json.dumps([list(c) for c in cases])],
                        env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  for (case, expected), got in zip(cases.items(), results):
    assert got.startswith(expected) and "\n" not in got, (case, got)
  assert "ending in .png" in results[5] and "did not write" in results[7]
  assert "one PNG per image goes into a folder" in results[-3]
  assert "--guidance=-1 is negative" in proc.stderr
  assert not (tmp_path / "grid.png").exists() and _files(run / "checkpoints")
  assert not (tmp_path / "fresh").exists()
