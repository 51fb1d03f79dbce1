"""UNet weights in and out: diffusers `UNet2DConditionModel` folders and CompVis checkpoints.

ldm_jax's UNet carries diffusers' module names, so a diffusers state dict loads as is; the
CompVis layout (`input_blocks.N.M`, `middle_block`, `output_blocks`, `time_embed`, `out`)
is a per-module rename computed from the spec, both ways. CompVis files may hold the UNet
bare or under `model.diffusion_model.` (LDM checkpoints), optionally nested in
`state_dict`; their EMA copy (`model_ema.*`) is read on request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ldm_jax import fs, outputs
from ldm_jax.convert.files import (DIFFUSERS_WEIGHTS, WeightFileError, read_safetensors_metadata,
                                   read_tensors, strip_nesting, write_diffusers_folder,
                                   write_safetensors)
from ldm_jax.convert.torch_layout import (StateMismatchError, export_state, import_state,
                                          torch_leaves)
from ldm_jax.models.unet import UNetModel, UNetSpec, abstract_unet

SPEC_METADATA_KEY = "ldm_jax.unet_spec"
_RESNET_LEAVES = {"norm1": "in_layers.0", "conv1": "in_layers.2",
                  "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                  "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _attention_levels(spec: UNetSpec) -> list[bool]:
  return [2**level in spec.attention_resolutions for level in range(len(spec.channel_mult))]


def module_renames(spec: UNetSpec) -> list[tuple[str, str, str]]:
  """(ldm_jax prefix, CompVis prefix, kind) for every module; kind 'resnet' renames leaves."""
  out = [("time_embedding.linear_1.", "time_embed.0.", "plain"),
         ("time_embedding.linear_2.", "time_embed.2.", "plain"),
         ("class_embedding.", "label_emb.", "plain"),
         ("conv_in.", "input_blocks.0.0.", "plain"),
         ("conv_norm_out.", "out.0.", "plain"), ("conv_out.", "out.2.", "plain"),
         ("mid_block.resnets.0.", "middle_block.0.", "resnet"),
         ("mid_block.attentions.0.", "middle_block.1.", "plain"),
         ("mid_block.resnets.1.", "middle_block.2.", "resnet")]
  resample = "resnet" if spec.resblock_updown else "plain"
  attention = _attention_levels(spec)
  levels = len(spec.channel_mult)
  n = 0
  for level in range(levels):
    for j in range(spec.num_res_blocks):
      n += 1
      out.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{n}.0.", "resnet"))
      if attention[level]:
        out.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{n}.1.", "plain"))
    if level != levels - 1:
      n += 1
      if spec.resblock_updown:
        out.append((f"down_blocks.{level}.downsamplers.0.", f"input_blocks.{n}.0.", resample))
      else:
        out.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{n}.0.op.",
                    "plain"))
  m = 0
  for i, level in enumerate(reversed(range(levels))):
    for j in range(spec.num_res_blocks + 1):
      out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{m}.0.", "resnet"))
      if attention[level]:
        out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{m}.1.", "plain"))
      if level and j == spec.num_res_blocks:
        slot = 2 if attention[level] else 1
        out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{m}.{slot}.", resample))
      m += 1
  return out


def _rename(tensors: dict[str, np.ndarray], renames, to_compvis: bool) -> dict[str, np.ndarray]:
  pairs = []
  for ours, theirs, kind in renames:
    src, dst = (ours, theirs) if to_compvis else (theirs, ours)
    pairs.append((src, dst, kind))
  pairs.sort(key=lambda p: -len(p[0]))  # longest prefix first
  out = {}
  for key, value in tensors.items():
    for src, dst, kind in pairs:
      if key.startswith(src):
        rest = key[len(src):]
        if kind == "resnet":
          rest = _rename_resnet_leaf(rest, to_compvis)
        out[dst + rest] = value
        break
    else:
      out[key] = value  # left for check_state to report
  return out


def _rename_resnet_leaf(rest: str, to_compvis: bool) -> str:
  table = _RESNET_LEAVES if to_compvis else {v: k for k, v in _RESNET_LEAVES.items()}
  for src, dst in table.items():
    if rest.startswith(src + "."):
      return dst + rest[len(src):]
  return rest


def to_compvis(tensors: dict[str, np.ndarray], spec: UNetSpec) -> dict[str, np.ndarray]:
  return _rename(tensors, module_renames(spec), to_compvis=True)


def from_compvis(tensors: dict[str, np.ndarray], spec: UNetSpec) -> dict[str, np.ndarray]:
  return _rename(tensors, module_renames(spec), to_compvis=False)


def diffusers_config(spec: UNetSpec, sample_size: int | None = None) -> dict:
  """config.json for diffusers' UNet2DConditionModel describing `spec` (or why it cannot).
  `sample_size`: the latent side it was trained at (diffusers pipelines derive their
  default image size from it); None when unknown."""
  problems = []
  if not spec.use_spatial_transformer:
    problems.append("legacy AttentionBlocks (use_spatial_transformer=False)")
  if spec.resblock_updown:
    problems.append("resampling inside ResBlocks (resblock_updown)")
  if not spec.conv_resample:
    problems.append("resampling without convs (conv_resample=False)")
  if problems:
    raise ValueError("diffusers' UNet2DConditionModel cannot hold this UNet: "
                     + ", ".join(problems) + "; save it with format='compvis'")
  attention = _attention_levels(spec)
  widths = [spec.model_channels * m for m in spec.channel_mult]
  heads = [spec.heads(w)[0] for w in widths]
  return {
      "_class_name": "UNet2DConditionModel",
      "in_channels": spec.in_channels, "out_channels": spec.out_channels,
      "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
      "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D"
                         for a in reversed(attention)],
      "mid_block_type": "UNetMidBlock2DCrossAttn",
      "block_out_channels": widths, "layers_per_block": spec.num_res_blocks,
      "cross_attention_dim": spec.context_dim,
      # diffusers reads attention_head_dim as the number of heads (a historical quirk).
      "attention_head_dim": heads,
      "transformer_layers_per_block": spec.transformer_depth,
      "use_linear_projection": spec.use_linear_in_transformer,
      "num_class_embeds": spec.num_classes or None,
      "resnet_time_scale_shift": "scale_shift" if spec.use_scale_shift_norm else "default",
      "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
      "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
      "mid_block_scale_factor": 1, "sample_size": sample_size,
  }


# config.json values ldm_jax's UNet follows; any other value changes the network.
_DIFFUSERS_FIXED = {
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True,
    "freq_shift": 0, "center_input_sample": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "class_embed_type": None,
    "class_embeddings_concat": False, "addition_embed_type": None, "encoder_hid_dim": None,
    "only_cross_attention": False, "dual_cross_attention": False, "attention_type": "default",
    "cross_attention_norm": None, "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "reverse_transformer_layers_per_block": None}


def _unsupported(config: dict) -> list[str]:
  odd = []
  for key, expected in _DIFFUSERS_FIXED.items():
    value = config.get(key, expected)
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(v != expected for v in values):
      odd.append(f"{key}={value!r}")
  down, up = list(config.get("down_block_types", [])), list(config.get("up_block_types", []))
  pairs = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
  if any(t not in pairs for t in down) or [pairs.get(t) for t in reversed(down)] != up:
    odd.append(f"down_block_types={down!r} with up_block_types={up!r} (CrossAttn/plain "
               "blocks, the up path mirroring the down path)")
  if config.get("resnet_time_scale_shift", "default") not in ("default", "scale_shift"):
    odd.append(f"resnet_time_scale_shift={config['resnet_time_scale_shift']!r}")
  widths = list(config.get("block_out_channels", []))
  if widths and any(w % widths[0] for w in widths):
    odd.append(f"block_out_channels={widths!r} (multiples of the first)")
  for key in ("transformer_layers_per_block", "layers_per_block", "cross_attention_dim"):
    value = config.get(key)
    if isinstance(value, (list, tuple)) and len(set(value)) > 1:
      odd.append(f"{key}={value!r} (one value for all levels only)")
  return odd


def _single(value):
  return value[0] if isinstance(value, (list, tuple)) else value


def spec_from_diffusers_config(config: dict) -> UNetSpec:
  """The UNetSpec of a UNet2DConditionModel config.json (SD-style topologies)."""
  odd = _unsupported(config)
  if odd:
    raise ValueError("ldm_jax's UNet (CompVis openaimodel) has no equivalent of this "
                     "UNet2DConditionModel config: " + ", ".join(odd))
  widths = list(config["block_out_channels"])
  mc = widths[0]
  mults = tuple(w // mc for w in widths)
  heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
  heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
  head_dims = {w // h for w, h in zip(widths, heads)}
  attention = tuple(2**i for i, t in enumerate(config["down_block_types"])
                    if "CrossAttn" in t)
  common = dict(in_channels=config["in_channels"], out_channels=config["out_channels"],
                model_channels=mc, attention_resolutions=attention,
                num_res_blocks=int(_single(config["layers_per_block"])), channel_mult=mults,
                use_spatial_transformer=True,
                transformer_depth=int(_single(config.get("transformer_layers_per_block", 1))),
                context_dim=int(_single(config["cross_attention_dim"])),
                use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
                num_classes=int(config.get("num_class_embeds") or 0),
                use_scale_shift_norm=config.get("resnet_time_scale_shift") == "scale_shift")
  if len(set(heads)) == 1:
    return UNetSpec(num_heads=heads[0], **common)
  if len(head_dims) == 1:  # SD 2 style: a fixed head width
    return UNetSpec(num_heads=-1, num_head_channels=head_dims.pop(), **common)
  raise ValueError(f"attention heads {heads} over widths {widths} are neither a fixed count "
                   "nor a fixed width; ldm_jax's UNet needs one of the two")


def infer_unet_spec(tensors: dict[str, np.ndarray], num_heads: int = -1,
                    num_head_channels: int = -1) -> UNetSpec:
  """The UNetSpec implied by CompVis-layout names and shapes. The head split of attention
  leaves no trace in the weights, so it is an argument (num_heads or num_head_channels)."""
  def shape(key):
    if key not in tensors:
      raise StateMismatchError(f"cannot infer the UNet architecture: {key} is missing")
    return tensors[key].shape

  def indices(pattern):
    return sorted({int(m[1]) for k in tensors if (m := re.match(pattern, k))})

  mc, in_channels = shape("input_blocks.0.0.weight")[:2]
  inputs, outputs = indices(r"input_blocks\.(\d+)\."), indices(r"output_blocks\.(\d+)\.")
  if not outputs or inputs != list(range(len(inputs))) or len(inputs) != len(outputs):
    raise StateMismatchError("cannot infer the UNet architecture from these input_blocks / "
                             "output_blocks (resampling without convs?): pass spec=")
  resamplers = {m: slot for m in outputs for slot in (1, 2)
                if any(k.startswith(f"output_blocks.{m}.{slot}.{leaf}")
                       for leaf in ("conv.", "in_layers.") for k in tensors)}
  per_level = min(resamplers) + 1 if resamplers else len(outputs)
  levels = len(outputs) // per_level
  if sorted(resamplers) != [per_level * (i + 1) - 1 for i in range(levels - 1)]:
    raise StateMismatchError(f"cannot infer the UNet architecture: upsamplers in output "
                             f"blocks {sorted(resamplers)} do not repeat evenly")
  first = [1 + level * per_level for level in range(levels)]
  widths = [shape(f"input_blocks.{n}.0.out_layers.3.weight")[0] for n in first]
  attention = tuple(2**level for level, n in enumerate(first)
                    if any(k.startswith(f"input_blocks.{n}.1.") for k in tensors))
  values: dict[str, Any] = dict(
      in_channels=in_channels, out_channels=shape("out.2.weight")[0], model_channels=mc,
      attention_resolutions=attention, num_res_blocks=per_level - 1,
      channel_mult=tuple(w // mc for w in widths), num_heads=num_heads,
      num_head_channels=num_head_channels,
      use_scale_shift_norm=shape("input_blocks.1.0.emb_layers.1.weight")[0] == 2 * widths[0],
      resblock_updown=any(".in_layers." in k for m, slot in resamplers.items() for k in tensors
                          if k.startswith(f"output_blocks.{m}.{slot}.")),
      num_classes=shape("label_emb.weight")[0] if "label_emb.weight" in tensors else 0)
  if "middle_block.1.proj_in.weight" in tensors:
    values.update(
        use_spatial_transformer=True,
        transformer_depth=len(indices(r"middle_block\.1\.transformer_blocks\.(\d+)\.")),
        context_dim=shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        use_linear_in_transformer=len(shape("middle_block.1.proj_in.weight")) == 2)
  return UNetSpec(**values)


def _describe(tensors: dict[str, np.ndarray]) -> str:
  try:
    found = infer_unet_spec(tensors, num_heads=1)
  except (StateMismatchError, ValueError):
    return ""
  fields = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
            "use_spatial_transformer", "context_dim", "transformer_depth",
            "use_linear_in_transformer", "use_scale_shift_norm", "resblock_updown",
            "num_classes", "in_channels", "out_channels")
  return " The weights look like: " + " ".join(f"{f}={getattr(found, f)}" for f in fields)


def _spec_json(spec: UNetSpec) -> dict:
  values = dataclasses.asdict(spec)
  values.pop("dtype"), values.pop("remat")  # run-time choices, not architecture
  return values


def save_unet(model: UNetModel, path: str | os.PathLike, format: str = "diffusers", *,
              sample_size: int | None = None, overwrite: bool = False) -> None:
  """format="diffusers": a UNet2DConditionModel folder (`sample_size` in its config.json);
  "compvis": one .safetensors with CompVis keys and ldm_jax's spec in its metadata.
  Written atomically; a previous UNet export at `path` is replaced, anything else refused
  unless `overwrite` (ldm_jax.outputs)."""
  if format not in ("compvis", "diffusers"):
    raise ValueError(f"format must be 'diffusers' or 'compvis', got {format!r}")
  if format == "compvis" and Path(path).suffix != ".safetensors":
    raise ValueError(f"a CompVis export is one .safetensors file; got {path}")
  outputs.check_target(path, outputs.UNET, overwrite=overwrite)  # before the work
  tensors = export_state(model)
  if format == "diffusers":
    write_diffusers_folder(tensors, diffusers_config(model.spec, sample_size), path,
                           kind=outputs.UNET, overwrite=overwrite)
  else:
    write_safetensors(to_compvis(tensors, model.spec), path,
                      {SPEC_METADATA_KEY: json.dumps(_spec_json(model.spec))},
                      kind=outputs.UNET, overwrite=overwrite)


def ema_weights(tensors: dict[str, np.ndarray], spec: UNetSpec) -> dict[str, np.ndarray]:
  """The EMA copy of an LDM checkpoint in CompVis keys. LitEma stores it as
  `model_ema.diffusion_model` + the key with its dots removed."""
  names = to_compvis({k: k for k in torch_leaves(abstract_unet(spec))}, spec)
  stored = {name: "model_ema.diffusion_model" + name.replace(".", "") for name in names}
  missing = sorted(v for v in stored.values() if v not in tensors)
  if missing:
    raise StateMismatchError(f"the checkpoint has no complete EMA copy of this UNet: "
                             f"{len(missing)} missing, e.g. {', '.join(missing[:5])}")
  return {name: tensors[key] for name, key in stored.items()}


def _read_compvis(path: Path, spec: UNetSpec | None, heads: dict, ema: bool):
  """(spec, tensors in ldm_jax names, hint) of a CompVis-layout file."""
  if spec is None and path.suffix == ".safetensors":
    stored = read_safetensors_metadata(path).get(SPEC_METADATA_KEY)
    spec = UNetSpec.from_config(json.loads(stored)) if stored else None
  everything = read_tensors(path)
  live = {k: v for k, v in everything.items() if not k.startswith("model_ema.")}
  compvis = strip_nesting(live, "model.diffusion_model.")
  if spec is None:
    if not heads:
      raise ValueError(
          f"{path} records every part of its UNet but the attention head split: pass "
          "num_heads= or num_head_channels=, or spec= (a UNetSpec, or the `unet` block of "
          "the LDM config that trained it)")
    spec = infer_unet_spec(compvis, **heads)
  hint = _describe(compvis)
  if ema:
    compvis = ema_weights(everything, spec)
  return spec, from_compvis(compvis, spec), hint


def load_unet(path: str | os.PathLike, spec: UNetSpec | Any = None, *,
              num_heads: int | None = None, num_head_channels: int | None = None,
              ema: bool = False) -> UNetModel:
  """A UNetModel with the weights at `path`: a diffusers folder (or a pipeline folder with
  unet/), or a CompVis .safetensors / .ckpt (bare keys, or under `model.diffusion_model.`
  as in LDM checkpoints, whose `model_ema.*` copy is read instead with ema=True).

  `spec` (a UNetSpec, or a config's `unet` block) may be omitted for diffusers folders and
  for files ldm_jax wrote; for other CompVis files the architecture is read from the
  weights, except the head split, which they do not record: pass num_heads= or
  num_head_channels= (the CompVis config's values) instead. `path` may be gs://.
  """
  path = fs.path(path)
  if spec is not None and not isinstance(spec, UNetSpec):
    spec = UNetSpec.from_config(spec)
  if path.is_dir():
    folder = path / "unet" if (path / "unet" / DIFFUSERS_WEIGHTS).is_file() else path
    if not (folder / DIFFUSERS_WEIGHTS).is_file():
      raise WeightFileError(f"{path} has no {DIFFUSERS_WEIGHTS} (nor unet/{DIFFUSERS_WEIGHTS})")
    if ema:
      raise ValueError("ema=True reads an LDM checkpoint's model_ema copy; a diffusers "
                       "folder holds one set of weights")
    if spec is None:
      spec = spec_from_diffusers_config(json.loads((folder / "config.json").read_text()))
    tensors, layout, hint = read_tensors(folder / DIFFUSERS_WEIGHTS), "diffusers", ""
  elif not path.exists():
    raise WeightFileError(f"no weights at {path}")
  else:
    heads = {k: v for k, v in (("num_heads", num_heads),
                               ("num_head_channels", num_head_channels)) if v is not None}
    heads = heads and {"num_heads": -1, "num_head_channels": -1, **heads}
    spec, tensors, hint = _read_compvis(path, spec, heads, ema)
    layout = "CompVis EMA" if ema else "CompVis"
  model = abstract_unet(spec)
  import_state(model, tensors, f"{path} ({layout} layout)",
               hint="Check that the spec describes the UNet that made these weights." + hint)
  return model
