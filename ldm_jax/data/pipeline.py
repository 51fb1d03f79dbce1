"""grain pipelines for first-stage training: an endless checkpointable stream and a finite eval pass.

Both take a `spec.DataSpec` (the settings, read once from `config.data`); sources.py
uses the fields that choose the data, this module image_size, random_crop, random_flip,
num_workers, read_threads and the decoding bounds (max_aspect_ratio, max_image_pixels).

Determinism: the shuffle order and each example's crop and flip are functions of the seed,
the host and the example's position in the stream (grain's `shuffle` / `random_map`), so a
restored iterator produces the batches an uninterrupted run would have produced. The
stream is only reproducible for the same `num_workers` and number of hosts.

Skipped records: a record that does not decode, or that is out of the decoding bounds
(images.SKIP_REASONS: "undecodable", "aspect ratio", "too many pixels"), is logged once
per file and process with its reason and becomes a marker {"skipped": counts by reason}
in place of the example. A pass right after (in the worker, when there are workers) drops
the markers and writes their counts into the next example. The counts ride along in the
batch to the training process, which adds them up for `skipped_records()` /
`skipped_by_reason()` and removes them from the batch, so counts from worker processes
are not lost. They are per process, count a bad record again in every epoch, and restart
at 0 when the process restarts. `data_report()` puts them, with the files the folder
source ignored, into one line for the trainers' console log.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Iterator

import grain
import numpy as np

from ldm_jax.data import images, sources
from ldm_jax.data.conditions import ConditionSpec, FieldReader
from ldm_jax.data.sources import make_source
from ldm_jax.data.spec import DataSpec

_SKIPPED = "skipped"  # int32 [len(REASONS)]: records dropped before this one, by reason
REASONS = images.SKIP_REASONS
_lock = threading.Lock()
_skipped = dict.fromkeys(REASONS, 0)
_warned: set[str] = set()


def skipped_records() -> int:
  """Records dropped so far by this process's pipelines (train and eval), for any reason."""
  return sum(_skipped.values())


def skipped_by_reason() -> dict[str, int]:
  """`skipped_records()` by reason: every one of REASONS, in that order, zeros included."""
  with _lock:
    return dict(_skipped)


def data_report() -> str:
  """One line for the console log: what was skipped and ignored so far, "" if nothing.

  For example "skipped 3 records (undecodable 1, aspect ratio 2); ignored 5 files (.gif 3,
  .txt 2)": records dropped by this process's pipelines (a bad file again in every
  epoch), and files under the image folders listed so far whose extension is not read.
  """
  parts = []
  skipped = skipped_by_reason()
  if sum(skipped.values()):
    parts.append(f"skipped {sources.plural(sum(skipped.values()), 'record')} ("
                 + ", ".join(f"{r} {n}" for r, n in skipped.items() if n) + ")")
  ignored = sources.ignored_files()
  if ignored:
    parts.append(f"ignored {sources.plural(sum(ignored.values()), 'file')} "
                 f"({sources.format_counts(ignored)})")
  return "; ".join(parts)


def _add_skipped(counts: np.ndarray) -> None:
  counts = np.asarray(counts).reshape(-1, len(REASONS)).sum(axis=0)
  if counts.any():
    with _lock:
      for reason, count in zip(REASONS, counts):
        _skipped[reason] += int(count)


def _counts(reason: str | None = None) -> np.ndarray:
  counts = np.zeros(len(REASONS), np.int32)
  if reason is not None:
    counts[REASONS.index(reason)] = 1
  return counts


def _warn_once(name: str, skip: images.SkippedImage) -> None:
  with _lock:
    if name in _warned:
      return
    _warned.add(name)
  logging.warning("skipping image %s: %s", name, skip)


class Decode(grain.transforms.MapWithIndex):
  """Record -> {"image": uint8 [H, W, 3], shorter side image_size}, or for a record that
  is skipped a marker {_SKIPPED: counts} without "image" (dropped by DropUndecodable).

  Runs on source indices (before shuffling), so a warning names the file or the record.
  """

  def __init__(self, image_size: int, label: str, image_key: str = "image",
               fields: FieldReader | None = None, limits: dict | None = None):
    self.image_size = image_size
    self.label = label
    self.image_key = image_key
    self.fields = fields
    self.limits = limits or {}  # max_aspect_ratio, max_image_pixels

  def conditions(self, record: Any) -> dict:
    return self.fields(record) if self.fields is not None else {}

  def decode(self, index: int, record: Any) -> np.ndarray:
    """The resized pixels; raises SkippedImage (logged once per file) with the reason."""
    try:
      return images.decode_resized(record, self.image_size, self.image_key, **self.limits)
    except images.SkippedImage as e:
      skip = e
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds
      skip = images.SkippedImage(images.UNDECODABLE, f"{type(e).__name__}: {e}")
    _warn_once(record if isinstance(record, str) else f"{self.label} record {index}", skip)
    raise skip

  def map_with_index(self, index: int, element: Any) -> dict:
    try:
      pixels = self.decode(index, element)
    except images.SkippedImage as e:
      return {_SKIPPED: _counts(e.reason)}
    return {"image": pixels, **self.conditions(element)}


