"""Import and export of first-stage autoencoders in the CompVis and diffusers layouts."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ldm_jax import fs, outputs
from ldm_jax.convert import keymaps
from ldm_jax.convert.files import (DIFFUSERS_WEIGHTS, WeightFileError, read_json_object,
                                   read_safetensors_metadata, read_tensors, strip_nesting,
                                   write_diffusers_folder, write_safetensors)
from ldm_jax.convert.torch_layout import (StateMismatchError, export_state, import_state,
                                          torch_leaves)
from ldm_jax.models.autoencoder import (AutoencoderSpec, LatentNormalization,
                                        abstract_autoencoder, build_autoencoder)

SPEC_METADATA_KEY = "ldm_jax.autoencoder_spec"
# A CompVis file has no place for the latent fields; ldm_jax keeps them in its metadata.
NORMALIZATION_METADATA_KEY = "ldm_jax.latent_normalization"
_DIFFUSERS_DEFAULT_SCALING = 0.18215
# diffusers config.json fields that name a spec option: diffusers name -> AutoencoderSpec field.
_DIFFUSERS_OPTIONS = {"use_quant_conv": "use_quant_conv",
                      "use_post_quant_conv": "use_post_quant_conv",
                      "mid_block_add_attention": "mid_block_attention"}
# config.json fields that describe the latent, not the network: kept when read so that an
# export can write them back (SD3 and FLUX.1 shift their latents as well as scale them).
_DIFFUSERS_LATENT_FIELDS = tuple(f.name for f in dataclasses.fields(LatentNormalization))


@dataclasses.dataclass
class AutoencoderWeights:
  """A source's tensors in the CompVis layout, split into the model and the training loss."""

  model: dict[str, np.ndarray]
  loss: dict[str, np.ndarray]  # `loss.*` of training checkpoints, prefix removed
  layout: str
  source: str
  resolution: int | None = None  # sample size when the source says it
  spec: AutoencoderSpec | None = None  # when the source carries ldm_jax's spec
  # A diffusers folder's config.json: spec options (`_DIFFUSERS_OPTIONS`, by spec field
  # name). The latent fields come from there too, or from ldm_jax's CompVis metadata.
  options: dict[str, bool] = dataclasses.field(default_factory=dict)
  normalization: LatentNormalization = LatentNormalization()


def read_autoencoder_weights(path: str | os.PathLike) -> AutoencoderWeights:
  """Reads any accepted source: a diffusers folder, a .safetensors or a torch checkpoint,
  local or gs:// (ldm_jax.fs)."""
  path = fs.path(path)
  resolution, spec, options, normalization = None, None, {}, LatentNormalization()
  if path.is_dir():
    folder = _diffusers_folder(path)
    weights_file = folder / DIFFUSERS_WEIGHTS
    if not weights_file.is_file():
      raise WeightFileError(f"{path} is a folder without {DIFFUSERS_WEIGHTS} (nor vae/"
                            f"{DIFFUSERS_WEIGHTS}); pass a diffusers model folder or a file")
    config = _read_diffusers_config(folder)
    _check_diffusers_class(folder, config)  # before reading tensors of another model
    tensors = read_tensors(weights_file)
    resolution = config.get("sample_size")
    options = {field: bool(config[name]) for name, field in _DIFFUSERS_OPTIONS.items()
               if name in config}
    if "norm_num_groups" in config:  # not visible in the tensors' shapes
      options["norm_num_groups"] = int(config["norm_num_groups"])
    normalization = LatentNormalization.from_config(config)
  elif not path.exists():
    raise WeightFileError(f"no weights at {path}")
  else:
    tensors = read_tensors(path)
    if path.suffix == ".safetensors":
      metadata = read_safetensors_metadata(path)
      stored = metadata.get(SPEC_METADATA_KEY)
      spec = AutoencoderSpec.from_config(json.loads(stored)) if stored else None
      if stated := metadata.get(NORMALIZATION_METADATA_KEY):
        normalization = LatentNormalization.from_config(json.loads(stated))
  tensors = strip_nesting(tensors, "first_stage_model.")
  loss = {k[len("loss."):]: v for k, v in tensors.items() if k.startswith("loss.")}
  model = {k: v for k, v in tensors.items() if not k.startswith("loss.")}
  layout = keymaps.detect_layout(model)
  if layout == "diffusers":
    model = keymaps.diffusers_to_compvis(model)
  return AutoencoderWeights(model, loss, layout, str(path),
                            resolution if isinstance(resolution, int) else None, spec,
                            options, normalization)


