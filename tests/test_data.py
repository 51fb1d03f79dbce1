"""The input pipeline on data made here: builtin photos, a temp folder, ArrayRecord, TFDS."""

import hashlib
import itertools
import io
import os

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from PIL import Image

from ldm_jax.data import builtin, images, pipeline, sources
from ldm_jax.data.spec import DataSpec

flags.FLAGS.mark_as_parsed()  # grain reads absl flags, also in its worker processes


def _config(**overrides):
  """The DataSpec of a data block as a config file holds it (the later keys defaulted)."""
  config = dict(source="builtin", path="", split="train", val_split="validation",
                image_size=32, batch_size=4, random_crop=True, random_flip=True,
                num_workers=0, seed=0)
  config.update(overrides)
  return DataSpec.from_config(ml_collections.ConfigDict(config))


def _digest(array):
  return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def _photo(rng, height, width):
  """A smooth random image: survives JPEG and resizing recognizably."""
  grid = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR))


def _encoded(pixels, fmt):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt)
  return buffer.getvalue()


def _write_mixed_images(folder, rng):
  """RGB PNG/JPEG/WEBP, grayscale, palette and RGBA images in nested folders, one corrupt."""
  os.makedirs(os.path.join(folder, "a", "b"), exist_ok=True)
  os.makedirs(os.path.join(folder, "c"), exist_ok=True)
  Image.fromarray(_photo(rng, 40, 52)).save(os.path.join(folder, "rgb.png"))
  Image.fromarray(_photo(rng, 48, 36)).save(os.path.join(folder, "a", "photo.JPG"))
  Image.fromarray(_photo(rng, 33, 45)).save(os.path.join(folder, "a", "b", "lossless.webp"),
                                            lossless=True)
  Image.fromarray(_photo(rng, 40, 40)[..., 0]).save(os.path.join(folder, "a", "gray.png"))
  Image.fromarray(_photo(rng, 36, 50)).quantize(16).save(os.path.join(folder, "c", "palette.png"))
  rgba = np.dstack([_photo(rng, 44, 38), np.full((44, 38), 200, np.uint8)])
  Image.fromarray(rgba, "RGBA").save(os.path.join(folder, "c", "alpha.png"))
  Image.fromarray(_photo(rng, 38, 38)).save(os.path.join(folder, "c", "photo.jpeg"))
  with open(os.path.join(folder, "a", "b", "corrupt.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
  with open(os.path.join(folder, "notes.txt"), "w") as f:
    f.write("not an image")
  Image.fromarray(_photo(rng, 40, 40)).save(os.path.join(folder, ".hidden.png"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """A folder with train/ (mixed formats, nested, one corrupt) and validation/ subfolders."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  _write_mixed_images(str(root / "train"), rng)
  os.makedirs(root / "validation")
  for i in range(3):
    Image.fromarray(_photo(rng, 40, 48)).save(root / "validation" / f"v{i}.png")
  return str(root)


# --- sources ---------------------------------------------------------------------------------

def test_builtin_tiles():
  train, val = builtin.load_tiles("train"), builtin.load_tiles("validation")
  assert len(train) >= 40 and len(val) >= 8
  for tile in train + val:
    assert tile.shape == (builtin.TILE, builtin.TILE, 3) and tile.dtype == np.uint8
  assert not {_digest(t) for t in train} & {_digest(t) for t in val}
  source = sources.make_source(_config(), "validation")
  assert len(source) == len(val) and np.array_equal(source[0]["image"], val[0])
  # Every tile knows its photo: a class label and a caption for conditioned demos.
  record = source[len(val) - 1]
  photo = builtin.PHOTOS[record["label"]]
  assert photo in builtin.VALIDATION_PHOTOS and record["caption"] == builtin.CAPTIONS[photo]
  assert set(builtin.CAPTIONS) == set(builtin.PHOTOS)
  with pytest.raises(ValueError, match="no split 'test'"):
    sources.make_source(_config(), "test")


def test_decode_converts_every_mode_to_rgb():
  gray = Image.fromarray(np.full((20, 30), 100, np.uint8))
  out = images.decode_resized(_encoded(np.asarray(gray), "PNG"), 10)
  assert out.shape == (10, 15, 3) and out.dtype == np.uint8 and np.all(out == 100)
  palette = Image.new("P", (16, 16))
  palette.putpalette([255, 0, 0] * 256)
  buffer = io.BytesIO()
  palette.save(buffer, format="PNG")
  assert np.all(images.decode_resized(buffer.getvalue(), 16) == [255, 0, 0])
  clear = np.zeros((16, 16, 4), np.uint8)  # fully transparent black -> white
  assert np.all(images.decode_resized(_encoded(clear, "PNG"), 16) == 255)
  cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
  buffer = io.BytesIO()
  cmyk.save(buffer, format="JPEG")
  assert np.all(images.decode_resized(buffer.getvalue(), 16) > 250)
  assert images.decode_resized(np.zeros((12, 12, 1), np.uint8), 8).shape == (8, 8, 3)


def test_folder_lists_images_recursively(image_folder):
  files = sources.list_images(os.path.join(image_folder, "train"))
  names = sorted(os.path.basename(f) for f in files)
  assert names == sorted(["rgb.png", "photo.JPG", "lossless.webp", "gray.png", "palette.png",
                          "alpha.png", "photo.jpeg", "corrupt.jpg"])
  assert list(files) == sorted(files)
  train = sources.make_source(_config(source="folder", path=image_folder), "train")
  val = sources.make_source(_config(source="folder", path=image_folder), "validation")
  assert len(train) == 8 and len(val) == 3


def test_folder_holds_out_a_validation_share(image_folder):
  flat = os.path.join(image_folder, "train")  # no train/ or validation/ inside
  config = _config(source="folder", path=flat, val_fraction=0.25)
  train = list(sources.make_source(config, "train").records)
  val = list(sources.make_source(config, "validation").records)
  assert len(val) == 2 and not set(train) & set(val)
  assert sorted(train + val) == list(sources.list_images(flat))
  assert val == list(sources.make_source(config, "validation").records)  # deterministic


def test_arrayrecord_source(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  rng = np.random.default_rng(1)
  expected = {}
  for split, shards, per_shard in (("train", 2, 5), ("validation", 1, 3)):
    for shard in range(shards):
      writer = ArrayRecordWriter(str(tmp_path / f"{split}-{shard:05d}.array_record"),
                                 "group_size:1")
      for i in range(per_shard):
        pixels = _photo(rng, 40, 44)
        expected.setdefault(split, []).append(pixels)
        writer.write(_encoded(pixels, "PNG"))
      writer.close()
  config = _config(source="arrayrecord", path=str(tmp_path / "{split}-*.array_record"),
                   batch_size=3)
  sources.check_data(config, process_count=1)
  assert len(sources.make_source(config, "train")) == 10
  batches = list(pipeline.eval_batches(config, "validation", batch_size=3, process_index=0,
                                       process_count=1))
  assert len(batches) == 1 and batches[0]["mask"].all()
  center = images.center_crop(images.decode_resized(_encoded(expected["validation"][0], "PNG"),
                                                    32), 32)
  np.testing.assert_array_equal(batches[0]["image"][0], images.to_float(center))
  batch = next(pipeline.train_iterator(config, global_batch_size=3, seed=0, process_index=0,
                                       process_count=1))
  assert batch["image"].shape == (3, 32, 32, 3)
  # Without "{split}" one set of files serves both splits: a held-out share of records.
  shared = _config(source="arrayrecord", path=str(tmp_path / "train-*.array_record"),
                   val_fraction=0.2)
  train, val = sources.make_source(shared, "train"), sources.make_source(shared, "validation")
  assert len(val) == 2 and len(train) == 8
  digests = [_digest(np.frombuffer(s[i], np.uint8)) for s in (train, val) for i in range(len(s))]
  assert len(set(digests)) == 10


def test_arrayrecord_msgpack_records_and_their_checks(tmp_path):
  """A record is the encoded image or a msgpack map holding it under data.image_key (and
  the conditions under their keys); the first record is checked for the keys the run
  reads before anything else happens."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from flax import serialization

  from ldm_jax.data.conditions import ConditionSpec
  from ldm_jax.data.tokenizer import make_tokenizer
  rng = np.random.default_rng(2)
  png = _encoded(_photo(rng, 36, 40), "PNG")
  assert sources.record_value(png) == png  # 0x89 starts a msgpack map too
  record = serialization.msgpack_serialize({"image": png, "caption": "a cat", "label": 3})
  assert sources.record_value(record) == {"image": png, "caption": "a cat", "label": 3}
  assert sources.record_value(b"\x81\x01\x02") == b"\x81\x01\x02"  # an int key: not ours

  def write(name, records):
    writer = ArrayRecordWriter(str(tmp_path / name), "group_size:1")
    for r in records:
      writer.write(r)
    writer.close()
    return _config(source="arrayrecord", path=str(tmp_path / name), batch_size=2)

  both = ConditionSpec(fields=("label", "tokens"), tokenizer=make_tokenizer("", 16))
  maps = write("maps.array_record", [record] * 4)
  sources.check_data(maps, process_count=1, conditions=both)
  batch = next(pipeline.train_iterator(maps, global_batch_size=2, seed=0, process_index=0,
                                       process_count=1, conditions=both))
  assert list(batch["label"]) == [3, 3] and batch["image"].shape == (2, 32, 32, 3)
  renamed = write("renamed.array_record",
                  [serialization.msgpack_serialize({"img": png, "text": "a cat"})] * 4)
  with pytest.raises(ValueError, match=r"record 0 of .* has keys \['img', 'text'\] but no "
                     r"'image': set --config.data.image_key"):
    sources.check_data(renamed, process_count=1)
  import dataclasses
  renamed = dataclasses.replace(renamed, image_key="img")
  sources.check_data(renamed, process_count=1)  # images only: the caption is not read
  with pytest.raises(ValueError, match=r"record 0 of .*: no 'caption' key \(the record has "
                     r"\['img', 'text'\]\): set cond.caption_key"):
    sources.check_data(renamed, process_count=1, conditions=ConditionSpec(
        fields=("tokens",), tokenizer=make_tokenizer("", 16)))
  junk = write("junk.array_record", [b"not an image %d" % i for i in range(4)])
  with pytest.raises(ValueError, match="encoded image bytes or a msgpack map"):
    sources.check_data(junk, process_count=1)


def test_text_runs_refuse_a_folder_without_captions(tmp_path):
  from ldm_jax.data.conditions import ConditionSpec
  from ldm_jax.data.tokenizer import make_tokenizer
  text = ConditionSpec(fields=("tokens",), tokenizer=make_tokenizer("", 16))
  rng = np.random.default_rng(3)
  for i in range(4):
    Image.fromarray(_photo(rng, 36, 36)).save(tmp_path / f"{i}.png")
  config = _config(source="folder", path=str(tmp_path), batch_size=2)
  sources.check_data(config, process_count=1)  # an autoencoder reads no captions
  with pytest.raises(ValueError, match="none of the 4 images under .* has a caption .*"
                     "allow_empty_captions=True"):
    sources.check_data(config, process_count=1, conditions=text)
  import dataclasses
  sources.check_data(dataclasses.replace(config, allow_empty_captions=True), process_count=1,
                     conditions=text)


# --- pipeline --------------------------------------------------------------------------------

def test_random_channel_order_permutes_the_same_crops():
  """With random_channel_order each training image is the plain pipeline's image (the same
  crop and flip draws) with its RGB channels in one of the 6 orders, several of them."""
  make = lambda **kw: next(pipeline.train_iterator(
      _config(**kw), global_batch_size=16, seed=0, process_index=0, process_count=1))
  plain, shuffled = make()["image"], make(random_channel_order=True)["image"]
  orders = []
  for a, b in zip(plain, shuffled):
    found = [p for p in itertools.permutations(range(3)) if np.array_equal(a[..., p], b)]
    assert found, "not a channel permutation of the plain image"
    orders.append(found[0])
  assert len(set(orders)) >= 3


def test_short_side_crops_instead_of_shrinking():
  """data.short_side: the 128-pixel built-in tiles resized to 64, then 32-pixel crops (the
  center one for evaluation), not whole tiles shrunk to 32."""
  config = _config(image_size=32, short_side=64)
  tile = builtin.load_tiles("validation")[0]
  resized = images.decode_resized(_encoded(tile, "PNG"), 64)
  batch = next(pipeline.eval_batches(config, "validation", batch_size=2, process_index=0,
                                     process_count=1))
  assert batch["image"].shape == (2, 32, 32, 3)
  np.testing.assert_allclose(batch["image"][0], images.to_float(images.center_crop(resized, 32)),
                             atol=2 / 255)
  train = next(pipeline.train_iterator(config, global_batch_size=4, seed=0, process_index=0,
                                       process_count=1))
  assert train["image"].shape == (4, 32, 32, 3)
  with pytest.raises(ValueError, match="short_side=16 is below data.image_size=32"):
    _config(image_size=32, short_side=16)


def test_train_batches_shape_dtype_range_and_determinism():
  config = _config(batch_size=6)
  make = lambda seed: pipeline.train_iterator(config, global_batch_size=6, seed=seed,
                                              process_index=0, process_count=1)
  first, again, other = make(0), make(0), make(1)
  for _ in range(3):
    batch = next(first)
    assert set(batch) == {"image"}
    image = batch["image"]
    assert image.shape == (6, 32, 32, 3) and image.dtype == np.float32
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.max() - image.min() > 1.0
    np.testing.assert_array_equal(image, next(again)["image"])
  assert not np.array_equal(next(first)["image"], next(other)["image"])


def test_two_hosts_get_disjoint_shards_covering_the_data():
  config = _config(random_crop=False, random_flip=False)  # outputs identify their records
  reference = pipeline.eval_batches(config, "train", batch_size=8, process_index=0,
                                    process_count=1)
  everything = {_digest(x) for b in reference for x, m in zip(b["image"], b["mask"]) if m}
  total = len(builtin.load_tiles("train"))
  assert len(everything) == total
  seen = []
  for host in (0, 1):
    it = pipeline.train_iterator(config, global_batch_size=2, seed=0, process_index=host,
                                 process_count=2)
    shard = -(-total // 2) if host == 0 else total // 2
    epochs = [[_digest(next(it)["image"][0]) for _ in range(shard)] for _ in range(2)]
    assert len(set(epochs[0])) == shard and set(epochs[0]) == set(epochs[1])
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    seen.append(set(epochs[0]))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == everything


def test_eval_batches_pad_and_mask_equally_on_every_host():
  config = _config()
  total = len(builtin.load_tiles("validation"))
  per_host = [list(pipeline.eval_batches(config, "validation", batch_size=10, max_examples=7,
                                         process_index=i, process_count=2)) for i in (0, 1)]
  assert [len(b) for b in per_host] == [1, 1]  # 4 and 3 real examples, batches of 5
  assert [int(b[0]["mask"].sum()) for b in per_host] == [4, 3]
  assert per_host[1][0]["image"][3:].max() == 0.0
  single = list(pipeline.eval_batches(config, "validation", batch_size=5, process_index=0,
                                      process_count=1))
  assert sum(int(b["mask"].sum()) for b in single) == total
  assert all(b["image"].shape == (5, 32, 32, 3) for b in single)
  again = list(pipeline.eval_batches(config, "validation", batch_size=5, process_index=0,
                                     process_count=1))
  assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(single, again))


def test_folder_pipeline_skips_and_counts_undecodable_files(image_folder, caplog):
  config = _config(source="folder", path=image_folder, batch_size=3)
  sources.check_data(config, process_count=1)
  before = pipeline.skipped_records()
  batches = list(pipeline.eval_batches(config, "train", batch_size=3, process_index=0,
                                       process_count=1))
  assert sum(int(b["mask"].sum()) for b in batches) == 7  # 8 files, one corrupt
  assert pipeline.skipped_records() == before + 1
  it = pipeline.train_iterator(config, global_batch_size=3, seed=0, process_index=0,
                               process_count=1)
  for _ in range(6):  # 18 examples: more than two epochs of 7
    batch = next(it)
    assert batch["image"].shape == (3, 32, 32, 3)
    assert np.isfinite(batch["image"]).all()
  assert pipeline.skipped_records() >= before + 3
  assert "corrupt.jpg" in caplog.text


def test_iterator_state_round_trip_through_orbax(tmp_path):
  config = _config()
  make = lambda: pipeline.train_iterator(config, global_batch_size=4, seed=3, process_index=0,
                                         process_count=1)
  it = make()
  for _ in range(5):
    next(it)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, create=True)
  with ocp.CheckpointManager(str(tmp_path), item_names=("data",), options=options) as manager:
    manager.save(5, args=ocp.args.Composite(data=pipeline.iterator_save_args(it)))
    expected = [next(it)["image"] for _ in range(4)]  # while orbax may still be writing
    manager.wait_until_finished()
  fresh = make()
  with ocp.CheckpointManager(str(tmp_path), item_names=("data",)) as manager:
    manager.restore(5, args=ocp.args.Composite(data=pipeline.iterator_restore_args(fresh)))
  for want in expected:
    np.testing.assert_array_equal(next(fresh)["image"], want)
  state = fresh.get_state()  # the same through get_state / set_state
  after = [next(fresh)["image"] for _ in range(2)]
  other = make()
  other.set_state(state)
  for want in after:
    np.testing.assert_array_equal(next(other)["image"], want)


def test_worker_processes_count_skips_and_resume(image_folder):
  config = _config(source="folder", path=image_folder, batch_size=3, num_workers=2)
  make = lambda: pipeline.train_iterator(config, global_batch_size=3, seed=0, process_index=0,
                                         process_count=1)
  before = pipeline.skipped_records()
  it = make()
  for _ in range(6):
    next(it)
  assert pipeline.skipped_records() > before  # counted in the workers, seen here
  state = it.get_state()
  expected = [next(it)["image"] for _ in range(3)]
  it.close()
  fresh = make()
  fresh.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh)["image"], want)
  fresh.close()


# --- checks ----------------------------------------------------------------------------------

def test_check_data_accepts_builtin():
  sources.check_data(_config(), process_count=1)


@pytest.mark.parametrize("overrides, message", [
    (dict(source="imagenet"), "unknown data.source 'imagenet'"),
    (dict(source="folder", path=""), "needs data.path"),
    (dict(source="folder", path="/no/such/folder"), "is not a directory"),
    (dict(source="arrayrecord", path="/no/such/*.array_record"), "no ArrayRecord files match"),
    (dict(batch_size=5), "multiple of the number of processes"),
])
def test_check_data_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    sources.check_data(_config(**overrides), process_count=2)


def test_data_spec_reads_the_block_once():
  """Older configs get the later keys' defaults; unknown keys and bad values fail when the
  spec is built, before any file is touched; replace() is checked the same way."""
  import dataclasses

  from ldm_jax import config_lib
  spec = _config()  # a block without read_threads, val_fraction, image_key, ...
  assert (spec.read_threads, spec.val_fraction, spec.image_key, spec.data_dir) == (
      8, 0.05, "image", "")
  assert spec.decode_limits() == dict(max_aspect_ratio=images.DEFAULT_MAX_ASPECT_RATIO,
                                      max_image_pixels=images.DEFAULT_MAX_IMAGE_PIXELS)
  # Every key of the configs' data block is a field, and nothing else is.
  full = config_lib.autoencoder_config(kind="kl", embed_dim=4, z_channels=4, ch_mult=(1,),
                                       batch_size=2, loss={}).data
  assert set(full) == {f.name for f in dataclasses.fields(DataSpec)}
  assert DataSpec.from_config(full).image_size == 256
  assert _config(image_size=64.0, path=None).image_size == 64  # cast to the field's type
  for overrides, message in (
      (dict(extra=1), r"unknown config keys data\.\['extra'\]; valid: \["),
      (dict(val_fraction=1.5), r"data.val_fraction must be in \(0, 1\)"),
      (dict(num_workers=-1), "data.num_workers must be >= 0"),
      (dict(image_size=0), "data.image_size must be positive"),
      (dict(batch_size=0), r"data.batch_size=0 must be >= 1"),
      (dict(image_size="big"), "data.image_size='big' must be of type int"),
  ):
    with pytest.raises(ValueError, match=message):
      _config(**overrides)
  with pytest.raises(ValueError, match=r"lacks keys \['seed'\]"):
    DataSpec.from_config({k: v for k, v in dataclasses.asdict(spec).items() if k != "seed"})
  assert dataclasses.replace(spec, split="validation").split == "validation"
  with pytest.raises(ValueError, match="unknown data.source"):
    dataclasses.replace(spec, source="imagenet")


def test_check_data_folder_errors(tmp_path):
  empty = tmp_path / "empty"
  os.makedirs(empty / "sub")
  (empty / "sub" / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match="no .jpg/.jpeg/.png/.webp files under"):
    sources.check_data(_config(source="folder", path=str(empty)), process_count=1)
  broken = tmp_path / "broken"
  os.makedirs(broken)
  for i in range(3):
    (broken / f"{i}.png").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="decodes as an image"):
    sources.check_data(_config(source="folder", path=str(broken)), process_count=1)
  endless = pipeline.train_iterator(_config(source="folder", path=str(broken)),
                                    global_batch_size=2, seed=0, process_index=0, process_count=1)
  with pytest.raises(RuntimeError, match="could not be decoded"):
    next(endless)  # fails instead of spinning forever
  single = tmp_path / "single"
  os.makedirs(single)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(single / "only.png")
  with pytest.raises(ValueError, match="split 'train' .* is empty"):
    sources.check_data(_config(source="folder", path=str(single)), process_count=1)


