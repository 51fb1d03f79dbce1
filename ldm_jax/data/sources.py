"""Where the images come from: one random-access source per (DataSpec, split), and the check.

The settings are a `spec.DataSpec` (built once from `config.data` at the top of a run);
this module uses source, path, split, val_split, val_fraction, data_dir, download,
image_key and the decoding bounds, and `check_data` checks batch_size against the number
of hosts and, for text runs on a folder, allow_empty_captions.

Sources return records undecoded (file paths, encoded bytes, arrays or dicts: TFDS
features, ArrayRecord msgpack maps): the pipeline decodes them, so a broken file is
skipped there instead of failing a run here. Everything that is wrong with the data
itself fails in `check_data`, before compilation (what is wrong with the values alone
already failed in `DataSpec`), including a first record that lacks a key the run reads.

An ArrayRecord record is either the encoded image itself (JPEG, PNG, WebP bytes) or a
msgpack map (`flax.serialization.msgpack_serialize` or any msgpack writer) with string
keys: the encoded image under `data.image_key`, and the caption (text) / class label
(int) under the config's `cond.caption_key` / `cond.label_key`. msgpack rather than a
`tf.train.Example`: reading it needs no TensorFlow (in the training process and every
grain worker), msgpack ships with flax, and every language has a writer for it.

An image folder's files with other extensions are counted (`ignored_files`) and logged
once per folder; a `.txt` caption beside an image is expected and not counted.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import os
from typing import Any, Sequence

from ldm_jax import fs
from ldm_jax.data import builtin, images
from ldm_jax.data.conditions import ConditionSpec, FieldReader
from ldm_jax.data.spec import SOURCES, DataSpec  # noqa: F401 (SOURCES: the old home)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_PROBE_RECORDS = 16


@dataclasses.dataclass(frozen=True)
class Source:
  """Random access (len + getitem) to the records of one split, with a name for logs.

  `indices` selects a subset of `records` (a held-out or remaining share); None = all.
  """

  records: Any
  label: str
  indices: Sequence[int] | None = None
  folder_root: str | None = None  # image folders: where class subfolders are counted from

  def __len__(self) -> int:
    return len(self.records if self.indices is None else self.indices)

  def __getitem__(self, index: int) -> Any:
    return self.records[index if self.indices is None else int(self.indices[index])]

  def __repr__(self) -> str:
    return f"Source({self.label}, {len(self)} records)"


def make_source(data: DataSpec, split: str) -> Source:
  """The records of `split` for `data.source`; raises ValueError with the fix."""
  if not isinstance(data, DataSpec):
    # A ConfigDict has the same attribute names, so without this it would fail far from
    # here (or, for a block lacking later keys, silently differ); every data function
    # comes through this one.
    raise TypeError(f"the data functions take a DataSpec, got {type(data).__name__}: pass "
                    f"ldm_jax.data.spec.DataSpec.from_config(config.data)")
  # DataSpec only admits SOURCES, so this lookup cannot miss.
  return _MAKERS[data.source](data, split)


def check_data(data: DataSpec, *, process_count: int | None = None,
               conditions: ConditionSpec | None = None) -> None:
  """Fails fast, with what is wrong and how to fix it, on data that cannot train.

  Both splits must exist and be non-empty, every host needs at least one training record,
  the first training record must hold what the run reads (the image key of a map record,
  the `conditions` fields), and among the first training records at least one must
  decode as an image (a single broken file is skipped later, but a path full of
  non-images is a config error). A text-conditioned run on an image folder needs `.txt`
  captions, unless `data.allow_empty_captions`.
  """
  if process_count is None:
    import jax
    process_count = jax.process_count()
  if data.batch_size % process_count:
    raise ValueError(f"data.batch_size={data.batch_size} must be a positive multiple of the "
                     f"number of processes ({process_count})")
  splits = {split: make_source(data, split) for split in (data.split, data.val_split)}
  for split, source in splits.items():
    if not len(source):
      raise ValueError(f"split {split!r} of {source.label} is empty; point data.path at "
                       f"data that has it, or set data.split / data.val_split")
  train = splits[data.split]
  if len(train) < process_count:
    raise ValueError(f"{train.label} has {len(train)} training records for {process_count} "
                     f"processes: every process needs at least one; use more data")
  if data.batch_size > len(train):
    logging.warning("data.batch_size=%d exceeds the %d training records of %s: batches "
                    "span epochs, so each batch repeats images", data.batch_size, len(train),
                    train.label)
  _check_first_record(train, data)
  _probe(train, data)
  if conditions is not None and conditions.fields:
    _check_conditions(train, data, conditions)
  logging.info("data: %s with %s", data.source,
               ", ".join(f"{k}={len(v)} records" for k, v in splits.items()))


def _probe(source: Source, data: DataSpec) -> None:
  """At least one of the first records decodes, else the path does not hold images."""
  errors = []
  for index in range(min(len(source), _PROBE_RECORDS)):
    try:
      images.decode_resized(source[index], 8, data.image_key, **data.decode_limits())
      return
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"{type(e).__name__}: {e}")
  what = (f"each record must be encoded image bytes or a msgpack map holding them under "
          f"data.image_key={data.image_key!r}" if data.source == "arrayrecord"
          else "does data.path hold images?")
  raise ValueError(f"none of the first {len(errors)} records of {source.label} decodes as an "
                   f"image (first error: {errors[0]}); {what}")


def _check_first_record(source: Source, data: DataSpec) -> None:
  """A map record (TFDS features, an ArrayRecord msgpack map) holds data.image_key."""
  record = source[0]
  if isinstance(record, dict) and data.image_key not in record:
    raise ValueError(f"record 0 of {source.label} has keys {sorted(record)} but no "
                     f"{data.image_key!r}: set --config.data.image_key to the key holding "
                     f"the encoded image")


def _check_conditions(source: Source, data: DataSpec, conditions: ConditionSpec) -> None:
  """The first record gives every condition field; an image folder has captions."""
  try:
    FieldReader(conditions, source.folder_root)(source[0])
  except (KeyError, TypeError, ValueError) as e:
    detail = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise ValueError(f"record 0 of {source.label}: {detail}") from None
  if source.folder_root is not None and {"tokens", "caption"} & set(conditions.fields):
    _check_captions(source.folder_root, data)


def _check_captions(root: str, data: DataSpec) -> None:
  """Without a single `.txt` caption a text model learns from empty prompts only, which
  is almost surely a wrong folder; a few missing ones are logged."""
  files, _, captioned = _scan(root)
  if captioned == 0 and not data.allow_empty_captions:
    raise ValueError(f"none of the {plural(len(files), 'image')} under {root!r} has a "
                     f"caption (a .txt file of the same name beside it), so this "
                     f"text-conditioned run would train on empty captions only: add the "
                     f".txt files, or set --config.data.allow_empty_captions=True if that "
                     f"is meant")
  if captioned < len(files):
    logging.warning("%d of the %s under %r have no .txt caption: they train with an empty "
                    "one", len(files) - captioned, plural(len(files), "image"), root)


def _unknown_split(split: str, data: DataSpec, label: str) -> ValueError:
  return ValueError(f"{label} has no split {split!r}: use data.split={data.split!r} or "
                    f"data.val_split={data.val_split!r}")


def _builtin(data: DataSpec, split: str) -> Source:
  names = {data.split: "train", data.val_split: "validation",
           "train": "train", "validation": "validation"}
  if split not in names:
    raise _unknown_split(split, data, "the builtin source")
  return Source(builtin.BuiltinSource(names[split]), f"builtin:{names[split]}")


@functools.cache
def list_images(root: str) -> tuple[str, ...]:
  """Image files under `root`, recursively, sorted; hidden files and folders are skipped.

  Cached: listing a million-file folder is slow and every split asks for it.
  """
  return _scan(root)[0]


# fs.absolute(root) (a gs:// URL as it is) -> the extensions of the files under it that
# list_images left out.
_ignored: dict[str, dict[str, int]] = {}


@functools.cache
def _scan(root: str) -> tuple[tuple[str, ...], dict[str, int], int]:
  """(sorted image files, {extension: count} of other files, how many of the images have
  a `.txt` caption) under `root`; logs the other files.

  Other files are those with an extension not in IMAGE_EXTENSIONS, except hidden ones and
  `.txt` captions beside an image of the same name (what conditions.py reads).
  """
  found, ignored, captioned = [], collections.Counter(), 0
  for folder, subfolders, files in fs.walk(root, followlinks=True):  # local or gs://
    subfolders[:] = [d for d in subfolders if not d.startswith(".")]
    names = [os.path.splitext(f) for f in files if not f.startswith(".")]
    stems = {stem for stem, ext in names if ext.lower() in IMAGE_EXTENSIONS}
    captions = {stem for stem, ext in names if ext == ".txt"}
    for stem, ext in names:
      if ext.lower() in IMAGE_EXTENSIONS:
        found.append(fs.join(folder, stem + ext))
        captioned += stem in captions
      elif not (ext == ".txt" and stem in stems):
        ignored[ext.lower() or "(no extension)"] += 1
  ignored = dict(ignored)
  _ignored[fs.absolute(root)] = ignored
  if ignored:
    logging.warning("folder %r: ignored %s with other extensions (%s); accepted: %s", root,
                    plural(sum(ignored.values()), "file"), format_counts(ignored),
                    " ".join(IMAGE_EXTENSIONS))
  return tuple(sorted(found)), ignored, captioned


def ignored_files() -> dict[str, int]:
  """{extension: count} of the files left out of every image folder listed so far in this
  process, largest count first (a folder inside another listed one is counted once)."""
  roots = sorted(_ignored)
  total = collections.Counter()
  for root in roots:
    if not any(root.startswith(other.rstrip(os.sep) + os.sep) for other in roots):
      total.update(_ignored[root])
  return dict(sorted(total.items(), key=lambda item: (-item[1], item[0])))


def plural(count: int, noun: str) -> str:
  return f"{count} {noun}{'' if count == 1 else 's'}"


def format_counts(counts: dict[str, int]) -> str:
  """".gif 3, .txt 2": largest count first."""
  return ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda i: (-i[1], i[0])))


def held_out(keys: Sequence[str], fraction: float) -> frozenset[str]:
  """A deterministic share of `keys` (at least one): those with the smallest hashes.

  Hash-based rather than positional, so adding images to a folder keeps almost all earlier
  choices and the validation set does not drift into the training set.
  """
  count = max(1, round(fraction * len(keys)))
  return frozenset(sorted(keys, key=lambda k: hashlib.md5(k.encode()).hexdigest())[:count])


def _folder(data: DataSpec, split: str) -> Source:
  """`path/<split>/` when it exists, else a hash-chosen share of the training images."""
  root = data.path
  root = root if fs.is_remote(root) else os.path.expanduser(root)
  if not root:
    raise ValueError("data.source='folder' needs data.path: set --config.data.path=/dir/of/images")
  if not fs.isdir(root):
    raise ValueError(f"data.path={root!r} is not a directory (source 'folder'); point "
                     f"--config.data.path at a folder of .jpg/.jpeg/.png/.webp images")
  own = fs.join(root, split)
  if fs.isdir(own):
    return Source(_nonempty(own), f"folder {own!r}", folder_root=own)
  if split not in (data.split, data.val_split):
    raise _unknown_split(split, data, f"folder {root!r}")
  train_root = fs.join(root, data.split)
  base = train_root if fs.isdir(train_root) else root
  files = _nonempty(base)
  val_root = fs.join(root, data.val_split)
  if fs.isdir(val_root):  # here split is the training split: all but the val folder
    sep = "/" if fs.is_remote(val_root) else os.sep
    return Source(tuple(f for f in files if not f.startswith(val_root + sep)),
                  f"folder {base!r}", folder_root=base)
  val = held_out([fs.relpath(f, base) for f in files], data.val_fraction)
  want_val = split == data.val_split
  return Source(tuple(f for f in files if (fs.relpath(f, base) in val) == want_val),
                f"{'held-out' if want_val else 'remaining'} share of folder {base!r}",
                folder_root=base)


def _nonempty(root: str) -> tuple[str, ...]:
  files, ignored, _ = _scan(root)
  if not files:
    others = f" (only other files: {format_counts(ignored)})" if ignored else ""
    raise ValueError(f"no .jpg/.jpeg/.png/.webp files under {root!r}{others}; point data.path "
                     f"at a folder of images (searched recursively)")
  return files


def _arrayrecord(data: DataSpec, split: str) -> Source:
  import grain
  pattern = data.path
  if not pattern:
    raise ValueError("data.source='arrayrecord' needs data.path: a file or glob of ArrayRecord "
                     "files, e.g. --config.data.path='/data/images-{split}-*.array_record'")
  has_split = "{split}" in pattern
  if not has_split and split not in (data.split, data.val_split):
    raise _unknown_split(split, data, f"ArrayRecord files {pattern!r}")
  resolved = pattern.replace("{split}", split)
  paths = _glob(resolved)
  if not paths:
    raise ValueError(f"no ArrayRecord files match data.path={resolved!r}; check the path "
                     f"(a '{{split}}' in it is replaced by the split name)")
  records = RecordValues(grain.sources.ArrayRecordDataSource(paths))
  label = f"ArrayRecord files {resolved!r}"
  if has_split:
    return Source(records, label)
  # One set of files for both splits: every k-th record is held out (k = 1 / val_fraction).
  import numpy as np
  step = max(2, round(1.0 / data.val_fraction))
  positions = np.arange(len(records))
  is_val = positions % step == step - 1
  if not is_val.any():
    is_val[-1] = True
  want_val = split == data.val_split
  return Source(records, f"{'held-out' if want_val else 'remaining'} share of {label}",
                positions[is_val == want_val])


# The first byte of a msgpack map (fixmap, map 16, map 32). A PNG's first byte, 0x89, is a
# fixmap's too: its full signature is checked first.
_MSGPACK_MAP_BYTES = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record_value(raw: bytes) -> bytes | dict:
  """An ArrayRecord record as the pipeline reads it: a msgpack map with string keys as a
  dict (its arrays, as flax.serialization writes them, as numpy arrays), anything else as
  the bytes of an encoded image."""
  if not raw or raw[0] not in _MSGPACK_MAP_BYTES or raw.startswith(_PNG_SIGNATURE):
    return raw
  from flax import serialization
  try:
    value = serialization.msgpack_restore(raw)
  except Exception:  # pylint: disable=broad-except  # not msgpack: image bytes, or junk
    return raw
  if isinstance(value, dict) and all(isinstance(k, str) for k in value):
    return value
  return raw


class RecordValues:
  """Random access to ArrayRecord records as `record_value`s; picklable for grain's
  worker processes as the ArrayRecord source is."""

  def __init__(self, records):
    self.records = records

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int):
    return record_value(self.records[index])


def _glob(pattern: str) -> list[str]:
  """Sorted matching files, local or gs:// (ldm_jax.fs; array_record reads gs:// itself)."""
  return fs.glob(pattern)