def _diffusers_folder(path):
  """The model folder of a diffusers model or pipeline folder (its vae/)."""
  return path / "vae" if (path / "vae" / DIFFUSERS_WEIGHTS).is_file() else path


# diffusers model classes whose weights are a first stage's encoder and decoder.
_AUTOENCODER_CLASSES = ("AutoencoderKL", "VQModel")


def _check_diffusers_class(folder, config: dict) -> None:
  """A diffusers folder of another model (a UNet, a text encoder) fails here by its name,
  rather than later on its tensor names."""
  name = config.get("_class_name")
  if name and name not in _AUTOENCODER_CLASSES and not name.startswith("Autoencoder"):
    raise WeightFileError(
        f"{folder} holds a diffusers {name} (its config.json's _class_name), not an "
        f"autoencoder: give an {' or '.join(_AUTOENCODER_CLASSES)} folder (a pipeline's "
        f"vae/ folder, or the pipeline folder itself) or a CompVis first-stage checkpoint")


def _read_diffusers_config(folder) -> dict:
  config_file = folder / "config.json"
  return read_json_object(config_file) if config_file.is_file() else {}


def diffusers_latent_scaling(path: str | os.PathLike) -> dict[str, Any] | None:
  """The latent fields (`LatentNormalization`: `scaling_factor`, `shift_factor`,
  `latents_mean`, `latents_std`, `force_upcast`) of a diffusers model or pipeline folder's
  config.json, only those it states; None for any other source.

  The result is keyword arguments for `save_autoencoder`, so a re-export (after
  fine-tuning, say) keeps the latent normalization the folder came with:
  `save_autoencoder(model, out, **(diffusers_latent_scaling(src) or {}))`.
  """
  path = fs.path(path)
  if not path.is_dir():
    return None
  config = _read_diffusers_config(_diffusers_folder(path))
  found = {name: config[name] for name in _DIFFUSERS_LATENT_FIELDS if name in config}
  return found or None