class DecodeOrBlank(Decode):
  """For evaluation: the center `crop_size` crop (default: the decoded shorter side); a
  skipped record becomes a masked-out blank example."""

  def __init__(self, *args, crop_size: int | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    self.crop_size = crop_size or self.image_size

  def map_with_index(self, index: int, element: Any) -> dict:
    try:
      pixels = self.decode(index, element)
    except images.SkippedImage as e:
      return blank(self.crop_size, self.fields, skipped=e.reason)
    crop = images.center_crop(pixels, self.crop_size)
    return {"image": images.to_float(crop), **self.conditions(element), "mask": np.True_,
            _SKIPPED: _counts()}


def blank(image_size: int, fields: FieldReader | None = None,
          skipped: str | None = None) -> dict:
  """A masked-out example; `skipped`: the reason it stands in for a skipped record."""
  return {"image": np.zeros((image_size, image_size, 3), np.float32),
          **(fields.blank() if fields is not None else {}), "mask": np.False_,
          _SKIPPED: _counts(skipped)}


class Augment(grain.transforms.RandomMap):
  """Square crop (random or center), optional horizontal flip and channel order, to
  float32 in [-1, 1]."""

  def __init__(self, image_size: int, random_crop: bool, random_flip: bool,
               random_channel_order: bool = False):
    self.image_size = image_size
    self.random_crop = random_crop
    self.random_flip = random_flip
    self.random_channel_order = random_channel_order

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    if "image" not in element:  # a skipped record's marker, passed on to be counted
      return element
    pixels = element["image"]
    if self.random_crop:
      pixels = images.random_crop(pixels, self.image_size, rng)
    else:
      pixels = images.center_crop(pixels, self.image_size)
    if self.random_flip and rng.random() < 0.5:
      pixels = pixels[:, ::-1]
    if self.random_channel_order:
      pixels = pixels[..., rng.permutation(3)]
    return {**element, "image": images.to_float(pixels)}


class DropUndecodable(grain.IterDataset):
  """Drops skipped records' markers (and None elements) and records in the next element
  how many were dropped, by reason.

  `limit` bounds a run of consecutive drops: an endless stream whose records all fail to
  decode would otherwise spin forever instead of failing.
  """

  def __init__(self, parent: grain.IterDataset, limit: int):
    super().__init__(parent)
    self.limit = limit

  def __iter__(self) -> grain.DatasetIterator:
    return _DropUndecodableIterator(self._parent.__iter__(), self.limit)


class _DropUndecodableIterator(grain.DatasetIterator):
  """Stateless beyond its parent: between two outputs nothing is pending."""

  def __init__(self, parent: grain.DatasetIterator, limit: int):
    super().__init__(parent)
    self._limit = limit

  def __next__(self) -> dict:
    dropped = _counts()
    while True:
      element = next(self._parent)
      if element is not None and "image" in element:
        return {**element, _SKIPPED: dropped}
      dropped += _counts(images.UNDECODABLE) if element is None else element[_SKIPPED]
      if dropped.sum() >= self._limit:
        reasons = ", ".join(f"{r} {n}" for r, n in zip(REASONS, dropped) if n)
        raise RuntimeError(f"{dropped.sum()} records in a row could not be decoded ({reasons}); "
                           f"the data holds no usable images (see the warnings above; "
                           f"data.max_aspect_ratio and data.max_image_pixels bound what is "
                           f"decoded)")

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)


class CountSkipped(grain.transforms.Map):
  """In the consuming process: moves the batch's drop counts into `skipped_by_reason()`."""

  def map(self, batch: dict) -> dict:
    batch = dict(batch)
    _add_skipped(batch.pop(_SKIPPED))
    return batch


def _hosts(process_index: int | None, process_count: int | None) -> grain.sharding.ShardOptions:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count)


def _local_batch(batch_size: int, hosts: grain.sharding.ShardOptions) -> int:
  if batch_size <= 0 or batch_size % hosts.shard_count:
    raise ValueError(f"the global batch size {batch_size} must be a positive multiple of the "
                     f"number of processes ({hosts.shard_count})")
  return batch_size // hosts.shard_count


