"""CLIP text encoders in and out: transformers / diffusers folders and SD checkpoints.

ldm_jax's `CLIPTextTransformer` carries transformers' names, so a `CLIPTextModel`,
`CLIPTextModelWithProjection` or `CLIPModel` (its text half) state dict loads as is, and
so does SD1's `cond_stage_model.transformer.*`. SD2's `cond_stage_model.model.*` holds
open_clip names, renamed here; its packed `in_proj_weight` is split into q, k, v and its
`text_projection` (a [width, proj] matrix used as `x @ P`) becomes a Linear weight P.T.

What the weights do not record is fixed by the layout: the activation (quick GELU for
SD1's openai CLIP, exact GELU for SD2's OpenCLIP ViT-H), the head split (head width 64,
as both towers use: 768/12 and 1024/16), and the layer SD reads (last for SD1,
penultimate for SD2). Each can be overridden. With "penultimate" the last block's
tensors are checked to exist, then dropped (see models.clip).

An export is a transformers `CLIPTextModel(WithProjection)` folder. A penultimate-layer
encoder is written without its unused last block, reading at its (new) last layer: the
shape of diffusers' SD2 `text_encoder/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from ldm_jax import fs, outputs
from ldm_jax.convert.files import WeightFileError, read_json_object, read_tensors
from ldm_jax.convert.torch_layout import StateMismatchError, export_state, import_state
from ldm_jax.models.clip import (ACTIVATIONS, OUTPUT_LAYERS, CLIPTextSpec, CLIPTextTransformer,
                                 abstract_clip_text)

HEAD_WIDTH = 64
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_SHARD_INDEX = "model.safetensors.index.json"
SD1_PREFIX = "cond_stage_model.transformer."
SD2_PREFIX = "cond_stage_model.model."
# transformers reads eos_token_id == 2 as "pool at the argmax id" (its pre-2023 configs).
_LEGACY_EOS = 2
# transformers name -> open_clip name inside one block.
_OPEN_CLIP_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
                    "mlp.fc2": "mlp.c_proj"}
_BARE = ("embeddings.", "encoder.", "final_layer_norm.")
# Tensors of these layouts that are not part of the text tower.
_IGNORED = re.compile(r"(.*\.)?(position_ids|attn_mask|logit_scale)$")


@dataclasses.dataclass(frozen=True)
class _Options:
  output_layer: str | None = None
  activation: str | None = None
  num_heads: int | None = None
  dtype: str = "float32"
  remat: bool = False


def load_text_encoder(source: str | os.PathLike | dict, *, output_layer: str | None = None,
                      activation: str | None = None, num_heads: int | None = None,
                      dtype: str = "float32", remat: bool = False
                      ) -> tuple[CLIPTextSpec, CLIPTextTransformer]:
  """(spec, module) with the weights of `source`:

  - a transformers `CLIPTextModel` / `CLIPTextModelWithProjection` / `CLIPModel` folder,
    a diffusers `text_encoder/` folder or a pipeline folder holding one (config.json +
    model.safetensors, sharded safetensors or pytorch_model.bin); the spec comes from
    config.json and the layer read is the last one, as transformers reads it;
  - a single-file SD checkpoint (.safetensors / .ckpt): SD1's
    `cond_stage_model.transformer.text_model.*` or SD2's `cond_stage_model.model.*`;
  - the same tensors already read, as a dict of NumPy arrays (with or without those
    prefixes), e.g. by a pipeline loader that reads the file once.

  Overrides (None: the source's or layout's own): `output_layer` "last" | "penultimate",
  `activation` "quick_gelu" | "gelu", `num_heads` (single files only; default width/64).
  """
  options = _Options(output_layer, activation, num_heads, dtype, remat)
  if output_layer is not None and output_layer not in OUTPUT_LAYERS:
    raise ValueError(f"output_layer={output_layer!r}; choose one of {OUTPUT_LAYERS}")
  if activation is not None and activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r}; choose one of {ACTIVATIONS}")
  if isinstance(source, dict):
    spec, tensors, layout = _from_checkpoint(source, options)
    shown = "the given tensors"
  else:
    path = fs.path(source)
    if path.is_dir():
      spec, tensors = _from_folder(path, options)
      layout, shown = "transformers", str(path)
    elif not path.exists():
      raise WeightFileError(f"no text encoder weights at {path}")
    else:
      spec, tensors, layout = _from_checkpoint(read_tensors(path), options)
      shown = str(path)
  model = abstract_clip_text(spec)
  import_state(model, tensors, f"{shown} ({layout} CLIP text layout)",
               hint=f"The weights were read as: {_describe(spec)}")
  return spec, model


def _describe(spec: CLIPTextSpec) -> str:
  fields = ("vocab_size", "max_positions", "width", "depth", "heads", "mlp_dim", "activation",
            "projection_dim", "output_layer")
  return " ".join(f"{f}={getattr(spec, f)}" for f in fields)


# --- transformers / diffusers folders ---------------------------------------------------


def _text_folder(path):
  """A model folder, or a diffusers pipeline folder's text_encoder/."""
  if not (path / "config.json").is_file() and (path / "text_encoder" / "config.json").is_file():
    return path / "text_encoder"
  return path


