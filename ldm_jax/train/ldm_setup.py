"""What an LDM run is, from its config alone: the condition fields and their tokenizer.

Shared by the LDM trainer, the latent cache and the sampler, so each reads a config the
same way.
"""

from __future__ import annotations

import functools
import json

import ml_collections

from ldm_jax.data.conditions import ConditionSpec
from ldm_jax.data.spec import DataSpec
from ldm_jax.data.tokenizer import make_tokenizer
from ldm_jax.eval.setup import DEFAULTS as EVAL_DEFAULTS
from ldm_jax.models.conditioners import FIELDS as CONDITION_FIELDS
from ldm_jax.train import loop, sd_source
from ldm_jax.train.concat import ConcatSpec

FIELDS_BY_KIND = dict(CONDITION_FIELDS)


def tokenizer(config: ml_collections.ConfigDict):
  """The caption tokenizer of a text-conditioned config (None otherwise): a clip run's is
  its pipeline's CLIP tokenizer."""
  if config.cond.kind == "clip":
    return sd_source.load(config).tokenizer
  if config.cond.kind != "text":
    return None
  return make_tokenizer(str(config.cond.vocab_file), int(config.cond.max_length))


def uses_cached_context(config: ml_collections.ConfigDict) -> bool:
  """A frozen CLIP encoder with a latent cache: the cache holds the encoder's outputs
  ("context") and training reads them instead of running the encoder."""
  return (config.cond.kind == "clip" and bool(config.first_stage.cache_dir)
          and not config.cond.get("train_text_encoder", False))


