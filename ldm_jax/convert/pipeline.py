"""Stable Diffusion 1.x / 2.x pipelines in and out: diffusers folders and single files.

`load_pipeline` reads either a diffusers pipeline folder (`model_index.json` + unet/, vae/,
text_encoder/, tokenizer/, scheduler/) or one SD checkpoint file, the CompVis layout
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.*`
(CLIP text: SD1's transformers names or SD2's open_clip names), into an
`ldm_jax.sd.Pipeline`. `save_pipeline` writes the two back: a folder that diffusers'
`StableDiffusionPipeline.from_pretrained` loads as is, or one .safetensors file.

A single file records the weights and little else, so part of a pipeline comes from the
release it looks like (the text layout says SD1 or SD2):
- the attention head split: SD1 8 heads per layer, SD2 64 channels per head;
- the prediction type: epsilon. SD2 at 768 px was trained on v, SD2-base (512 px) on
  epsilon, and the file does not say which: pass prediction_type="v" for SD2-768;
- the latent size: 96 (768 px) for an SD2 v-prediction file, else 64 (512 px);
- the latent scale 0.18215 (both releases), unless the file holds `scale_factor`;
- no tokenizer at all: pass tokenizer=PATH (a CLIP tokenizer folder).
A file written by `save_pipeline` keeps all of this in its metadata and reads back as
it was saved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from ldm_jax import fs, outputs
from ldm_jax.convert import keymaps
from ldm_jax.convert.autoencoder import (AutoencoderWeights, _with_options,
                                         autoencoder_from_weights, diffusers_config as
                                         vae_diffusers_config, infer_spec as infer_vae_spec,
                                         read_autoencoder_weights)
from ldm_jax.convert.files import (DIFFUSERS_WEIGHTS, WeightFileError, read_json_object,
                                   read_safetensors_metadata, read_tensors,
                                   write_diffusers_folder, write_safetensors)
from ldm_jax.convert.text_encoder import (SD1_PREFIX, SD2_PREFIX, detect_layout,
                                          load_text_encoder, to_open_clip, transformers_config)
from ldm_jax.convert.torch_layout import StateMismatchError, export_state, import_state
from ldm_jax.convert.unet import (diffusers_config as unet_diffusers_config, ema_weights,
                                  from_compvis, infer_unet_spec, spec_from_diffusers_config,
                                  to_compvis)
from ldm_jax.data.tokenizer import CLIPTokenizer
from ldm_jax.models.unet import UNetSpec, abstract_unet
from ldm_jax.sd import BETA_SCHEDULES, PREDICTION_TYPES, Pipeline, SchedulerConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
METADATA_KEY = "ldm_jax.sd_pipeline"
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline",
                    "StableDiffusionImg2ImgPipeline")
FORMATS = ("diffusers", "single_file")
SD_LATENT_SCALE = 0.18215
# The diffusers release whose folder layout save_pipeline writes (model_index.json needs a
# version: diffusers reads inpainting folders of <= 0.5.1 as a legacy pipeline).
_DIFFUSERS_VERSION = "0.27.0"
_SCHEDULER_FIELDS = tuple(f.name for f in dataclasses.fields(SchedulerConfig)
                          if f.name != "extra")
_DEFAULT_SCHEDULER_CLASS = "DDIMScheduler"
# Released SD heads: SD1 8 per layer at every width, SD2 a fixed 64 channels per head.
_SD1_HEADS = {"num_heads": 8, "num_head_channels": -1}
_SD2_HEADS = {"num_heads": -1, "num_head_channels": 64}
_START, _END = "<|startoftext|>", "<|endoftext|>"


class PipelineError(ValueError):
  """The source is not a Stable Diffusion 1.x / 2.x pipeline ldm_jax can read."""


# --- loading ------------------------------------------------------------------------------


def load_pipeline(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                  prediction_type: str | None = None, use_ema: bool = False,
                  dtype: str = "float32", sample_size: int | None = None,
                  num_heads: int | None = None, num_head_channels: int | None = None,
                  text_num_heads: int | None = None) -> Pipeline:
  """An SD 1.x / 2.x pipeline from a diffusers folder or a single .safetensors / .ckpt.

  tokenizer: a CLIP tokenizer folder (vocab.json + merges.txt); required for a single file,
    overrides a folder's tokenizer/.
  prediction_type: "eps"/"epsilon", "v"/"v_prediction" or "x0"/"sample"; None keeps a
    folder's scheduler, and means epsilon for a single file (pass "v" for SD2-768).
  use_ema: read a single file's `model_ema.*` UNet copy instead of the trained weights
    (the file must hold a complete one). diffusers' converter also defaults to the
    trained weights.
  dtype: compute dtype of the three modules (parameters stay float32).
  sample_size / num_heads / num_head_channels / text_num_heads: single files only, for
    checkpoints that are not the released SD1 / SD2 shapes (see the module docstring).
  """
  path = fs.path(path)
  if prediction_type is not None:
    prediction_type = _prediction_type(prediction_type)
  if path.is_dir():
    if use_ema:
      raise PipelineError(f"{path} is a diffusers folder, which holds one set of UNet "
                          "weights; use_ema=True reads a single file's model_ema.* copy")
    pipe = _load_folder(path, tokenizer, dtype)
  elif not path.exists():
    raise WeightFileError(f"no Stable Diffusion pipeline at {path} (neither a diffusers "
                          "folder nor a .safetensors / .ckpt file)")
  else:
    pipe = _load_single_file(path, tokenizer, use_ema, dtype, sample_size,
                             dict(num_heads=num_heads, num_head_channels=num_head_channels),
                             text_num_heads, prediction_type)
  if prediction_type is not None:
    pipe.scheduler = dataclasses.replace(pipe.scheduler, prediction_type=prediction_type)
  return pipe


def _prediction_type(name: str) -> str:
  """diffusers' name for a prediction type given in either vocabulary."""
  ours = {v: k for k, v in PREDICTION_TYPES.items()}
  if name in PREDICTION_TYPES:
    return name
  if name in ours:
    return ours[name]
  raise ValueError(f"prediction_type={name!r}; choose one of "
                   f"{sorted(ours)} (or diffusers' {sorted(PREDICTION_TYPES)})")