@pytest.mark.parametrize("name", ["no_such_dataset_xyz", "mnist"])
def test_tfds_not_prepared_says_how_to_prepare(tmp_path, name):
  config = _config(source="tfds", path=name, data_dir=str(tmp_path), download=False)
  with pytest.raises(ValueError, match="array_record") as error:
    sources.check_data(config, process_count=1)
  assert "data_dir" in str(error.value) and name in str(error.value)
  assert "\n" not in str(error.value)
  assert os.listdir(tmp_path) in ([], [name])  # nothing downloaded


def test_tfds_download_prepares_or_fails_in_one_line(tmp_path, monkeypatch):
  """data.download=True (the default) runs the builder's download_and_prepare: a dataset
  that needs no download is prepared and read; one whose download fails (a loopback port
  nobody listens on: this machine may be offline or not) fails with the line naming
  data_dir and how to prepare it elsewhere."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from tensorflow_datasets.core.download import downloader
  monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # else ~3 minutes of backoff

  class LocalPhotos(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(None, None, 3))}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(4), "validation": self._generate_examples(2)}

    def _generate_examples(self, count):
      rng = np.random.default_rng(count)
      for i in range(count):
        yield i, {"image": _photo(rng, 36, 40)}

  class LoopbackPhotos(LocalPhotos):
    def _split_generators(self, dl_manager):
      dl_manager.download("http://127.0.0.1:9/photos.zip")  # refused at once
      return super()._split_generators(dl_manager)

  calls = []
  prepare = tfds.core.DatasetBuilder.download_and_prepare
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda self, **kw: calls.append(self.name) or prepare(self, **kw))
  local = _config(source="tfds", path="local_photos", data_dir=str(tmp_path), batch_size=2)
  sources.check_data(local, process_count=1)
  assert calls == ["local_photos"] and len(sources.make_source(local, "train")) == 4
  offline = _config(source="tfds", path="loopback_photos", data_dir=str(tmp_path / "dl"))
  with pytest.raises(ValueError) as error:
    sources.check_data(offline, process_count=1)
  message = str(error.value)
  assert calls[-1] == "loopback_photos" and "\n" not in message
  assert message.startswith("TFDS dataset 'loopback_photos' could not be downloaded and "
                            f"prepared in data_dir='{tmp_path / 'dl'}' (")
  assert "`tfds build loopback_photos --file_format=array_record" in message


def test_tfds_prepared_array_record(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyPhotos(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(None, None, 3))}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(6), "validation": self._generate_examples(2)}

    def _generate_examples(self, count):
      rng = np.random.default_rng(count)
      for i in range(count):
        yield i, {"image": _photo(rng, 36, 40)}

  TinyPhotos(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = _config(source="tfds", path="tiny_photos", data_dir=str(tmp_path), batch_size=2)
  sources.check_data(config, process_count=1)
  batch = next(pipeline.train_iterator(config, global_batch_size=2, seed=0, process_index=0,
                                       process_count=1))
  assert batch["image"].shape == (2, 32, 32, 3)
  with pytest.raises(ValueError, match="not 'test'"):
    sources.make_source(config, "test")