def cond_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The condition fields a training batch carries for the step."""
  return ("context",) if uses_cached_context(config) else FIELDS_BY_KIND[config.cond.kind]


def condition_spec(config: ml_collections.ConfigDict) -> ConditionSpec:
  kind = config.cond.kind
  if kind not in FIELDS_BY_KIND:
    raise ValueError(f"cond.kind={kind!r} is not supported; choose one of "
                     f"{sorted(FIELDS_BY_KIND)}")
  return ConditionSpec(fields=FIELDS_BY_KIND[kind], label_key=config.cond.label_key,
                       caption_key=config.cond.caption_key, tokenizer=tokenizer(config))


KNOWN_KEYS = {
    "first_stage": {"path", "kind", "downsample_factor", "scale_factor", "shift_factor",
                    "latent_scaling", "scale_by_std", "shift_by_mean", "cache_dir"},
    "diffusion": {"timesteps", "beta_schedule", "linear_start", "linear_end", "cosine_s",
                  "parameterization", "loss_type", "learn_logvar", "logvar_init",
                  "l_simple_weight", "original_elbo_weight"},
    "cond": {"kind", "num_classes", "embed_dim", "dropout_prob", "vocab_file", "max_length",
             "text_width", "text_depth", "text_heads", "text_head_dim", "caption_key",
             "label_key", "concat", "low_res_factor", "full_mask_prob",
             "train_text_encoder"},  # clip only
    "pipeline": sd_source.KEYS,  # optional: SD fine-tunes (cond.kind="clip") only
    "optim": {"base_learning_rate", "scale_lr", "accumulate_grad_batches", "b1", "b2", "eps",
              "weight_decay", "warmup_steps", "grad_clip_norm", "ema_decay"},
    "sample": {"sampler", "steps", "eta", "guidance_scale", "num", "every"},
    "train": loop.TRAIN_KEYS,
    "eval": set(EVAL_DEFAULTS),  # optional: runs saved before it existed lack the block
}


def unet_spec(config: ml_collections.ConfigDict):
  """The UNet's architecture: the config's `unet` block, or a clip run's pipeline's UNet."""
  from ldm_jax.models.unet import UNetSpec
  if sd_source.is_sd(config):
    return sd_source.unet_spec(config, sd_source.load(config))
  return UNetSpec.from_config(config.unet)


def check_config(config: ml_collections.ConfigDict):
  """The UNet spec, after failing with a clear message on anything inconsistent."""
  from ldm_jax.diffusion.samplers import SAMPLERS
  config = sd_source.resolve(config)  # an SD config's first stage numbers: the pipeline's
  for block, known in KNOWN_KEYS.items():
    unknown = sorted(set((config.get(block) or {}).keys()) - known)
    if unknown:
      raise ValueError(f"unknown config keys {block}.{unknown}; valid: {sorted(known)}")
  cond = config.cond
  if (config.get("pipeline") or {}).get("path") and not sd_source.is_sd(config):
    raise ValueError("pipeline.path is the Stable Diffusion pipeline a cond.kind='clip' run "
                     f"fine-tunes; this config has cond.kind={cond.kind!r}")
  if cond.get("train_text_encoder", False):
    if not sd_source.is_sd(config):
      raise ValueError("cond.train_text_encoder applies to cond.kind='clip' (a 'text' "
                       "encoder always trains with the UNet)")
    if config.first_stage.cache_dir:
      raise ValueError("cond.train_text_encoder=True changes the text encoder's outputs "
                       "every step, which a latent cache cannot hold: drop "
                       "first_stage.cache_dir (or keep the encoder frozen)")
  if sd_source.is_sd(config):
    sd_source.check(config, sd_source.load(config))
  spec = unet_spec(config)
  data = DataSpec.from_config(config.data)  # its keys and values (batch_size >= 1, ...)
  condition_spec(config)  # checks cond.kind
  concat = ConcatSpec.from_config(cond)
  if concat.kind == "inpaint" and config.first_stage.cache_dir:
    raise ValueError("cond.concat='inpaint' encodes a freshly masked image every step, "
                     "which a latent cache cannot hold: drop first_stage.cache_dir")
  if concat.kind == "low_res" and data.image_size % concat.low_res_factor:
    raise ValueError(f"data.image_size={data.image_size} is not divisible by "
                     f"cond.low_res_factor={concat.low_res_factor}")
  if cond.kind == "class" and cond.num_classes < 2:
    raise ValueError("cond.kind='class' needs cond.num_classes >= 2 (the classes plus the "
                     "null class used for guidance)")
  width = {"class": cond.embed_dim, "text": cond.text_width}.get(cond.kind)
  if sd_source.is_sd(config):
    width = sd_source.load(config).text_encoder.spec.width
  if width is not None and spec.context_dim != width:
    raise ValueError(f"unet.context_dim={spec.context_dim} must equal the condition "
                     f"encoder's width {width} (cond.embed_dim / cond.text_width)")
  if cond.kind == "none" and spec.use_spatial_transformer:
    raise ValueError("a model without a class or text condition has no context for "
                     "cross-attention: set unet.use_spatial_transformer=False")
  if int(config.first_stage.downsample_factor) < 1:
    raise ValueError(f"first_stage.downsample_factor={config.first_stage.downsample_factor}: "
                     f"set it to the first stage's downsampling factor (8 for KL-f8)")
  check_image_size(config, spec, data.image_size, "data.image_size")
  if config.sample.sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler={config.sample.sampler!r}; choose one of {SAMPLERS}")
  if not 1 <= config.sample.steps <= config.diffusion.timesteps:
    raise ValueError(f"sample.steps={config.sample.steps} must be in [1, "
                     f"{config.diffusion.timesteps}]")
  loop.LoopSpec.from_config(config.train)
  if int(config.optim.get("accumulate_grad_batches", 1)) != 1:
    # The LDM step makes one update per batch; accepting the key would only scale the
    # learning rate (scale_lr) for an accumulation that never happens.
    raise ValueError(f"optim.accumulate_grad_batches={config.optim.accumulate_grad_batches}: "
                     "the LDM step does not accumulate gradients; use 1 and a larger "
                     "data.batch_size (or more devices) instead")
  first = config.first_stage
  if first.get("latent_scaling", "auto") not in ("auto", "config"):
    raise ValueError(f"first_stage.latent_scaling={first.latent_scaling!r}: 'auto' (from the "
                     "VAE's config.json when it states them) or 'config'")
  if first.get("shift_by_mean") and not first.scale_by_std:
    raise ValueError("first_stage.shift_by_mean estimates the shift with scale_by_std's "
                     "first batch: set first_stage.scale_by_std=True too")
  if not float(first.scale_factor) > 0:
    raise ValueError(f"first_stage.scale_factor={first.scale_factor} must be > 0")
  if not 0 <= config.cond.dropout_prob < 1:
    raise ValueError(f"cond.dropout_prob={config.cond.dropout_prob} must be in [0, 1)")
  if not (config.first_stage.path or config.first_stage.cache_dir
          or sd_source.is_sd(config)):
    raise ValueError("set first_stage.path to the autoencoder (an ldm_jax workdir or PyTorch "
                     "weights), or first_stage.cache_dir to a latent cache")
  return spec


def check_image_size(config: ml_collections.ConfigDict, spec, size: int, what: str) -> None:
  """Images of `size` must give latents the UNet can halve at each of its levels."""
  factor = int(config.first_stage.downsample_factor)
  latent, halvings = size // factor, len(spec.channel_mult) - 1
  multiple = factor * 2**halvings
  lower = size // multiple * multiple
  fix = f"use a multiple of {multiple} (e.g. {lower or multiple} or {lower + multiple})"
  if size % factor:
    raise ValueError(f"{what}={size} is not divisible by the first stage's downsampling "
                     f"factor {factor} (first_stage.downsample_factor), so the latents "
                     f"would not cover the image: {fix}")
  if latent % 2**halvings:
    raise ValueError(f"{what}={size} gives latents of {latent}x{latent}, which the UNet "
                     f"cannot halve {halvings} time{'s' if halvings > 1 else ''} "
                     f"(unet.channel_mult has {halvings + 1} levels): {fix}")


def build_model(config: ml_collections.ConfigDict, spec, seed: int):
  from flax import nnx

  from ldm_jax.models.conditioners import Conditioner, TextEncoderSpec
  from ldm_jax.models.ldm import LatentDiffusion
  rngs = nnx.Rngs(seed)
  cond = config.cond
  text, null_tokens, clip = None, None, None
  if cond.kind == "clip":  # sd_source.load ran before any tracing (abstract_model)
    pipe = sd_source.load(config)
    clip = sd_source.text_spec(config, pipe, spec)
    null_tokens = pipe.tokenizer([""])[0]
  if cond.kind == "text":
    tok = tokenizer(config)
    text = TextEncoderSpec(vocab_size=tok.vocab_size, max_length=int(cond.max_length),
                           width=int(cond.text_width), depth=int(cond.text_depth),
                           heads=int(cond.text_heads), head_dim=int(cond.text_head_dim),
                           dtype=spec.dtype, remat=spec.remat)
    null_tokens = tok([""])[0]
  conditioner = Conditioner(cond.kind, rngs=rngs, num_classes=int(cond.num_classes),
                            embed_dim=int(cond.embed_dim), text=text, null_tokens=null_tokens,
                            clip=clip,
                            train_text_encoder=bool(cond.get("train_text_encoder", False)))
  return LatentDiffusion(spec, conditioner, int(config.diffusion.timesteps),
                         learn_logvar=bool(config.diffusion.learn_logvar),
                         logvar_init=float(config.diffusion.logvar_init), rngs=rngs)


def abstract_model(config: ml_collections.ConfigDict, spec):
  """The model of `build_model` with shapes only. Tracing every layer's init takes seconds
  and a command needs it several times (programs, state, restore target), so it is traced
  once per architecture and process; each call gets its own copy."""
  from flax import nnx
  source = {}
  if sd_source.is_sd(config):
    sd_source.load(config)  # loaded (and cached) here, never inside the traced init
    source = {"first_stage": {"path": config.first_stage.path},
              "pipeline": config.get("pipeline", ml_collections.ConfigDict()).to_dict()}
  parts = _abstract_model_parts(spec, config.cond.to_json(sort_keys=True),
                                config.diffusion.to_json(sort_keys=True),
                                json.dumps(source, sort_keys=True))
  return nnx.merge(*parts, copy=True)


@functools.lru_cache(maxsize=8)
def _abstract_model_parts(spec, cond_json: str, diffusion_json: str, source_json: str = "{}"):
  # The key is all build_model reads: keep it in step when build_model reads more.
  from flax import nnx
  config = ml_collections.ConfigDict({"cond": json.loads(cond_json),
                                      "diffusion": json.loads(diffusion_json),
                                      **json.loads(source_json)})
  return nnx.split(nnx.eval_shape(lambda: build_model(config, spec, 0)))


def build_programs(config: ml_collections.ConfigDict, first_stage_def):
  """(spec, programs): everything static the step needs."""
  from flax import nnx

  from ldm_jax.diffusion.schedules import Schedule
  from ldm_jax.losses.diffusion import DiffusionLossConfig
  from ldm_jax.train.ldm_step import LDMPrograms, adamw
  from ldm_jax.train.optim import learning_rate
  spec = check_config(config)
  model_def = nnx.split(abstract_model(config, spec), nnx.Param, ...)[0]
  lr = learning_rate(config.optim, DataSpec.from_config(config.data).batch_size)
  programs = LDMPrograms(
      model_def=model_def, first_stage_def=first_stage_def, tx=adamw(config.optim, lr),
      schedule=Schedule.from_config(config.diffusion),
      loss=DiffusionLossConfig.from_config(config.diffusion),
      cond_fields=cond_fields(config),
      concat=ConcatSpec.from_config(config.cond),
      cond_dropout=float(config.cond.dropout_prob), ema_decay=float(config.optim.ema_decay))
  return spec, programs


def abstract_state(config, spec, programs):
  """The training state's shapes and dtypes: the target a checkpoint restores into."""
  import jax
  from flax import nnx

  from ldm_jax.train.ldm_step import new_state
  graphdef, params, rest = nnx.split(abstract_model(config, spec), nnx.Param, ...)
  return jax.eval_shape(lambda p, r: new_state(nnx.merge(graphdef, p, r), programs, 1.0, 0),
                        params, rest)