def _tfds(data: DataSpec, split: str) -> Source:
  """A TFDS dataset in array_record format, read without TensorFlow; downloaded and
  prepared in data_dir first when it is not there and `data.download` allows it.

  Reading never reaches the network (`tfds.data_source` with download=False): only the
  explicit preparation does, so an offline failure is reported as one, with how to
  prepare the dataset elsewhere.
  """
  import tensorflow_datasets as tfds
  name = data.path
  data_dir = data.data_dir or None
  where = f"data_dir={data_dir!r}" if data_dir else "the default TFDS data_dir"
  how = (f"prepare it on a machine with network access (`tfds build {name or 'NAME'} "
         f"--file_format=array_record --data_dir=DIR`; manual-download datasets such as "
         f"imagenet2012 need their archives in DIR/downloads/manual), copy DIR here and set "
         f"--config.data.data_dir=DIR")
  if not name:
    raise ValueError(f"data.source='tfds' needs data.path=<dataset name>; {how}")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"TFDS dataset {name!r} is neither a registered dataset nor prepared in "
                     f"{where}; {how}") from e
  if not builder.is_prepared():
    if not data.download:
      raise ValueError(f"TFDS dataset {name!r} is not prepared in {where} and "
                       f"data.download=False; {how} (or set data.download=True where the "
                       f"machine can download)")
    _download_and_prepare(builder, name, data_dir, where, how)
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(f"TFDS dataset {name!r} in {where} is stored as "
                     f"{builder.info.file_format.value}, but random access needs array_record: "
                     f"rebuild it with `tfds build {name} --file_format=array_record`")
  try:
    builder.info.splits[split]
  except (KeyError, ValueError) as e:
    raise ValueError(f"TFDS dataset {name!r} has splits {sorted(builder.info.splits)}, not "
                     f"{split!r}; set data.split / data.val_split") from e
  image_key = data.image_key
  if image_key not in builder.info.features:
    raise ValueError(f"TFDS dataset {name!r} has features {sorted(builder.info.features)}, no "
                     f"{image_key!r}; set data.image_key to the image feature")
  records = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                             decoders={image_key: tfds.decode.SkipDecoding()})
  return Source(records, f"tfds:{name}/{split}")


