"""A dataset encoded once by the frozen first stage, so LDM training reads latents.

Encoding every image at every step costs a full encoder pass (for kl-f8 at 256 px more
FLOPs than a small UNet step). The cache stores, per image, the posterior's `mean` and
`logvar` (KL: training draws a fresh sample each step, as it would from images) or the
pre-quantization latent as `mean` (VQ), plus the condition fields ("label", "tokens") and,
for a Stable Diffusion fine-tune with a frozen text encoder, the encoder's output per
caption ("context", float32 [77, width]: 236 KB an image for SD1), so that training never
runs the encoder.
Images are center-cropped and not flipped: augmentation is fixed at caching time.

Layout: `DIR/{split}-{process:05d}-of-{count:05d}.array_record`, one file per host, each
record a msgpack dict of arrays (flax.serialization). The folder is marked as a latent
cache when first used (ldm_jax.outputs; a folder holding anything else is refused unless
overwrite=True, and then only same-named shards are replaced) and reused after; every
shard is written to a temporary name and renamed when complete, so a crash never leaves a
truncated shard. DIR may be gs://: a shard is written locally, then uploaded in one piece
(ldm_jax.outputs), and read back by array_record directly from GCS.
"""

from __future__ import annotations

from typing import Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from ldm_jax import fs, outputs
from ldm_jax.data.conditions import ConditionSpec
from ldm_jax.data.pipeline import eval_batches
from ldm_jax.data.spec import DataSpec
from ldm_jax.models.distributions import DiagonalGaussian


def moments(model, x: jax.Array) -> dict:
  """What the cache keeps of a batch of images."""
  if model.spec.kind == "kl":
    posterior: DiagonalGaussian = model.encode(x)
    return {"mean": posterior.mean, "logvar": posterior.logvar}
  return {"mean": model.encode(x)}


def sample_latents(batch: dict, key: jax.Array) -> jax.Array:
  """Unscaled latents from cached moments: a posterior sample for KL, `mean` for VQ."""
  if "logvar" not in batch:
    return batch["mean"]
  posterior = DiagonalGaussian(mean=jnp.asarray(batch["mean"], jnp.float32),
                               logvar=jnp.asarray(batch["logvar"], jnp.float32))
  return posterior.sample(key)


def shard_path(directory: str, split: str, process: int, count: int) -> str:
  return fs.join(directory, f"{split}-{process:05d}-of-{count:05d}.array_record")


def check_cache_dir(directory: str, *, overwrite: bool = False) -> None:
  """Fails (outputs.OutputError) before any encoding when `directory` cannot hold a cache:
  an existing cache is reused, an empty or missing folder is fine, anything else needs
  `overwrite`."""
  outputs.check_target(directory, outputs.LATENT_CACHE, overwrite=overwrite)


def write_cache(model, data: DataSpec, split: str, directory: str, *, batch_size: int,
                conditions: ConditionSpec | None = None,
                max_examples: int | None = None, derived=None, encode_fields=None,
                overwrite: bool = False) -> int:
  """Encodes `split` into this host's shard of `directory`; returns the examples written.

  `derived(images) -> {name: array}`: more per-image arrays to keep, computed from the
  same crops (the low-res inputs of a super-resolution model). `encode_fields(fields) ->
  {name: array}`: more per-record arrays computed from the condition fields (a frozen text
  encoder's "context" from "tokens"). `overwrite`: see `check_cache_dir`.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  outputs.prepare_directory(directory, outputs.LATENT_CACHE, overwrite=overwrite)
  encode = jax.jit(lambda x: {**moments(model, x), **(derived(x) if derived else {})})
  path = shard_path(directory, split, jax.process_index(), jax.process_count())
  written = 0
  with outputs.atomic_path(path, outputs.LATENT_CACHE) as tmp:
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    try:
      for batch in eval_batches(data, split, batch_size=batch_size,
                                max_examples=max_examples, process_index=jax.process_index(),
                                process_count=jax.process_count(), conditions=conditions):
        stats = jax.device_get(encode(batch["image"]))
        fields = {k: v for k, v in batch.items() if k not in ("image", "mask")}
        if encode_fields is not None:
          fields.update(jax.device_get(encode_fields(fields)))
        for i in np.flatnonzero(batch["mask"]):
          record = {k: np.asarray(v[i]) for k, v in {**stats, **fields}.items()}
          writer.write(serialization.msgpack_serialize(record))
          written += 1
    finally:
      writer.close()
  if not written:
    fs.remove(path)
    raise ValueError(f"no decodable images in split {split!r}; nothing cached")
  return written


def cache_files(directory: str, split: str) -> list[str]:
  files = fs.glob(fs.join(directory, f"{split}-*-of-*.array_record"))
  if not files:
    raise FileNotFoundError(f"no latent cache for split {split!r} in {directory!r}; make it "
                            f"with `python -m ldm_jax.cache_latents --config=... "
                            f"--out={directory}`")
  return files


class _Deserialize(grain.transforms.Map):

  def map(self, record: bytes) -> dict:
    return serialization.msgpack_restore(record)


def latent_iterator(directory: str, split: str, *, global_batch_size: int, seed: int,
                    process_index: int | None = None,
                    process_count: int | None = None) -> grain.DatasetIterator:
  """Endless shuffled batches of cached moments and fields for this host (checkpointable,
  like the image pipeline's iterator)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"the global batch size {global_batch_size} must be a multiple of the "
                     f"number of processes ({process_count})")
  source = grain.sources.ArrayRecordDataSource(cache_files(directory, split))
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if not len(ds):
    raise ValueError(f"the latent cache {directory!r} has no records for process "
                     f"{process_index} of {process_count}")
  shuffle_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
  ds = ds.shuffle(seed=shuffle_seed).repeat().map(_Deserialize())
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=16))
  return iter(it.batch(global_batch_size // process_count, drop_remainder=True))


def read_all(directory: str, split: str) -> Iterator[dict]:
  """Every cached record of `split`, in file order (for tests and inspection)."""
  source = grain.sources.ArrayRecordDataSource(cache_files(directory, split))
  for i in range(len(source)):
    yield serialization.msgpack_restore(source[i])
