"""A workdir's saved config against the one a rerun brings: what may change on resume.

A workdir is one run. Rerunning it resumes from its newest checkpoint, so the new config
must describe the same run: the architecture, the losses, the data shapes and the state's
structure must match the checkpoint, or the restore fails deep inside orbax — or worse,
succeeds and trains something else under the old name. `check_resume` compares the two
before anything is written, refuses those differences with the list of changed keys, and
logs the rest: settings that only steer the loop (steps, intervals, evaluation) at INFO,
other hyperparameters (learning rate, data source) as a warning, since they change the
run from here on. `write_config` replaces config.json only once the restore has
succeeded, keeping the one it replaces as config.previous.json.

Paths in a config are made absolute at the start of a run (`absolute_paths`), so the
saved config.json works from any current directory (`sample`, `export`, `evaluate`).
"""

from __future__ import annotations

import json
from typing import Any

from absl import logging

from ldm_jax import fs

# Keys whose change on resume is refused: they define what the checkpoint holds (shapes,
# the state's structure) or what is being optimized. A key matches a prefix ending in "."
# or an exact name.
REFUSED = ("stage", "model.", "unet.", "cond.", "loss.", "diffusion.", "data.image_size",
           "data.batch_size", "optim.accumulate_grad_batches", "train.decoder_only",
           "first_stage.kind", "first_stage.downsample_factor", "first_stage.scale_by_std",
           "first_stage.scale_factor", "first_stage.shift_factor", "first_stage.shift_by_mean",
           "first_stage.latent_scaling", "pipeline.prediction_type")
# Keys that only steer the loop or its reports: changed freely, logged at INFO.
HARMLESS = ("train.num_steps", "train.log_every", "train.eval_every", "train.ckpt_every",
            "train.keep_checkpoints", "train.eval_examples", "train.on_nonfinite",
            "train.max_nonfinite", "train.export_format", "train.mesh.", "train.init_from",
            # read only to build the first state; a resume restores the checkpoint's
            "train.init_discriminator", "train.finetunes",
            "train.eval_at_start", "train.preemption_every", "train.sharding_rules",
            "train.max_unsharded_fraction",
            "eval.", "sample.", "data.read_threads",
            # a download of a missing TFDS dataset; a check of the captions at the start
            "data.download", "data.allow_empty_captions",
            # files that may move between runs (their contents are the user's to keep)
            "first_stage.path", "loss.lpips_weights", "cond.vocab_file",
            "pipeline.path", "pipeline.tokenizer")  # an SD fine-tune's source pipeline
# Files and folders named by a config (made absolute; moving one is not a new run).
PATH_KEYS = ("first_stage.path", "first_stage.cache_dir", "train.init_from",
             "loss.lpips_weights", "eval.inception_weights", "eval.reference_stats",
             "cond.vocab_file", "data.data_dir", "eval.clip_model", "pipeline.path",
             "pipeline.tokenizer")
DATA_PATH_SOURCES = ("folder", "arrayrecord")  # where data.path is a path, not a TFDS name


class WorkdirMismatch(ValueError):
  """The workdir holds another run than the config describes."""


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _absolute(path: str) -> str:
  return fs.absolute(path)  # URLs (gs://...) are absolute already


def path_keys(config) -> tuple[str, ...]:
  """The path keys of a config (a ConfigDict or its JSON dict)."""
  data = config.get("data") or {}
  return PATH_KEYS + (("data.path",) if data.get("source") in DATA_PATH_SOURCES else ())


def absolute_paths(config):
  """A copy of `config` with every local path absolute (URLs and empty values kept)."""
  config = config.copy_and_resolve_references()
  for key in path_keys(config):
    block, name = key.split(".")
    if config.get(block) is not None and isinstance(config[block].get(name), str):
      config[block][name] = _absolute(config[block][name])
  return config


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"a.b": value} of a JSON-like dict; lists stay values (tuples compare as lists)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def as_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def is_ldm(tree: dict) -> bool:
  return tree.get("stage") == "ldm"


def stage_name(tree: dict) -> str:
  return "an LDM (stage 2)" if is_ldm(tree) else "an autoencoder (stage 1)"


def diff(saved: dict, new: dict) -> dict[str, list[str]]:
  """The changed keys of two JSON configs by category: refused, warned, harmless, added."""
  a, b = flatten(saved), flatten(new)
  out = {"refused": [], "warned": [], "harmless": [], "added": []}
  for key in sorted(set(a) | set(b)):
    if key in a and key in b and a[key] == b[key]:
      continue
    if key not in a:  # an option newer than the run: its default keeps the old behaviour
      out["added"].append(f"{key} = {b[key]!r}")
      continue
    line = f"{key}: {a[key]!r} -> {b.get(key, '(removed)')!r}"
    if key == "optim.ema_decay":  # EMA on or off changes the state; its rate does not
      on_before, on_now = bool(a[key]), bool(b.get(key))
      out["refused" if on_before != on_now else "warned"].append(line)
    elif _matches(key, HARMLESS):
      out["harmless"].append(line)
    elif _matches(key, REFUSED):
      out["refused"].append(line)
    else:
      out["warned"].append(line)
  return out


def read_saved(workdir: str) -> dict | None:
  path = fs.join(workdir, "config.json")
  if not fs.exists(path):
    return None
  return json.loads(fs.read_text(path))


def check_resume(config, workdir: str, has_checkpoint: bool) -> None:
  """Refuses a config that does not continue `workdir`'s run; logs what it changes.

  Runs before anything is written. A workdir of the other stage is refused whether or not
  it has checkpoints; keys are compared only when there is a checkpoint to resume (a run
  that never saved one left nothing the new config could contradict).
  """
  saved = read_saved(workdir)
  if saved is None:
    return
  new = as_json(config)
  if is_ldm(saved) != is_ldm(new):
    raise WorkdirMismatch(
        f"{workdir} holds {stage_name(saved)} run, but this config trains "
        f"{stage_name(new)}: give this run its own --workdir")
  if not has_checkpoint:
    return
  changes = diff(saved, new)
  if changes["refused"]:
    listed = "\n  ".join(changes["refused"])
    raise WorkdirMismatch(
        f"{workdir} holds a run with another architecture, loss or data shape than this "
        f"config, so its checkpoint cannot be resumed with it. Changed:\n  {listed}\n"
        f"Train this config in a fresh workdir (another --workdir), or drop these "
        f"overrides to resume {workdir} (its settings are in {workdir}/config.json; "
        f"train.init_from can start a new run from its exported weights).")
  for line in changes["harmless"] + changes["added"]:
    logging.info("resume: %s", line)
  for line in changes["warned"]:
    logging.warning("resume with a changed setting (the run continues with it): %s", line)


def prepare(config, workdir: str):
  """The start of every run: `config` with absolute paths, checked against the workdir."""
  from ldm_jax.train.checkpoint import saved_steps
  config = absolute_paths(config)
  check_resume(config, workdir, has_checkpoint=bool(saved_steps(workdir)))
  return config


def write_config(config, workdir: str) -> None:
  """config.json of the run (process 0), atomically; a different previous one is kept as
  config.previous.json."""
  import jax
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2)
  path = fs.join(workdir, "config.json")
  if fs.exists(path):
    if fs.read_text(path) == text:
      return
    fs.copy(path, fs.join(workdir, "config.previous.json"))
  fs.replace_text(path, text)  # a config.json is there at every moment