def _read_options(data: DataSpec, local_batch: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=data.read_threads,
                           prefetch_buffer_size=max(2 * local_batch, 16))


def _reader(conditions: ConditionSpec | None, source) -> FieldReader | None:
  if conditions is None or not conditions.fields:
    return None
  return FieldReader(conditions, source.folder_root)


def train_iterator(data: DataSpec, *, global_batch_size: int, seed: int,
                   process_index: int | None = None, process_count: int | None = None,
                   conditions: ConditionSpec | None = None) -> grain.DatasetIterator:
  """Endless shuffled batches {"image": float32 [b, S, S, 3]} of this host's shard, plus
  the `conditions` fields ("label" [b], "tokens" [b, L]) when asked for.

  b = global_batch_size // process_count; process index and count default to JAX's. Hosts
  take disjoint strided shards of the split (record i goes to host i % process_count);
  each host shuffles its shard anew every epoch and batches across epoch boundaries, so
  no epoch is ever too small for a batch. The returned grain iterator has
  get_state()/set_state(); `iterator_save_args` / `iterator_restore_args` put it in an
  orbax checkpoint.
  """
  hosts = _hosts(process_index, process_count)
  local_batch = _local_batch(global_batch_size, hosts)
  source = make_source(data, data.split)
  size = data.image_size
  ds = grain.MapDataset.source(source).map_with_index(
      Decode(data.resize_to, source.label, data.image_key, _reader(conditions, source),
             data.decode_limits()))
  ds = ds[hosts.shard_index::hosts.shard_count]
  if not len(ds):
    raise ValueError(f"{source.label} has no records for process {hosts.shard_index} of "
                     f"{hosts.shard_count}; run sources.check_data first")
  shard_size = len(ds)
  shuffle_seed, augment_seed = np.random.SeedSequence(
      [seed, hosts.shard_index]).generate_state(2)
  ds = ds.shuffle(seed=int(shuffle_seed)).repeat()
  ds = ds.random_map(Augment(size, data.random_crop, data.random_flip,
                             data.random_channel_order), seed=int(augment_seed))
  it = ds.to_iter_dataset(_read_options(data, local_batch), allow_nones=True)
  # Any window of two epochs holds every record, so this many drops in a row means none
  # decodes.
  it = DropUndecodable(it, limit=2 * shard_size + 1)
  it = it.batch(local_batch, drop_remainder=True)
  if data.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
  return iter(it.map(CountSkipped()))


def eval_batches(data: DataSpec, split: str, *, batch_size: int, max_examples: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 conditions: ConditionSpec | None = None) -> Iterator[dict]:
  """One deterministic pass over the first `max_examples` records of `split` (all if None).

  Yields {"image": float32 [b, S, S, 3], "mask": bool [b]} with b = batch_size //
  process_count: center crops, no flip, no shuffle, host i taking records i, i +
  process_count, ... Batches always have b examples; the last ones are padded with blank
  images whose mask is False, and every host yields the same number of batches, so the
  batches can go through `jax.make_array_from_process_local_data` and a compiled step of
  one shape. A skipped record is masked out the same way (and counted). Errors in
  the config raise here, not at the first batch.
  """
  hosts = _hosts(process_index, process_count)
  local_batch = _local_batch(batch_size, hosts)
  source = make_source(data, split)
  size = data.image_size
  total = len(source) if max_examples is None else min(len(source), int(max_examples))
  if not total:
    return iter(())
  reader = _reader(conditions, source)
  ds = grain.MapDataset.source(source).map_with_index(
      DecodeOrBlank(data.resize_to, source.label, data.image_key, reader,
                    data.decode_limits(), crop_size=size))
  ds = ds[:total][hosts.shard_index::hosts.shard_count]
  per_host = -(-total // hosts.shard_count)
  padding = -(-per_host // local_batch) * local_batch - len(ds)
  if padding:
    pad = grain.MapDataset.range(padding).map(functools.partial(_blank_for, size, reader))
    ds = grain.MapDataset.concatenate([ds, pad]) if len(ds) else pad
  it = ds.to_iter_dataset(_read_options(data, local_batch))
  return iter(it.batch(local_batch).map(CountSkipped()))


def _blank_for(image_size: int, reader: FieldReader | None, _: int) -> dict:
  return blank(image_size, reader)


def iterator_save_args(iterator: grain.DatasetIterator):
  """orbax args saving a grain iterator's state (one JSON file per process)."""
  return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator):
  """orbax args restoring into `iterator` in place (it is also returned by the restore)."""
  return grain.checkpoint.CheckpointRestore(iterator)