def _read_config(folder) -> dict:
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise WeightFileError(f"{folder} has no config.json (nor text_encoder/config.json); a "
                          "text encoder folder is what transformers' save_pretrained writes")
  return read_json_object(config_file)


def _read_folder_tensors(folder) -> dict[str, np.ndarray]:
  index = folder / _SHARD_INDEX
  if index.is_file():
    shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    if not shards:
      raise WeightFileError(f"{index} names no weight files")
    tensors = {}
    for shard in shards:
      tensors.update(read_tensors(folder / shard))
    return tensors
  for name in TRANSFORMERS_WEIGHTS:
    if (folder / name).is_file():
      return read_tensors(folder / name)
  raise WeightFileError(f"{folder} has a config.json but no weights (looked for "
                        f"{', '.join(TRANSFORMERS_WEIGHTS)} and {_SHARD_INDEX})")


def _from_folder(path, options: _Options) -> tuple[CLIPTextSpec, dict[str, np.ndarray]]:
  folder = _text_folder(path)
  config = _read_config(folder)
  # A full CLIPModel nests the text tower's config (its projection is read from the weights).
  text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
  tensors = _text_tensors(_read_folder_tensors(folder))
  if not tensors:
    raise StateMismatchError(f"{folder} holds no text_model.* tensors; is it a CLIP text "
                             "encoder?")
  act = text.get("hidden_act", "quick_gelu")
  if act not in ACTIVATIONS:
    raise ValueError(f"{folder}/config.json: hidden_act={act!r} is not supported; ldm_jax's "
                     f"CLIP text tower has {ACTIVATIONS}")
  eos = text.get("eos_token_id", _LEGACY_EOS)
  eos = eos[0] if isinstance(eos, (list, tuple)) else eos
  projection = tensors.get("text_projection.weight")
  spec = CLIPTextSpec(
      vocab_size=int(text.get("vocab_size", 49408)),
      max_positions=int(text.get("max_position_embeddings", 77)),
      width=int(text.get("hidden_size", 512)), depth=int(text.get("num_hidden_layers", 12)),
      heads=int(text.get("num_attention_heads", 8)),
      mlp_dim=int(text.get("intermediate_size", 2048)),
      activation=options.activation or act,
      layer_norm_eps=float(text.get("layer_norm_eps", 1e-5)),
      projection_dim=int(projection.shape[0]) if projection is not None else 0,
      output_layer=options.output_layer or "last",
      pooling="argmax" if eos == _LEGACY_EOS else "eos",
      eos_token_id=int(eos) if eos is not None else 49407,
      dtype=options.dtype, remat=options.remat)
  return spec, _drop_unused_layers(tensors, spec)


# --- single-file SD checkpoints ---------------------------------------------------------