def infer_spec(tensors: dict[str, np.ndarray], resolution: int | None = None) -> AutoencoderSpec:
  """The architecture implied by CompVis-layout tensor names and shapes."""
  def shape(key):
    if key not in tensors:
      raise StateMismatchError(f"cannot infer the architecture: {key} is missing")
    return tensors[key].shape

  resolution = resolution or 256
  levels = keymaps.num_levels(tensors, "compvis")
  ch = shape("encoder.conv_in.weight")[0]
  blocks = {int(m[1]) for k in tensors if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
  ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
  attn_levels = [i for i in range(levels)
                 if any(k.startswith(f"encoder.down.{i}.attn.") for k in tensors)]
  has_mid_attn = any(k.startswith("encoder.mid.attn_1.") for k in tensors)
  kind = "vq" if "quantize.embedding.weight" in tensors else "kl"
  z_channels = shape("decoder.conv_in.weight")[1]
  # SD3 / FLUX.1 VAEs have no quant convs: the latent is then the encoder's output.
  use_quant_conv = "quant_conv.weight" in tensors
  use_post_quant_conv = "post_quant_conv.weight" in tensors
  if use_post_quant_conv:
    embed_dim = shape("post_quant_conv.weight")[1]
  elif use_quant_conv:  # a KL quant conv gives mean and logvar: 2 * embed_dim outputs
    embed_dim = shape("quant_conv.weight")[0] // (2 if kind == "kl" else 1)
  else:
    embed_dim = z_channels
  values: dict[str, Any] = dict(
      kind=kind, resolution=resolution, ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks),
      in_channels=shape("encoder.conv_in.weight")[1],
      out_ch=shape("decoder.conv_out.weight")[0],
      attn_resolutions=tuple(resolution // 2**i for i in attn_levels),
      attn_type="vanilla" if has_mid_attn or attn_levels else "none",
      # With no attention at all attn_type="none" says it; mid_block_attention keeps its
      # default then, so equal architectures get equal specs.
      mid_block_attention=has_mid_attn or not attn_levels,
      z_channels=z_channels, embed_dim=embed_dim, use_quant_conv=use_quant_conv,
      use_post_quant_conv=use_post_quant_conv)
  if kind == "vq":
    values["n_embed"] = shape("quantize.embedding.weight")[0]
    if "quantize.used" in tensors:
      values["remap"] = tuple(int(i) for i in tensors["quantize.used"])
  return AutoencoderSpec(**values)


def spec_from(config: Any) -> AutoencoderSpec:
  """Accepts an AutoencoderSpec, a full config (with `.model`) or its model block."""
  if isinstance(config, AutoencoderSpec):
    return config
  model = config.get("model", config) if hasattr(config, "get") else config
  return AutoencoderSpec.from_config(model)


def load_autoencoder(path: str | os.PathLike, config: Any = None):
  """An AutoencoderKL or VQModel with the weights at `path`.

  `path`: a diffusers folder (config.json + diffusion_pytorch_model.safetensors, or a
  pipeline folder with vae/), a CompVis or diffusers-layout .safetensors, or a .ckpt/.pt
  (read with torch.load(weights_only=True)); keys may be bare, under `first_stage_model.`
  (LDM checkpoints) or nested under `state_dict` (Lightning). `config` (a config, its
  `model` block or an AutoencoderSpec) may be omitted: the architecture is then read from
  the weights. Nothing is loaded unless every tensor fits.
  """
  return autoencoder_from_weights(read_autoencoder_weights(path), config)


def autoencoder_from_weights(weights: AutoencoderWeights, config: Any = None):
  """`load_autoencoder` on weights already read, so that a caller that also wants the
  training loss's tensors (the discriminator) reads a multi-GB checkpoint once."""
  if config is not None:
    spec = spec_from(config)
  elif weights.spec is not None:
    spec = weights.spec
  else:
    spec = _with_options(infer_spec(weights.model, weights.resolution), weights.options)
  model = abstract_autoencoder(spec)
  import_state(model, weights.model, f"{weights.source} ({weights.layout} layout)",
               hint=_describe_weights(weights))
  model.latent_normalization = weights.normalization
  return model


# A CompVis / taming training checkpoint keeps its PatchGAN under `loss.discriminator.`
# (`AutoencoderWeights.loss` has the `loss.` already removed).
_DISCRIMINATOR_PREFIX = "discriminator."


def discriminator_tensors(weights: AutoencoderWeights) -> dict[str, np.ndarray]:
  """The training checkpoint's discriminator in the torch layout (`main.N.weight`, ...);
  empty for sources without one (diffusers folders, exported weights)."""
  n = len(_DISCRIMINATOR_PREFIX)
  return {k[n:]: v for k, v in weights.loss.items() if k.startswith(_DISCRIMINATOR_PREFIX)}


def infer_discriminator(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
  """The loss-config values (`disc_in_channels`, `disc_ndf`, `disc_num_layers`,
  `use_actnorm`) that a torch-layout NLayerDiscriminator state dict was built with."""
  convs = sorted(int(m[1]) for k, v in tensors.items()
                 if (m := re.fullmatch(r"main\.(\d+)\.weight", k)) and np.ndim(v) == 4)
  if not convs or convs[0] != 0:
    raise StateMismatchError("not an NLayerDiscriminator: no main.0.weight conv")
  first = tensors["main.0.weight"].shape  # (ndf, in_channels, 4, 4)
  return dict(disc_in_channels=int(first[1]), disc_ndf=int(first[0]),
              # the input conv, n_layers - 1 strided ones, one stride-1 one, the output conv
              disc_num_layers=len(convs) - 2,
              use_actnorm=any(k.endswith(".loc") for k in tensors))


def load_discriminator(disc, tensors: dict[str, np.ndarray], source: str,
                       config_values: dict[str, Any] | None = None) -> None:
  """Loads torch-layout discriminator tensors into `disc` in place, all or nothing.

  A mismatch names the loss-config values the file was trained with next to
  `config_values` (the run's), since the tensor names alone do not say which to change.
  """
  hint = ""
  try:
    found = infer_discriminator(tensors)
  except StateMismatchError:
    found = None
  if found is not None:
    mismatched = {k: (v, (config_values or {}).get(k)) for k, v in found.items()
                  if config_values and k in config_values and config_values[k] != v}
    hint = ("The file's discriminator was built with "
            + " ".join(f"loss.{k}={v}" for k, v in found.items()))
    if mismatched:
      hint += ("; this config has " + " ".join(f"loss.{k}={ours}" for k, (_, ours)
                                                in mismatched.items()))
    hint += "."
  import_state(disc, tensors, f"{source} (loss.discriminator.*)", hint=hint)


def _with_options(spec: AutoencoderSpec, options: dict[str, bool]) -> AutoencoderSpec:
  """`spec` with the options a config.json states. They agree with the tensor names in any
  folder diffusers wrote; where they do not, the load fails naming the tensors."""
  options = dict(options)
  if spec.attn_type == "none":  # no attention anywhere: mid_block_attention is moot
    options.pop("mid_block_attention", None)
  if not options:
    return spec
  try:
    return dataclasses.replace(spec, **options)
  except ValueError as err:
    raise StateMismatchError(f"the config.json options {options} do not fit the weights: "
                             f"{err}") from err


def _describe_weights(weights: AutoencoderWeights) -> str:
  try:
    found = infer_spec(weights.model, weights.resolution)
  except (StateMismatchError, ValueError):
    return ""
  return ("Check that the config describes the same architecture as the weights. "
          f"The weights look like: kind={found.kind} ch={found.ch} ch_mult={found.ch_mult} "
          f"num_res_blocks={found.num_res_blocks} attn_resolutions={found.attn_resolutions} "
          f"(at resolution {found.resolution}) z_channels={found.z_channels} "
          f"embed_dim={found.embed_dim} use_quant_conv={found.use_quant_conv} "
          f"use_post_quant_conv={found.use_post_quant_conv} "
          f"mid_block_attention={found.mid_block_attention}"
          + (f" n_embed={found.n_embed}" if found.kind == "vq" else ""))


EXPORT_DTYPES = {"float32": np.float32, "float16": np.float16,
                 "bfloat16": ml_dtypes.bfloat16}  # safetensors writes it as BF16


def save_autoencoder(model, path: str | os.PathLike, format: str = "diffusers",
                     normalization: LatentNormalization | None = None, *,
                     overwrite: bool = False, dtype: str = "float32", **fields) -> None:
  """Writes `model` for PyTorch users, atomically.

  format="compvis": one .safetensors file with CompVis keys (ldm_jax's spec and the
  stated latent fields in its metadata). format="diffusers": a folder loadable with
  `AutoencoderKL.from_pretrained` (or `VQModel.from_pretrained`) whose config.json holds
  the latent fields, diffusers' defaults for those not stated (scaling_factor 0.18215).
  The latent fields are `normalization`'s, by default the model's (what its source
  stated); `fields` (scaling_factor=, shift_factor=, latents_mean=, latents_std=,
  force_upcast=) replace single ones. `dtype` ("float32", "float16" or "bfloat16") is
  the floating-point tensors' type on disk (half the size in 16 bits; loading casts back
  to float32). A previous autoencoder export at `path` is replaced; anything else there is
  refused unless `overwrite` (see ldm_jax.outputs).
  """
  spec: AutoencoderSpec = model.spec
  normalization = _normalization(model, normalization, fields)
  if format not in ("compvis", "diffusers"):
    raise ValueError(f"format must be 'diffusers' or 'compvis', got {format!r}")
  if format == "compvis" and Path(path).suffix != ".safetensors":
    raise ValueError(f"a CompVis export is one .safetensors file; got {path}")
  if format == "compvis" and (problem := compvis_unsupported(spec)):
    raise ValueError(problem)
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
  outputs.check_target(path, outputs.AUTOENCODER, overwrite=overwrite)  # before the work
  tensors = {name: value.astype(EXPORT_DTYPES[dtype]) if value.dtype.kind == "f" else value
             for name, value in export_state(model).items()}
  if format == "compvis":
    metadata = {SPEC_METADATA_KEY: json.dumps(_spec_json(spec))}
    if stated := normalization.stated():
      metadata[NORMALIZATION_METADATA_KEY] = json.dumps(stated)
    write_safetensors(tensors, path, metadata, kind=outputs.AUTOENCODER, overwrite=overwrite)
  else:
    config = diffusers_config(spec, **normalization.stated())
    write_diffusers_folder(keymaps.compvis_to_diffusers(tensors), config, path,
                           kind=outputs.AUTOENCODER, overwrite=overwrite)


def _normalization(model, normalization: LatentNormalization | None,
                   fields: dict) -> LatentNormalization:
  """`normalization` (default the model's) with `fields` replaced."""
  if normalization is None:
    normalization = getattr(model, "latent_normalization", None) or LatentNormalization()
  unknown = sorted(set(fields) - set(_DIFFUSERS_LATENT_FIELDS))
  if unknown:
    raise TypeError(f"save_autoencoder got unknown arguments {unknown}; the latent fields "
                    f"are {', '.join(_DIFFUSERS_LATENT_FIELDS)}")
  return dataclasses.replace(normalization, **fields)


def compvis_unsupported(spec: AutoencoderSpec) -> str | None:
  """Why CompVis code could not build `spec`, or None. Its Normalize is GroupNorm(32)
  always, so a model with other groups loads only where a config says so (diffusers)."""
  if spec.norm_num_groups != 32:
    return (f"this autoencoder has norm_num_groups={spec.norm_num_groups}, and CompVis code "
            "always builds GroupNorm(32): export it with format='diffusers' (whose config.json "
            "records norm_num_groups) instead of 'compvis'")
  return None


def _spec_json(spec: AutoencoderSpec) -> dict:
  values = dataclasses.asdict(spec)
  values["remap"] = list(values["remap"]) if values["remap"] is not None else None
  values.pop("dtype"), values.pop("remat")  # run-time choices, not architecture
  return values


def diffusers_config(spec: AutoencoderSpec, scaling_factor: float = _DIFFUSERS_DEFAULT_SCALING,
                     shift_factor: float | None = None, *,
                     force_upcast: bool | None = None,
                     latents_mean: tuple[float, ...] | None = None,
                     latents_std: tuple[float, ...] | None = None) -> dict:
  """config.json for diffusers' AutoencoderKL / VQModel describing `spec`.

  `shift_factor` (latents = (z - shift) * scale, as SD3 and FLUX.1 use) and the
  per-channel `latents_mean` / `latents_std` are written for AutoencoderKL only (when
  given), VQModel has none. `force_upcast` None keeps diffusers' defaults: True for
  AutoencoderKL (SD-family VAEs overflow in float16), False for VQModel.
  """
  problems = []
  if spec.ch_mult[0] != 1:
    problems.append("ch_mult[0] must be 1 (diffusers' encoder has no separate stem width)")
  if spec.kind == "kl" and spec.z_channels != spec.embed_dim:
    problems.append("diffusers' AutoencoderKL needs z_channels == embed_dim")
  if spec.kind == "vq" and spec.remap is not None:
    problems.append("diffusers' VQModel has no index remap")
  if spec.kind == "vq" and not (spec.use_quant_conv and spec.use_post_quant_conv):
    problems.append("diffusers' VQModel always has quant_conv and post_quant_conv")
  if spec.kind == "vq" and shift_factor is not None:
    problems.append("diffusers' VQModel has no shift_factor")
  if spec.kind == "vq" and (latents_mean is not None or latents_std is not None):
    problems.append("diffusers' VQModel has no latents_mean / latents_std")
  if problems:
    raise ValueError("cannot export to the diffusers layout: " + "; ".join(problems)
                     + "; use format='compvis'")
  levels = len(spec.ch_mult)
  attn = [spec.attn_type == "vanilla" and spec.resolution // 2**i in spec.attn_resolutions
          for i in range(levels)]
  common = dict(
      in_channels=spec.in_channels, out_channels=spec.out_ch,
      down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
      up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D"
                      for a in reversed(attn)],
      block_out_channels=[spec.ch * m for m in spec.ch_mult],
      layers_per_block=spec.num_res_blocks, act_fn="silu", norm_num_groups=spec.norm_num_groups,
      sample_size=spec.resolution, scaling_factor=scaling_factor,
      mid_block_add_attention=spec.attn_type == "vanilla" and spec.mid_block_attention)
  if spec.kind == "kl":
    stats = {name: list(value) for name, value in (("latents_mean", latents_mean),
                                                   ("latents_std", latents_std))
             if value is not None}
    return dict(_class_name="AutoencoderKL", latent_channels=spec.z_channels,
                shift_factor=shift_factor,
                force_upcast=True if force_upcast is None else bool(force_upcast),
                use_quant_conv=spec.use_quant_conv,
                use_post_quant_conv=spec.use_post_quant_conv, **stats, **common)
  return dict(_class_name="VQModel", latent_channels=spec.z_channels,
              vq_embed_dim=spec.embed_dim, num_vq_embeddings=spec.n_embed, norm_type="group",
              lookup_from_codebook=False,
              force_upcast=False if force_upcast is None else bool(force_upcast), **common)


def torch_keys(spec: AutoencoderSpec) -> list[str]:
  """The CompVis keys of a model with this spec (for documentation and checks)."""
  return sorted(torch_leaves(abstract_autoencoder(spec)))


__all__ = ["load_autoencoder", "save_autoencoder", "read_autoencoder_weights", "infer_spec",
           "autoencoder_from_weights", "discriminator_tensors", "infer_discriminator",
           "load_discriminator",
           "diffusers_config", "diffusers_latent_scaling", "build_autoencoder", "torch_keys"]
