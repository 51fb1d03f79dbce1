"""CLIP image towers, and whole CLIP models (both towers), from transformers folders.

ldm_jax's `CLIPVisionTransformer` carries transformers' names, so the `vision_model.*` and
`visual_projection.weight` tensors of a `CLIPModel`, `CLIPVisionModelWithProjection` or
`CLIPVisionModel` folder load as they are (transformers 5 saves a bare CLIPVisionModel
without the `vision_model.` prefix; it is put back here). A `CLIPModel` folder's text half
loads through `convert.text_encoder`, which reads its `text_config` and `text_projection`.

Only what is needed for the CLIP score is read: no export, no open_clip names (OpenCLIP
models on the hub ship transformers-format folders beside their own files).
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import numpy as np

from ldm_jax import fs
from ldm_jax.convert.files import WeightFileError
from ldm_jax.convert.text_encoder import _read_config, _read_folder_tensors, load_text_encoder
from ldm_jax.convert.torch_layout import StateMismatchError, import_state
from ldm_jax.models.clip import (ACTIVATIONS, CLIPTextSpec, CLIPTextTransformer,
                                 CLIPVisionSpec, CLIPVisionTransformer, abstract_clip_vision)

VISION_MODEL_TYPE = "clip_vision_model"
CLIP_MODEL_TYPE = "clip"
_BARE = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
_IGNORED = re.compile(r"(.*\.)?position_ids$")


class CLIPModelParts(NamedTuple):
  text_spec: CLIPTextSpec
  text: CLIPTextTransformer
  vision_spec: CLIPVisionSpec
  vision: CLIPVisionTransformer


def _not_clip(folder, config: dict) -> WeightFileError:
  kind = config.get("model_type", "(none)")
  arch = config.get("architectures") or "(none)"
  return WeightFileError(
      f"{folder} is not a transformers CLIP model folder: its config.json has model_type="
      f"{kind!r}, architectures={arch}. Expected a CLIPModel (model_type 'clip', with "
      "text_config and vision_config), or for the image tower alone a "
      "CLIPVisionModel(WithProjection) (model_type 'clip_vision_model'), as save_pretrained "
      "writes them")


def _vision_config(folder, config: dict) -> tuple[dict, bool]:
  """(the image tower's config, whether the folder is a whole CLIPModel)."""
  if isinstance(config.get("vision_config"), dict) and config.get("model_type", "clip") == "clip":
    return config["vision_config"], True
  if config.get("model_type") == VISION_MODEL_TYPE:
    return config, False
  raise _not_clip(folder, config)


def vision_spec_from_config(vision: dict, projection_dim: int, *, dtype: str = "float32",
                            remat: bool = False, shown: str = "config.json") -> CLIPVisionSpec:
  act = vision.get("hidden_act", "quick_gelu")
  if act not in ACTIVATIONS:
    raise ValueError(f"{shown}: hidden_act={act!r} is not supported; ldm_jax's CLIP image "
                     f"tower has {ACTIVATIONS}")
  # transformers' CLIPVisionConfig defaults (ViT-B/32) for what a config leaves out.
  return CLIPVisionSpec(
      image_size=int(vision.get("image_size", 224)), patch_size=int(vision.get("patch_size", 32)),
      channels=int(vision.get("num_channels", 3)), width=int(vision.get("hidden_size", 768)),
      depth=int(vision.get("num_hidden_layers", 12)),
      heads=int(vision.get("num_attention_heads", 12)),
      mlp_dim=int(vision.get("intermediate_size", 3072)), activation=act,
      layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)), projection_dim=projection_dim,
      dtype=dtype, remat=remat)


def _vision_tensors(tensors: dict[str, np.ndarray], whole: bool) -> dict[str, np.ndarray]:
  out = {}
  for key, value in tensors.items():
    if not whole and key.startswith(_BARE):
      key = "vision_model." + key
    if (key.startswith("vision_model.") or key == "visual_projection.weight") \
        and not _IGNORED.match(key):
      out[key] = value
  return out


def load_vision_encoder(path: str | os.PathLike, *, dtype: str = "float32",
                        remat: bool = False) -> tuple[CLIPVisionSpec, CLIPVisionTransformer]:
  """(spec, module) from a transformers `CLIPModel` folder (its image half) or a
  `CLIPVisionModel(WithProjection)` folder: config.json + model.safetensors (or sharded
  safetensors, or pytorch_model.bin, read with weights_only)."""
  folder = fs.path(path)
  if not folder.is_dir():
    raise WeightFileError(f"no CLIP model folder at {folder}")
  config = _read_config(folder)
  vision, whole = _vision_config(folder, config)
  tensors = _vision_tensors(_read_folder_tensors(folder), whole)
  if not tensors:
    raise StateMismatchError(f"{folder} holds no vision_model.* tensors, though its "
                             "config.json describes a CLIP image tower")
  projection = tensors.get("visual_projection.weight")
  spec = vision_spec_from_config(vision, int(projection.shape[0]) if projection is not None
                                 else 0, dtype=dtype, remat=remat,
                                 shown=f"{folder}/config.json")
  model = abstract_clip_vision(spec)
  fields = ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "projection_dim")
  import_state(model, tensors, f"{folder} (transformers CLIP vision layout)",
               hint="The weights were read as: "
               + " ".join(f"{f}={getattr(spec, f)}" for f in fields))
  return spec, model


def load_clip_model(path: str | os.PathLike, *, dtype: str = "float32",
                    remat: bool = False) -> CLIPModelParts:
  """Both towers of a transformers `CLIPModel` folder, each with its projection into the
  shared embedding space (what a CLIP score compares)."""
  folder = fs.path(path)
  if not folder.is_dir():
    raise WeightFileError(f"no CLIP model folder at {folder}")
  config = _read_config(folder)
  if not (isinstance(config.get("vision_config"), dict)
          and isinstance(config.get("text_config"), dict)):
    raise _not_clip(folder, config)
  _vision_config(folder, config)  # refuses a non-CLIP model that nests the same two keys
  vision_spec, vision = load_vision_encoder(folder, dtype=dtype, remat=remat)
  text_spec, text = load_text_encoder(folder, dtype=dtype, remat=remat)
  if not (vision_spec.projection_dim and text_spec.projection_dim):
    raise StateMismatchError(f"{folder}: a CLIPModel needs both visual_projection.weight and "
                             "text_projection.weight")
  if vision_spec.projection_dim != text_spec.projection_dim:
    raise StateMismatchError(f"{folder}: the image projection's width "
                             f"{vision_spec.projection_dim} differs from the text "
                             f"projection's {text_spec.projection_dim}")
  return CLIPModelParts(text_spec, text, vision_spec, vision)