def detect_layout(tensors: dict[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
  """('transformers' | 'open_clip', the text tower's tensors without their prefix)."""
  for prefix, layout in ((SD1_PREFIX, "transformers"), (SD2_PREFIX, "open_clip"), ("", None)):
    sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    text = _text_tensors(sub)
    if any(k.startswith("text_model.encoder.layers.") for k in text):
      return "transformers", text
    if any(k.startswith("transformer.resblocks.") for k in sub) and "token_embedding.weight" in sub:
      return "open_clip", sub
    if layout is not None and sub:
      break  # the prefix is there but holds something else: report it below
  sample = ", ".join(sorted(tensors)[:6]) or "(no tensors)"
  raise StateMismatchError(
      "these tensors hold no CLIP text encoder in a known layout: expected SD1's "
      f"{SD1_PREFIX}text_model.* (transformers names) or SD2's {SD2_PREFIX}transformer."
      "resblocks.* (open_clip names), or the same without the prefix; first keys: " + sample)


def _text_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The text tower's tensors in transformers names, `text_model.` included: transformers
  5 saves a bare CLIPTextModel without that prefix (its other classes, SD1 checkpoints
  and hub folders keep it). A CLIPModel's vision half and buffers are left out."""
  out = {}
  for key, value in tensors.items():
    if key.startswith(_BARE):
      key = "text_model." + key
    text = key.startswith("text_model.") or key == "text_projection.weight"
    if text and not _IGNORED.match(key):
      out[key] = value
  return out


def _from_checkpoint(tensors: dict[str, np.ndarray], options: _Options
                     ) -> tuple[CLIPTextSpec, dict[str, np.ndarray], str]:
  layout, sub = detect_layout(tensors)
  if layout == "open_clip":
    sub = from_open_clip(sub)
  spec = infer_text_spec(sub, layout, options)
  release = "SD1" if layout == "transformers" else "SD2"
  return spec, _drop_unused_layers(sub, spec), f"{release} {layout}"


def infer_text_spec(tensors: dict[str, np.ndarray], layout: str,
                    options: _Options = _Options()) -> CLIPTextSpec:
  """The spec of transformers-named tensors; what they leave open comes from `layout`'s
  SD use (transformers: SD1's openai CLIP; open_clip: SD2's ViT-H) unless overridden."""
  def shape(key):
    if key not in tensors:
      raise StateMismatchError(f"cannot infer the CLIP text architecture: {key} is missing")
    return tensors[key].shape

  vocab, width = shape("text_model.embeddings.token_embedding.weight")
  layers = {int(m[1]) for k in tensors
            if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
  if not layers or sorted(layers) != list(range(len(layers))):
    raise StateMismatchError(f"cannot infer the CLIP text depth from layers {sorted(layers)}")
  heads = options.num_heads or width // HEAD_WIDTH
  if not heads or width % heads:
    raise ValueError(f"width {width} does not split into heads of {HEAD_WIDTH}; pass "
                     "num_heads=")
  projection = tensors.get("text_projection.weight")
  sd2 = layout == "open_clip"
  return CLIPTextSpec(
      vocab_size=int(vocab),
      max_positions=int(shape("text_model.embeddings.position_embedding.weight")[0]),
      width=int(width), depth=len(layers), heads=int(heads),
      mlp_dim=int(shape("text_model.encoder.layers.0.mlp.fc1.weight")[0]),
      activation=options.activation or ("gelu" if sd2 else "quick_gelu"),
      projection_dim=int(projection.shape[0]) if projection is not None else 0,
      output_layer=options.output_layer or ("penultimate" if sd2 else "last"),
      pooling="argmax", dtype=options.dtype, remat=options.remat)


def from_open_clip(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """open_clip text-tower names (prefix removed) -> transformers names."""
  out = {}
  for key, value in tensors.items():
    if _IGNORED.match(key):
      continue
    if m := re.match(r"transformer\.resblocks\.(\d+)\.(.*)", key):
      base, rest = f"text_model.encoder.layers.{m[1]}.", m[2]
      if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = rest.rsplit("_", 1)[1]
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
          out[f"{base}self_attn.{name}.{leaf}"] = part
        continue
      for ours, theirs in _OPEN_CLIP_BLOCK.items():
        if rest.startswith(theirs + "."):
          rest = ours + rest[len(theirs):]
          break
      out[base + rest] = value
    elif key == "token_embedding.weight":
      out["text_model.embeddings.token_embedding.weight"] = value
    elif key == "positional_embedding":
      out["text_model.embeddings.position_embedding.weight"] = value
    elif key.startswith("ln_final."):
      out["text_model.final_layer_norm." + key[len("ln_final."):]] = value
    elif key == "text_projection":
      out["text_projection.weight"] = np.ascontiguousarray(value.T)
    else:
      out[key] = value  # left for check_state to report
  return out


def to_open_clip(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers names -> open_clip names (inverse of `from_open_clip`)."""
  out, packed = {}, {}
  for key, value in tensors.items():
    if m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key):
      base, rest = f"transformer.resblocks.{m[1]}.", m[2]
      if mm := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest):
        packed.setdefault((base, mm[2]), {})[mm[1]] = value
        continue
      for ours, theirs in _OPEN_CLIP_BLOCK.items():
        if rest.startswith(ours + "."):
          rest = theirs + rest[len(ours):]
          break
      out[base + rest] = value
    elif key == "text_model.embeddings.token_embedding.weight":
      out["token_embedding.weight"] = value
    elif key == "text_model.embeddings.position_embedding.weight":
      out["positional_embedding"] = value
    elif key.startswith("text_model.final_layer_norm."):
      out["ln_final." + key[len("text_model.final_layer_norm."):]] = value
    elif key == "text_projection.weight":
      out["text_projection"] = np.ascontiguousarray(value.T)
    else:
      out[key] = value
  for (base, leaf), parts in packed.items():
    out[f"{base}attn.in_proj_{leaf}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
  return out


def _drop_unused_layers(tensors: dict[str, np.ndarray], spec: CLIPTextSpec
                        ) -> dict[str, np.ndarray]:
  """Without the blocks past `spec.computed_depth` (penultimate: the last one)."""
  keep = spec.computed_depth
  def used(key):
    m = re.match(r"text_model\.encoder\.layers\.(\d+)\.", key)
    return m is None or int(m[1]) < keep
  return {k: v for k, v in tensors.items() if used(k)}


# --- export -----------------------------------------------------------------------------


def transformers_config(spec: CLIPTextSpec) -> dict:
  """config.json of the transformers model `save_text_encoder` writes for `spec`."""
  if spec.pooling == "eos" and spec.eos_token_id == _LEGACY_EOS:
    raise ValueError(f"transformers reads eos_token_id={_LEGACY_EOS} as argmax pooling; a "
                     f"spec pooling at the first id {_LEGACY_EOS} has no transformers config")
  return {
      "architectures": ["CLIPTextModelWithProjection" if spec.projection_dim else "CLIPTextModel"],
      "model_type": "clip_text_model",
      "vocab_size": spec.vocab_size, "max_position_embeddings": spec.max_positions,
      "hidden_size": spec.width, "intermediate_size": spec.mlp_dim,
      # The unused last block of a penultimate-layer encoder is not written.
      "num_hidden_layers": spec.computed_depth, "num_attention_heads": spec.heads,
      "hidden_act": spec.activation, "layer_norm_eps": spec.layer_norm_eps,
      "projection_dim": spec.projection_dim or spec.width,
      "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02,
      "initializer_factor": 1.0,
      # SD1's text_encoder/config.json ids; eos 2 is what selects argmax pooling.
      "bos_token_id": 0, "pad_token_id": 1,
      "eos_token_id": _LEGACY_EOS if spec.pooling == "argmax" else spec.eos_token_id,
      "torch_dtype": "float32",
  }


def save_text_encoder(model: CLIPTextTransformer, path: str | os.PathLike, *,
                      overwrite: bool = False) -> None:
  """A folder for transformers' `CLIPTextModel.from_pretrained` (or `...WithProjection`
  when the encoder has a projection): config.json and model.safetensors. Its
  `last_hidden_state` is this encoder's `context`. Written atomically; a previous export
  at `path` is replaced, anything else refused unless `overwrite` (ldm_jax.outputs)."""
  from safetensors.numpy import save_file
  config = transformers_config(model.spec)
  # No text-encoder kind exists in ldm_jax.outputs yet: marked as a plain weights output.
  outputs.check_target(path, outputs.WEIGHTS, overwrite=overwrite)
  tensors = export_state(model)
  with outputs.atomic_path(path, outputs.WEIGHTS, overwrite=overwrite) as tmp:
    tmp.mkdir()
    # transformers refuses safetensors files without format=pt metadata.
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
