"""Key renaming between the CompVis and diffusers autoencoder layouts.

ldm_jax's own PyTorch names are the CompVis ones, so only diffusers needs a map. Unlike
diffusers' single-file converter, attention inside the down/up levels (kl-f16, kl-f32,
vq-f8, vq-f16) is mapped too. diffusers stores the attention projections as Linear
weights [C, C] where CompVis has 1x1 convs [C, C, 1, 1].
"""

from __future__ import annotations

import re

import numpy as np

_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                      "proj_out": "to_out.0"}
_ATTN_FROM_DIFFUSERS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                        "to_out.0": "proj_out",
                        # names used by diffusers before 0.14
                        "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def detect_layout(keys) -> str:
  """'compvis' or 'diffusers', from the names of an autoencoder state dict."""
  keys = list(keys)
  if any(re.match(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.", k)
         for k in keys):
    return "diffusers"
  if any(re.match(r"(encoder\.down|decoder\.up|encoder\.mid|decoder\.mid)\.", k)
         for k in keys):
    return "compvis"
  sample = ", ".join(sorted(keys)[:5]) or "(no tensors)"
  raise ValueError("these weights are not a first-stage autoencoder in the CompVis or "
                   f"diffusers layout (no encoder/decoder blocks); first keys: {sample}")


def num_levels(keys, layout: str) -> int:
  pattern = r"encoder\.down_blocks\.(\d+)\." if layout == "diffusers" else r"encoder\.down\.(\d+)\."
  levels = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  if not levels:
    raise ValueError("no encoder levels found in the weights")
  return max(levels) + 1


def _sub_attention(rest: str, table: dict[str, str]) -> str:
  for old, new in table.items():
    if rest.startswith(old + "."):
      return new + rest[len(old):]
  return rest


def to_diffusers_key(key: str, levels: int) -> str:
  """CompVis name -> diffusers name (keys outside encoder/decoder are unchanged)."""
  m = re.match(r"(encoder|decoder)\.(.*)", key)
  if not m:
    return key
  part, rest = m.groups()
  if rest.startswith("norm_out."):
    return f"{part}.conv_norm_out.{rest[len('norm_out.'):]}"
  if mm := re.match(r"mid\.block_(\d)\.(.*)", rest):
    return f"{part}.mid_block.resnets.{int(mm[1]) - 1}.{_resnet_to(mm[2])}"
  if mm := re.match(r"mid\.attn_1\.(.*)", rest):
    return f"{part}.mid_block.attentions.0.{_sub_attention(mm[1], _ATTN_TO_DIFFUSERS)}"
  if mm := re.match(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(.*)", rest):
    level = int(mm[2]) if mm[1] == "down" else levels - 1 - int(mm[2])
    inner = _resnet_to(mm[5]) if mm[3] == "block" else _sub_attention(mm[5], _ATTN_TO_DIFFUSERS)
    kind = "resnets" if mm[3] == "block" else "attentions"
    return f"{part}.{mm[1]}_blocks.{level}.{kind}.{mm[4]}.{inner}"
  if mm := re.match(r"down\.(\d+)\.downsample\.(.*)", rest):
    return f"{part}.down_blocks.{mm[1]}.downsamplers.0.{mm[2]}"
  if mm := re.match(r"up\.(\d+)\.upsample\.(.*)", rest):
    return f"{part}.up_blocks.{levels - 1 - int(mm[1])}.upsamplers.0.{mm[2]}"
  return key


def from_diffusers_key(key: str, levels: int) -> str:
  """diffusers name -> CompVis name (inverse of `to_diffusers_key`, plus old attention names)."""
  m = re.match(r"(encoder|decoder)\.(.*)", key)
  if not m:
    return key
  part, rest = m.groups()
  if rest.startswith("conv_norm_out."):
    return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}"
  if mm := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
    return f"{part}.mid.block_{int(mm[1]) + 1}.{_resnet_from(mm[2])}"
  if mm := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
    return f"{part}.mid.attn_1.{_sub_attention(mm[1], _ATTN_FROM_DIFFUSERS)}"
  if mm := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", rest):
    level = int(mm[2]) if mm[1] == "down" else levels - 1 - int(mm[2])
    if mm[3] == "resnets":
      return f"{part}.{mm[1]}.{level}.block.{mm[4]}.{_resnet_from(mm[5])}"
    return f"{part}.{mm[1]}.{level}.attn.{mm[4]}.{_sub_attention(mm[5], _ATTN_FROM_DIFFUSERS)}"
  if mm := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", rest):
    return f"{part}.down.{mm[1]}.downsample.{mm[2]}"
  if mm := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
    return f"{part}.up.{levels - 1 - int(mm[1])}.upsample.{mm[2]}"
  return key


def _resnet_to(rest: str) -> str:
  return rest.replace("nin_shortcut.", "conv_shortcut.", 1)


def _resnet_from(rest: str) -> str:
  return rest.replace("conv_shortcut.", "nin_shortcut.", 1)


def _is_attention_projection(compvis_key: str) -> bool:
  return bool(re.search(r"\.(attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight$", compvis_key))


def compvis_to_diffusers(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  levels = num_levels(tensors, "compvis")
  out = {}
  for key, value in tensors.items():
    if _is_attention_projection(key) and value.ndim == 4:
      value = value[:, :, 0, 0]
    out[to_diffusers_key(key, levels)] = value
  return out


def diffusers_to_compvis(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  levels = num_levels(tensors, "diffusers")
  out = {}
  for key, value in tensors.items():
    new = from_diffusers_key(key, levels)
    if _is_attention_projection(new) and value.ndim == 2:
      value = value[:, :, None, None]
    if new in out:
      raise ValueError(f"two tensors map to {new}; the file mixes old and new diffusers names")
    out[new] = value
  return out