def _json(file: Path) -> dict:
  return read_json_object(file, PipelineError)


def _load_folder(path: Path, tokenizer, dtype: str) -> Pipeline:
  index_file = path / "model_index.json"
  if not index_file.is_file():
    raise PipelineError(
        f"{path} is a folder without model_index.json, so not a diffusers pipeline folder; "
        "for a single model use load_unet / load_autoencoder / load_text_encoder")
  index = _json(index_file)
  name = index.get("_class_name")
  if name not in PIPELINE_CLASSES:
    raise PipelineError(f"{index_file} names a {name!r}; ldm_jax reads Stable Diffusion 1.x "
                        f"/ 2.x pipelines ({', '.join(PIPELINE_CLASSES)})")
  needed = ("unet", "vae", "text_encoder", "scheduler") + (("tokenizer",) if tokenizer is None
                                                            else ())
  missing = [c for c in needed if not index.get(c) or index[c][0] is None
             or not (path / c).is_dir()]
  if missing:
    raise PipelineError(f"{path} lacks the pipeline components {', '.join(missing)} "
                        "(named in model_index.json with a folder of the same name)")
  unet_config = _json(path / "unet" / "config.json")
  try:
    unet_spec = spec_from_diffusers_config(unet_config)
  except ValueError as err:
    raise PipelineError(f"{path / 'unet'}: {err}") from err
  unet = _unet_from(dataclasses.replace(unet_spec, dtype=dtype),
                    read_tensors(_weights_file(path / "unet")), f"{path / 'unet'} (diffusers)")
  weights = read_autoencoder_weights(path / "vae")
  vae_spec = _with_options(infer_vae_spec(weights.model, weights.resolution), weights.options)
  vae = autoencoder_from_weights(weights, dataclasses.replace(vae_spec, dtype=dtype))
  text_spec, text = load_text_encoder(path / "text_encoder", dtype=dtype)
  tok = (_tokenizer(tokenizer) if tokenizer is not None
         else _folder_tokenizer(path / "tokenizer"))
  scheduler = scheduler_from_diffusers(_json(path / "scheduler" / "scheduler_config.json"),
                                       source=str(path / "scheduler"))
  stated = weights.normalization
  scale = SD_LATENT_SCALE if stated.scaling_factor is None else stated.scaling_factor
  # OpenCLIP's exact GELU is what tells an SD2 text tower from SD1's openai CLIP.
  release = "sd2" if text_spec.activation == "gelu" else "sd1"
  return Pipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=scheduler,
                  latent_scale=float(scale), latent_shift=float(stated.shift_factor or 0.0),
                  variant=_variant(release, unet_spec),
                  sample_size=int(unet_config.get("sample_size") or 64))


