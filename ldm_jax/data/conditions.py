"""What an LDM is conditioned on, read from each record next to its image.

Fields:
  label    int32 class id: a record's `label_key` (TFDS, ArrayRecord msgpack maps, the
           built-in photos), or for an image folder the index of the image's first-level
           subfolder among the sorted subfolders (the ImageFolder convention)
  tokens   int32 [max_length] token ids of the caption: a record's `caption_key`, or for an
           image folder the text of a `.txt` file with the same stem (empty if none;
           `sources.check_data` refuses a folder without any)

Readers are plain picklable objects, so grain worker processes can run them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from ldm_jax import fs

# "caption" is the raw text (a numpy string), for evaluations that tokenize it their own
# way (the CLIP score); no training batch carries it.
FIELDS = ("label", "tokens", "caption")


@dataclasses.dataclass(frozen=True)
class ConditionSpec:
  """Which fields a batch carries, where they are in a record, and the tokenizer."""

  fields: tuple[str, ...] = ()
  label_key: str = "label"
  caption_key: str = "caption"
  tokenizer: Any = None  # ldm_jax.data.tokenizer.*; needed for "tokens"

  def __post_init__(self):
    unknown = sorted(set(self.fields) - set(FIELDS))
    if unknown:
      raise ValueError(f"unknown condition fields {unknown}; choose from {FIELDS}")
    if "tokens" in self.fields and self.tokenizer is None:
      raise ValueError("the 'tokens' field needs a tokenizer (ldm_jax.data.tokenizer)")


class FieldReader:
  """record -> {field: array} for one source; `blank()` fills masked-out padding examples."""

  def __init__(self, spec: ConditionSpec, folder_root: str | None = None):
    self.spec = spec
    self.folder_root = folder_root
    self.classes: Sequence[str] = ()
    if folder_root is not None and "label" in spec.fields:
      self.classes = sorted(d for d in fs.listdir(folder_root)
                            if fs.isdir(fs.join(folder_root, d))
                            and not d.startswith("."))
      if not self.classes:
        raise ValueError(f"class labels from an image folder need one subfolder per class "
                         f"under {folder_root!r}; found none")

  def __call__(self, record: Any) -> dict:
    out = {}
    if "label" in self.spec.fields:
      out["label"] = np.int32(self._label(record))
    if "tokens" in self.spec.fields:
      out["tokens"] = self.spec.tokenizer([self._caption(record)])[0]
    if "caption" in self.spec.fields:
      out["caption"] = np.str_(self._caption(record))
    return out

  def blank(self) -> dict:
    out = {}
    if "label" in self.spec.fields:
      out["label"] = np.int32(0)
    if "tokens" in self.spec.fields:
      out["tokens"] = self.spec.tokenizer([""])[0]
    if "caption" in self.spec.fields:
      out["caption"] = np.str_("")
    return out

  def _label(self, record: Any) -> int:
    if isinstance(record, dict):
      if self.spec.label_key not in record:
        raise KeyError(f"no {self.spec.label_key!r} key (the record has {sorted(record)}): "
                       f"set cond.label_key to the key of the class label")
      return int(record[self.spec.label_key])
    if isinstance(record, (str, os.PathLike)) and self.folder_root is not None:
      sep = "/" if fs.is_remote(record) else os.sep
      first = fs.relpath(record, self.folder_root).split(sep)[0]
      if first not in self.classes:
        raise ValueError(f"{record} is not inside a class subfolder of {self.folder_root}")
      return self.classes.index(first)
    raise _image_only(record, "class label", "label_key")

  def _caption(self, record: Any) -> str:
    if isinstance(record, dict):
      if self.spec.caption_key not in record:
        raise KeyError(f"no {self.spec.caption_key!r} key (the record has {sorted(record)}): "
                       f"set cond.caption_key to the key of the caption")
      text = record[self.spec.caption_key]
      return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    if isinstance(record, (str, os.PathLike)):
      sidecar = os.path.splitext(os.fspath(record))[0] + ".txt"
      if fs.isfile(sidecar):  # local or gs://
        return fs.read_bytes(sidecar).decode("utf-8", "replace").strip()
      return ""
    raise _image_only(record, "caption", "caption_key")


def _image_only(record: Any, what: str, key: str) -> TypeError:
  return TypeError(f"a record of {type(record).__name__} holds an image and no {what}: "
                   f"write records as maps with the {what} under cond.{key} (ArrayRecord: "
                   f"msgpack maps, see the README's Data section)")
