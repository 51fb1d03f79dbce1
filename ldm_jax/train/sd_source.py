"""The Stable Diffusion pipeline an SD fine-tune starts from (`pipeline.path`).

A run with `cond.kind="clip"` takes from one pipeline (a diffusers folder or an SD1 / SD2
single file, what `convert.load_pipeline` reads): the UNet's architecture and initial
weights, the VAE as the frozen first stage with the latent scale / shift it states, the
CLIP text encoder (frozen unless `cond.train_text_encoder`) with its tokenizer, and the
noise schedule and prediction type of its scheduler, which the config's `diffusion`
block must agree with (it states them so that a config read alone says what trains; a
mismatch is an error rather than a silent choice).

What the checkpoint needs the pipeline for: the architecture (UNet and text encoder
specs), the tokenizer and the VAE, as every LDM run needs its first stage. The trained
weights, the text encoder's included, are all in the checkpoint, so sampling or exporting
a run reads nothing else from the pipeline; if it moved, `--first_stage=PATH` (sample,
export, evaluate) gives its new place as for any LDM run.
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections

# The `pipeline` block of a config (configs/sd_finetune.py); the known-key check reads it.
DEFAULTS = dict(path="", tokenizer="", prediction_type="")
KEYS = frozenset(DEFAULTS)


def is_sd(config: ml_collections.ConfigDict) -> bool:
  return config.cond.kind == "clip"


def pipeline_path(config: ml_collections.ConfigDict) -> str:
  """Where the pipeline is. `first_stage.path` wins when set: it is what the commands'
  --first_stage flag replaces when the pipeline moved."""
  return str(config.first_stage.path or (config.get("pipeline") or {}).get("path", ""))


def load(config: ml_collections.ConfigDict):
  """The `ldm_jax.sd.Pipeline` of an SD run (loaded once per process and source)."""
  from ldm_jax import fs
  path = pipeline_path(config)
  if not path:
    raise ValueError("cond.kind='clip' fine-tunes a Stable Diffusion pipeline: set "
                     "pipeline.path to a diffusers pipeline folder or an SD1 / SD2 "
                     "single file")
  if not fs.exists(path):
    raise FileNotFoundError(f"the pipeline {path} (pipeline.path) does not exist: if it "
                            "moved, give its new place with --first_stage=PATH (sample, "
                            "export, evaluate) or --config.pipeline.path=PATH (training)")
  block = config.get("pipeline") or {}
  return _load(fs.absolute(path), str(block.get("tokenizer", "") or ""),
               str(block.get("prediction_type", "") or ""))


@functools.lru_cache(maxsize=1)
def _load(path: str, tokenizer: str, prediction_type: str):
  # One pipeline at a time: a real SD pipeline is GBs of host memory, and a process
  # (a training run, an export) uses one.
  from ldm_jax.convert.pipeline import load_pipeline
  return load_pipeline(path, tokenizer=tokenizer or None,
                       prediction_type=prediction_type or None)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with what an SD config leaves to its pipeline filled in from it: a
  `first_stage.downsample_factor` of 0 becomes the VAE's. The run saves the result as its
  config.json, so sampling, export and a resume read the pipeline's numbers as stated.
  (The latent scale and shift are the pipeline's VAE's whatever the config says, and the
  state keeps them.)"""
  if not is_sd(config) or int(config.first_stage.downsample_factor):
    return config
  resolved = config.copy_and_resolve_references()
  resolved.first_stage.downsample_factor = load(config).vae_factor
  return resolved


def text_spec(config: ml_collections.ConfigDict, pipe, unet_spec):
  """The text encoder as the run builds it: the pipeline's, at the UNet's compute dtype."""
  return dataclasses.replace(pipe.text_encoder.spec, dtype=unet_spec.dtype,
                             remat=unet_spec.remat)


def unet_spec(config: ml_collections.ConfigDict, pipe):
  """The pipeline's UNet with the run's compute choices (unet.dtype, unet.remat)."""
  return dataclasses.replace(pipe.unet.spec, dtype=str(config.unet.dtype),
                             remat=bool(config.unet.remat))


def check(config: ml_collections.ConfigDict, pipe) -> None:
  """The config against the pipeline: what the config states must be what it holds."""
  sched, diffusion = pipe.scheduler, config.diffusion
  from ldm_jax.sd import BETA_SCHEDULES
  stated = {"timesteps": (int(diffusion.timesteps), sched.num_train_timesteps),
            "beta_schedule": (diffusion.beta_schedule, BETA_SCHEDULES[sched.beta_schedule]),
            "linear_start": (float(diffusion.linear_start), float(sched.beta_start)),
            "linear_end": (float(diffusion.linear_end), float(sched.beta_end)),
            "parameterization": (diffusion.parameterization, sched.parameterization)}
  wrong = [f"diffusion.{k}={ours!r} but the pipeline's scheduler gives {theirs!r}"
           for k, (ours, theirs) in stated.items()
           if (abs(ours - theirs) > 1e-9 * abs(theirs) if isinstance(ours, float)
               else ours != theirs)]
  if wrong:
    raise ValueError("the pipeline's noise schedule is what its UNet was trained on: "
                     + "; ".join(wrong) + " (set them to the pipeline's, e.g. "
                     "configs/sd_finetune.py:sd2_v for a v-prediction pipeline)")
  if pipe.is_inpaint:
    raise ValueError(f"{pipeline_path(config)} is an inpainting pipeline ({pipe.variant}); "
                     "configs/sd_finetune.py fine-tunes text-to-image pipelines")
  factor, stated = pipe.vae_factor, int(config.first_stage.downsample_factor)
  if stated and stated != factor:  # 0 is the pipeline's (`resolve`)
    raise ValueError(f"first_stage.downsample_factor={stated} but the pipeline's VAE "
                     f"downsamples by {factor}: leave it at 0 to take the pipeline's, or "
                     f"give the pipeline this config is for")
  if config.first_stage.kind != "kl":
    raise ValueError("a Stable Diffusion pipeline's VAE is a KL autoencoder: set "
                     "first_stage.kind='kl'")
  if config.first_stage.scale_by_std:
    raise ValueError("the pipeline's VAE states its latent scale "
                     f"({pipe.latent_scale}), which its UNet was trained with: set "
                     "first_stage.scale_by_std=False")
  if config.cond.concat != "none":
    raise ValueError("cond.concat is not supported with cond.kind='clip'")


def initial_weights(model, pipe) -> None:
  """Copies the pipeline's UNet and text encoder weights into `model` (a LatentDiffusion
  with a "clip" conditioner), whatever their variable type there (frozen or trained)."""
  import jax
  from flax import nnx

  def copy(dst, src):
    ours = dict(nnx.to_flat_state(nnx.state(dst)))
    theirs = dict(nnx.to_flat_state(nnx.state(src)))
    if set(ours) != set(theirs):
      raise ValueError(f"the pipeline's weights do not fit the model: "
                       f"{sorted(set(ours) ^ set(theirs))[:5]}")
    for key, var in ours.items():
      # A copy: the train step donates the state's buffers, and the pipeline (cached
      # for the process) must keep its own.
      var[...] = jax.numpy.array(theirs[key][...], var[...].dtype, copy=True)

  copy(model.unet, pipe.unet)
  copy(model.cond.encoder, pipe.text_encoder)