def _weights_file(folder: Path) -> Path:
  for name in (DIFFUSERS_WEIGHTS, "diffusion_pytorch_model.bin"):
    if (folder / name).is_file():
      return folder / name
  raise WeightFileError(f"{folder} has no {DIFFUSERS_WEIGHTS} (nor a .bin)")


def _unet_from(spec: UNetSpec, tensors: dict[str, np.ndarray], source: str):
  model = abstract_unet(spec)
  import_state(model, tensors, source,
               hint="Check that the UNet config describes the UNet that made these weights.")
  return model


def _variant(release: str, spec: UNetSpec) -> str:
  # Inpainting UNets take the latent, the mask and the masked image's latent: 4 + 1 + 4.
  return release + ("-inpaint" if spec.in_channels == 9 else "")


def scheduler_from_diffusers(config: dict, source: str = "scheduler") -> SchedulerConfig:
  """A scheduler_config.json (any SD scheduler class) as a SchedulerConfig: the fields that
  set the numbers; everything else, `_class_name` included, kept in `extra`."""
  values = {k: config[k] for k in _SCHEDULER_FIELDS if k in config}
  extra = tuple(sorted((k, _frozen(v)) for k, v in config.items()
                       if k not in _SCHEDULER_FIELDS and k != "_diffusers_version"))
  if config.get("trained_betas") is not None:
    raise PipelineError(f"{source}: trained_betas (an explicit beta list) is not supported")
  try:
    return SchedulerConfig(**values, extra=extra)
  except (TypeError, ValueError) as err:
    raise PipelineError(f"{source}: {err}") from err


def scheduler_to_diffusers(scheduler: SchedulerConfig) -> dict:
  """scheduler_config.json for `scheduler` (inverse of `scheduler_from_diffusers`)."""
  config = {"_class_name": _DEFAULT_SCHEDULER_CLASS, "_diffusers_version": _DIFFUSERS_VERSION}
  config.update({k: _thawed(v) for k, v in scheduler.extra})
  config.update({k: getattr(scheduler, k) for k in _SCHEDULER_FIELDS})
  return config


def scheduler_for_schedule(beta_schedule: str, timesteps: int, linear_start: float,
                           linear_end: float, cosine_s: float, parameterization: str) -> dict:
  """scheduler_config.json for an ldm_jax run's schedule (its `diffusion` block's values):
  a DDIMScheduler with CompVis's DDIM conventions (timesteps i * T/S + 1, the last step to
  alphas_cumprod[0], no clipping). A schedule diffusers has no name for goes in as its
  betas (`trained_betas`), so the numbers are the run's whatever the schedule."""
  from ldm_jax.diffusion.schedules import beta_schedule as make_betas
  prediction = {v: k for k, v in PREDICTION_TYPES.items()}
  config = {"_class_name": _DEFAULT_SCHEDULER_CLASS, "_diffusers_version": _DIFFUSERS_VERSION,
            "num_train_timesteps": int(timesteps), "beta_start": float(linear_start),
            "beta_end": float(linear_end), "prediction_type": prediction[parameterization],
            "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False,
            "clip_sample": False, "trained_betas": None}
  # ldm_jax's names -> diffusers': "linear" is linear in sqrt(beta) (diffusers'
  # "scaled_linear"), "sqrt_linear" linear in beta; the cosine schedule is diffusers'
  # squaredcos_cap_v2 only at its s = 0.008.
  named = {v: k for k, v in BETA_SCHEDULES.items()}
  if beta_schedule == "cosine" and abs(float(cosine_s) - 8e-3) < 1e-12:
    config["beta_schedule"] = "squaredcos_cap_v2"
  elif beta_schedule in named:
    config["beta_schedule"] = named[beta_schedule]
  else:
    config["beta_schedule"] = "linear"  # ignored by diffusers when trained_betas is set
    config["trained_betas"] = make_betas(beta_schedule, int(timesteps), float(linear_start),
                                         float(linear_end), float(cosine_s)).tolist()
  return config