def _download_and_prepare(builder, name: str, data_dir: str | None, where: str,
                          how: str) -> None:
  """Downloads and prepares `builder`'s dataset as array_record, or fails in one line."""
  import jax
  if jax.process_count() > 1 and fs.is_remote(data_dir or ""):
    # Every host would prepare the same shared folder at once.
    raise ValueError(f"TFDS dataset {name!r} is not prepared in {where}, which the "
                     f"{jax.process_count()} processes share: prepare it once before the "
                     f"run ({how})")
  logging.warning("TFDS dataset %r is not prepared in %s: downloading and preparing it "
                  "(data.download=True). Offline, TFDS retries for about 3 minutes before "
                  "giving up; data.download=False fails at once", name, where)
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception as e:  # pylint: disable=broad-except  # network, disk, manual archives
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
      cause = cause.__cause__ or cause.__context__
    detail = " ".join(str(cause).split())[:300]
    raise ValueError(f"TFDS dataset {name!r} could not be downloaded and prepared in {where} "
                     f"({type(cause).__name__}: {detail}); if this machine cannot download, "
                     f"{how}") from e


# data.source -> the function making its Source (spec.SOURCES names the same keys).
_MAKERS = {"builtin": _builtin, "folder": _folder, "arrayrecord": _arrayrecord, "tfds": _tfds}
