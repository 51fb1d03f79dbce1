"""What an LDM run is, from its config alone: the condition fields and their tokenizer.

Shared by the LDM trainer, the latent cache and the sampler, so each reads a config the
same way.
"""

from __future__ import annotations

import ml_collections

from ldm_jax.data.conditions import ConditionSpec
from ldm_jax.data.tokenizer import make_tokenizer

FIELDS_BY_KIND = {"none": (), "class": ("label",), "text": ("tokens",)}


def tokenizer(config: ml_collections.ConfigDict):
  """The caption tokenizer of a text-conditioned config (None otherwise)."""
  if config.cond.kind != "text":
    return None
  return make_tokenizer(str(config.cond.vocab_file), int(config.cond.max_length))


def condition_spec(config: ml_collections.ConfigDict) -> ConditionSpec:
  kind = config.cond.kind
  if kind not in FIELDS_BY_KIND:
    raise ValueError(f"cond.kind={kind!r} is not supported; choose one of "
                     f"{sorted(FIELDS_BY_KIND)}")
  return ConditionSpec(fields=FIELDS_BY_KIND[kind], label_key=config.cond.label_key,
                       caption_key=config.cond.caption_key, tokenizer=tokenizer(config))