def _frozen(value):
  """JSON lists as tuples: SchedulerConfig is frozen, so its fields should hash."""
  if isinstance(value, list):
    return tuple(_frozen(v) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
  return value


def _thawed(value):
  return [_thawed(v) for v in value] if isinstance(value, tuple) else value


# --- tokenizers --------------------------------------------------------------------------


def _tokenizer(path) -> CLIPTokenizer:
  path = fs.path(path)
  if not path.is_dir():
    raise PipelineError(f"tokenizer={path} is not a folder; pass a CLIP tokenizer folder "
                        "(vocab.json + merges.txt)")
  return _folder_tokenizer(path)


def _folder_tokenizer(folder: Path) -> CLIPTokenizer:
  """transformers 5 saves a CLIP tokenizer as tokenizer.json only; the released SD folders
  also hold vocab.json + merges.txt. The first is unpacked into the second for
  CLIPTokenizer, which reads its files when built, so the copy can go right after."""
  if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
    return CLIPTokenizer.from_folder(str(folder))
  if not (folder / "tokenizer.json").is_file():
    raise PipelineError(f"{folder} is not a CLIP tokenizer folder: it has neither "
                        "vocab.json + merges.txt nor tokenizer.json")
  model = _json(folder / "tokenizer.json").get("model") or {}
  if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
    raise PipelineError(f"{folder / 'tokenizer.json'} holds no BPE vocabulary; a CLIP "
                        "tokenizer is byte-level BPE")
  merges = [m.split() if isinstance(m, str) else m for m in model.get("merges", [])]
  with tempfile.TemporaryDirectory() as tmp:
    _write_tokenizer_files(Path(tmp), model["vocab"], merges)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
      if (folder / name).is_file():
        (Path(tmp) / name).write_text((folder / name).read_text())
    return CLIPTokenizer.from_folder(tmp)


def _write_tokenizer_files(folder: Path, vocab: dict[str, int], merges) -> None:
  (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (folder / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def write_tokenizer(tok: CLIPTokenizer, folder: Path) -> None:
  """A transformers CLIPTokenizer folder with what `tok` holds: its vocabulary, its merges
  in rank order, its special tokens and length."""
  folder.mkdir(parents=True)
  merges = sorted(tok.ranks, key=tok.ranks.get)
  _write_tokenizer_files(folder, tok.vocab, merges)
  special = {"bos_token": tok.decoder[tok.start_id], "eos_token": tok.decoder[tok.end_id],
             "unk_token": tok.decoder[tok.unk_id], "pad_token": tok.decoder[tok.pad_id]}
  (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
  config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": tok.max_length,
            "do_lower_case": True, "add_prefix_space": False, "errors": "replace"}
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --- single files ------------------------------------------------------------------------


def _prefixes(tensors: dict[str, np.ndarray]) -> str:
  """The key prefixes a file holds, with counts, for errors."""
  counts: dict[str, int] = {}
  for key in tensors:
    head = ".".join(key.split(".")[:2]) if "." in key else key
    counts[head] = counts.get(head, 0) + 1
  shown = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
  return ", ".join(f"{k}.* ({n})" for k, n in shown) or "(no tensors)"


def _split(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_single_file(path: Path, tokenizer, use_ema: bool, dtype: str,
                      sample_size: int | None, heads: dict, text_num_heads: int | None,
                      prediction_type: str | None) -> Pipeline:
  everything = read_tensors(path)  # once: SD files are 2-7 GB
  stored = (read_safetensors_metadata(path).get(METADATA_KEY)
            if path.suffix == ".safetensors" else None)
  meta = json.loads(stored) if stored else {}
  if any(k.startswith("conditioner.embedders.") for k in everything):
    raise PipelineError(f"{path} is an SDXL checkpoint (conditioner.embedders.*); ldm_jax "
                        "reads SD 1.x / 2.x single files")
  unet_tensors = _split(everything, UNET_PREFIX)
  # A training checkpoint may keep the VAE's loss (LPIPS, discriminator) beside it.
  vae_tensors = {k: v for k, v in _split(everything, VAE_PREFIX).items()
                 if not k.startswith("loss.")}
  text_tensors = {k: v for k, v in everything.items() if k.startswith(TEXT_PREFIX)}
  missing = [name for name, part in (("UNet (model.diffusion_model.*)", unet_tensors),
                                     ("VAE (first_stage_model.*)", vae_tensors),
                                     ("text encoder (cond_stage_model.*)", text_tensors))
             if not part]
  if missing:
    raise PipelineError(f"{path} is not a Stable Diffusion 1.x / 2.x single file: it has no "
                        f"{' and no '.join(missing)}; it holds {_prefixes(everything)}")
  try:
    layout, _ = detect_layout(text_tensors)
  except StateMismatchError as err:
    raise PipelineError(
        f"{path} is neither SD1 nor SD2: its cond_stage_model.* is neither SD1's "
        f"{SD1_PREFIX}text_model.* (CLIP) nor SD2's {SD2_PREFIX}transformer.resblocks.* "
        f"(OpenCLIP); it holds {_prefixes(text_tensors)}") from err
  release = "sd1" if layout == "transformers" else "sd2"
  if tokenizer is None:
    source = ("openai/clip-vit-large-patch14" if release == "sd1"
              else "an SD2 diffusers pipeline's tokenizer/")
    raise PipelineError(f"{path} is a single file, which holds no tokenizer: pass "
                        "tokenizer=PATH to a CLIP tokenizer folder (vocab.json + merges.txt; "
                        f"for this {release.upper()} file, {source})")
  tok = _tokenizer(tokenizer)

  # UNet: architecture from the keys and shapes; the head split from the release.
  if "unet" in meta:
    unet_spec = UNetSpec.from_config(meta["unet"])
  else:
    given = {k: v for k, v in heads.items() if v is not None}
    split = ({"num_heads": -1, "num_head_channels": -1, **given} if given
             else _SD1_HEADS if release == "sd1" else _SD2_HEADS)
    try:
      unet_spec = infer_unet_spec(unet_tensors, **split)
    except (StateMismatchError, ValueError) as err:
      raise PipelineError(f"{path}: cannot read its UNet as {release.upper()}'s: {err}; "
                          "pass num_heads= or num_head_channels=") from err
  unet_spec = dataclasses.replace(unet_spec, dtype=dtype)
  compvis = ema_weights(everything, unet_spec) if use_ema else unet_tensors
  unet = _unet_from(unet_spec, from_compvis(compvis, unet_spec),
                    f"{path} ({'model_ema' if use_ema else UNET_PREFIX + '*'})")

  text_options = meta.get("text", {})
  try:
    text_spec, text = load_text_encoder(
        text_tensors, dtype=dtype, num_heads=text_num_heads or text_options.get("heads"),
        activation=text_options.get("activation"),
        output_layer=text_options.get("output_layer"))
  except StateMismatchError:
    raise
  except ValueError as err:  # the head split: SD's towers use 64 channels per head
    raise PipelineError(f"{path}: {err} (here: text_num_heads=)") from err
  if unet_spec.context_dim != text_spec.width:
    raise PipelineError(f"{path}: the UNet cross-attends to {unet_spec.context_dim} "
                        f"channels but the text encoder is {text_spec.width} wide")

  if "scheduler" in meta:
    scheduler = scheduler_from_diffusers(meta["scheduler"], source=f"{path} metadata")
  else:
    scheduler = SchedulerConfig(prediction_type=prediction_type or "epsilon")
  if sample_size is None:
    sample_size = meta.get("sample_size") or (
        96 if release == "sd2" and scheduler.prediction_type == "v_prediction" else 64)
  vae_spec = infer_vae_spec(vae_tensors, meta.get("vae_resolution") or 8 * sample_size)
  weights = AutoencoderWeights(vae_tensors, {}, keymaps.detect_layout(vae_tensors),
                               f"{path} ({VAE_PREFIX}*)")
  if weights.layout == "diffusers":
    weights.model = keymaps.diffusers_to_compvis(vae_tensors)
  vae = autoencoder_from_weights(weights, dataclasses.replace(vae_spec, dtype=dtype))
  scale, shift = (_scalar(everything, "scale_factor", SD_LATENT_SCALE),
                  _scalar(everything, "shift_factor", 0.0))
  return Pipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=scheduler,
                  latent_scale=scale, latent_shift=shift,
                  variant=meta.get("variant") or _variant(release, unet_spec),
                  sample_size=int(sample_size))


def _scalar(tensors: dict[str, np.ndarray], key: str, default: float) -> float:
  """A file's scalar buffer (LDM checkpoints store scale_factor with shape [] or [1])."""
  return float(np.asarray(tensors[key]).reshape(-1)[0]) if key in tensors else default


# --- saving ------------------------------------------------------------------------------


def save_pipeline(pipeline: Pipeline, out: str | os.PathLike, *, format: str = "diffusers",
                  overwrite: bool = False) -> None:
  """format="diffusers": a folder for `StableDiffusionPipeline.from_pretrained(out)` (or
  the inpainting pipeline for an "-inpaint" variant), without safety checker.
  "single_file": one .safetensors in the SD checkpoint layout (SD1 or SD2 text names by
  `pipeline.variant`), ldm_jax's description of the pipeline in its metadata.

  Written atomically (a temporary, then renamed); a previous export at `out` is replaced,
  anything else refused unless `overwrite` (ldm_jax.outputs).
  """
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  if format == "single_file" and Path(out).suffix != ".safetensors":
    raise ValueError(f"a single-file export is one .safetensors file; got {out}")
  # No pipeline kind exists in ldm_jax.outputs: an SD pipeline is an LDM (UNet + VAE +
  # condition encoder), the kind train.export writes in the same two shapes.
  outputs.check_target(out, outputs.LDM, overwrite=overwrite)  # before the work
  if format == "diffusers":
    _save_folder(pipeline, out, overwrite)
  else:
    tensors, metadata = single_file_tensors(pipeline)
    write_safetensors(tensors, out, metadata, kind=outputs.LDM, overwrite=overwrite)


def _save_folder(pipe: Pipeline, out, overwrite: bool) -> None:
  from safetensors.numpy import save_file
  inpaint = pipe.variant.endswith("-inpaint")
  scheduler = scheduler_to_diffusers(pipe.scheduler)
  index = {"_class_name": PIPELINE_CLASSES[1] if inpaint else PIPELINE_CLASSES[0],
           "_diffusers_version": _DIFFUSERS_VERSION,
           "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
           "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"],
           "scheduler": ["diffusers", scheduler["_class_name"]],
           "safety_checker": [None, None], "feature_extractor": [None, None],
           "image_encoder": [None, None], "requires_safety_checker": False}
  # The SD pipelines read text_encoder(ids)[0] as the context: a CLIPTextModel's
  # last_hidden_state. A projection (SD2 single files carry OpenCLIP's) would make it a
  # CLIPTextModelWithProjection, whose [0] is the projected embedding, so it is left out.
  text_spec = dataclasses.replace(pipe.text_encoder.spec, projection_dim=0)
  text = {k: v for k, v in export_state(pipe.text_encoder).items()
          if k != "text_projection.weight"}
  shift = {"shift_factor": pipe.latent_shift} if pipe.latent_shift else {}
  with outputs.atomic_path(out, outputs.LDM, overwrite=overwrite) as tmp:
    tmp.mkdir()
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_diffusers_folder(export_state(pipe.unet),
                           unet_diffusers_config(pipe.unet.spec, pipe.sample_size),
                           tmp / "unet", kind=outputs.UNET)
    vae_config = vae_diffusers_config(pipe.vae.spec, pipe.latent_scale, **shift)
    if vae_config["_class_name"] != "AutoencoderKL":
      raise ValueError("a Stable Diffusion pipeline's VAE is an AutoencoderKL; this one is "
                       f"a {vae_config['_class_name']}")
    write_diffusers_folder(keymaps.compvis_to_diffusers(export_state(pipe.vae)), vae_config,
                           tmp / "vae", kind=outputs.AUTOENCODER)
    (tmp / "text_encoder").mkdir()
    # transformers refuses safetensors files without format=pt metadata.
    save_file({k: np.ascontiguousarray(v) for k, v in text.items()},
              str(tmp / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "text_encoder" / "config.json").write_text(
        json.dumps(transformers_config(text_spec), indent=2) + "\n")
    write_tokenizer(pipe.tokenizer, tmp / "tokenizer")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler, indent=2) + "\n")


def single_file_tensors(pipe: Pipeline) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of the SD checkpoint layout for `pipe` (save_pipeline's
  "single_file"): what `load_pipeline` reads back as `pipe`."""
  sd2 = pipe.variant.startswith("sd2")
  tensors = {UNET_PREFIX + k: v
             for k, v in to_compvis(export_state(pipe.unet), pipe.unet.spec).items()}
  tensors.update({VAE_PREFIX + k: v for k, v in export_state(pipe.vae).items()})
  text_spec = pipe.text_encoder.spec
  text = export_state(pipe.text_encoder)
  # SD2 reads the penultimate layer of its 24: an SD2 file holds one block more than is
  # run, and a reader drops it. The encoder here holds only the blocks it runs (diffusers'
  # SD2 text_encoder/ is already cut), so a zero block is appended: a residual block
  # with zero weights is the identity, and no reader runs it anyway.
  output_layer = "penultimate" if sd2 else text_spec.output_layer
  if output_layer == "penultimate":
    last = text_spec.computed_depth - 1
    pattern = re.compile(rf"text_model\.encoder\.layers\.{last}\.(.*)")
    for key in list(text):
      if m := pattern.match(key):
        text[f"text_model.encoder.layers.{last + 1}.{m[1]}"] = np.zeros_like(text[key])
  if sd2:
    tensors.update({SD2_PREFIX + k: v for k, v in to_open_clip(text).items()})
  else:
    tensors.update({SD1_PREFIX + k: v for k, v in text.items()})
  tensors["scale_factor"] = np.asarray(pipe.latent_scale, np.float32)
  if pipe.latent_shift:
    tensors["shift_factor"] = np.asarray(pipe.latent_shift, np.float32)
  unet_spec = dataclasses.asdict(pipe.unet.spec)
  unet_spec.pop("dtype"), unet_spec.pop("remat")  # run-time choices, not architecture
  meta = {"variant": pipe.variant, "unet": unet_spec, "sample_size": pipe.sample_size,
          "vae_resolution": pipe.vae.spec.resolution,
          "text": {"heads": text_spec.heads, "activation": text_spec.activation,
                   "output_layer": output_layer},
          "scheduler": scheduler_to_diffusers(pipe.scheduler)}
  return tensors, {METADATA_KEY: json.dumps(meta)}


__all__ = ["load_pipeline", "save_pipeline", "single_file_tensors", "scheduler_from_diffusers",
           "scheduler_to_diffusers", "write_tokenizer", "PipelineError"]
