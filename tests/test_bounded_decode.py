"""Bounded decoding: odd images are skipped with a reason, big ones decode in bounded memory.

Peak memory is the larger of two measures: the growth of the process's peak RSS (Linux:
VmHWM, reset through /proc/self/clear_refs; it sees PIL's C allocations) and tracemalloc's
peak (numpy arrays and Python objects, on any OS). The old decoder resized images whole:
a 4000x1 PNG at image_size=64 took +156 MiB (and +2.5 GB at 256), and a 3000x2000 PNG at
256 took 23 (RGB) to 172 (16-bit) MiB beyond the decoded source; the bounds below fail it
by a wide margin.
"""

import contextlib
import ctypes
import importlib.resources
import io
import os
import re
import struct
import tracemalloc
import zlib

import ml_collections
import numpy as np
import pytest
from absl import flags
from PIL import Image, ImageFile, ImageOps

from ldm_jax.data import images, pipeline, sources

flags.FLAGS.mark_as_parsed()  # grain reads absl flags, also in its worker processes

MiB = 1 << 20


def _rss_kb(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))
  except (OSError, AttributeError):
    return None


def _reset_peak_rss() -> bool:
  """Starts a fresh peak-RSS measurement; False where the OS does not offer one."""
  try:  # glibc: hand freed memory back first, else reusing it would not show in the RSS
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return _rss_kb("VmHWM") is not None
  except OSError:
    return False


def peak_growth(fn):
  """(fn's result or the exception it raised, peak bytes allocated while it ran)."""
  tracing = tracemalloc.is_tracing()
  if not tracing:
    tracemalloc.start()
  tracemalloc.reset_peak()
  traced_before = tracemalloc.get_traced_memory()[0]
  rss = _reset_peak_rss()
  rss_before = _rss_kb("VmRSS") if rss else 0
  try:
    result = fn()
  except Exception as e:  # pylint: disable=broad-except
    result = e
  rss_growth = (_rss_kb("VmHWM") - rss_before) * 1024 if rss else 0
  traced_growth = tracemalloc.get_traced_memory()[1] - traced_before
  if not tracing:
    tracemalloc.stop()
  return result, max(rss_growth, traced_growth)


def _png(image: Image.Image, **params) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", compress_level=1, **params)
  return buffer.getvalue()


def _bilevel_png(width: int, height: int) -> bytes:
  """A valid 1-bit black PNG of any size, written row by row: a decompression bomb (a
  20000x20000 one is 50 MB of pixel data in a ~50 KB file)."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  compressor, parts = zlib.compressobj(9), []
  rows = b"\0" * ((1 + -(-width // 8)) * 500)  # 500 rows: filter byte + packed bits
  for _ in range(height // 500):
    parts.append(compressor.compress(rows))
  parts.append(compressor.compress(b"\0" * ((1 + -(-width // 8)) * (height % 500))))
  parts.append(compressor.flush())
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0,
                                                             0, 0, 0))
          + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def _detailed(width: int, height: int) -> Image.Image:
  """Real photographic detail at any size: scikit-image's astronaut, tiled."""
  path = importlib.resources.files("skimage") / "data" / "astronaut.png"
  with Image.open(path) as photo:
    tile = np.asarray(photo.convert("RGB"))
  reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
  return Image.fromarray(np.ascontiguousarray(np.tile(tile, reps)[:height, :width]))


@contextlib.contextmanager
def _never_decoded(monkeypatch):
  """Fails the test if any image file's pixels are decoded inside the block."""
  def load(self):
    raise AssertionError(f"decoded a {self.size} image that should have been skipped")
  with monkeypatch.context() as patch:
    patch.setattr(ImageFile.ImageFile, "load", load)
    yield


# --- images ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(4000, 1), (1, 4000)])
def test_a_strip_is_skipped_before_it_is_decoded(size, monkeypatch):
  data = _png(Image.new("RGB", size, (200, 30, 30)))
  assert len(data) < 2000  # a tiny file, which the old decoder made 256 x 1,024,000 pixels
  with _never_decoded(monkeypatch):
    error, peak = peak_growth(lambda: images.decode_resized(data, 64))
  assert isinstance(error, images.SkippedImage) and error.reason == images.ASPECT_RATIO
  assert "4000.0:1" in str(error) and "data.max_aspect_ratio=4" in str(error)
  # 1 MiB: RSS is counted in pages and per-thread batches, so 4 x 64*64*3 bytes would be
  # below its resolution. The old decoder takes +156 MB here (64 x 256,000 x 3, twice).
  assert peak < 1 * MiB, peak
  # At the bound itself the strip decodes (a 1-pixel-high image is upscaled, as before).
  out = images.decode_resized(data, 8, max_aspect_ratio=4000)
  assert out.shape == ((8, 32000, 3) if size[0] > 1 else (32000, 8, 3))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "I;16"])
def test_a_large_image_decodes_in_bounded_memory_close_to_a_full_resize(mode):
  source = _detailed(3000, 2000)
  if mode == "RGBA":
    alpha = np.tile(np.random.default_rng(0).integers(0, 256, (50, 60), dtype=np.uint8),
                    (40, 50))  # varied, yet quick to encode
    source = Image.fromarray(np.dstack([np.asarray(source), alpha]), "RGBA")
  elif mode == "I;16":
    source = Image.fromarray(np.asarray(source.convert("L"), np.uint16) * 257)
  data = _png(source)
  del source
  out, peak = peak_growth(lambda: images.decode_resized(data, 256))
  assert isinstance(out, np.ndarray) and out.shape == (256, 384, 3) and out.dtype == np.uint8
  # What PIL holds of the decoded source (RGB and RGBA at 4 bytes a pixel, I;16 at 2),
  # plus 32 outputs' worth (9 MiB): the box-reduced copy (1000x667 at 4 bytes, 9 outputs),
  # the conversion bands, the resize, the array, the PNG decoder's buffers. Measured here:
  # 4.3 MiB beyond the source for RGB, 4.6-4.9 for RGBA and I;16; the old decoder, which
  # copied the source whole to turn it upright and to convert it: 23 / 116 / 172 MiB.
  source_bytes = 3000 * 2000 * (2 if mode == "I;16" else 4)
  assert peak < source_bytes + 32 * out.nbytes, (peak - source_bytes) / MiB
  # The old decoder: RGB as a whole, then bicubic from full size. Box-reducing 3x first
  # (Pillow's reducing_gap=2) moves photos by under 1.5 gray levels on average (measured
  # 0.94 RGB, 1.29 RGBA, 0.90 I;16) and 16 at most (10-12).
  rgb = images.to_rgb(images.open_image(data))
  old = np.asarray(rgb.resize((384, 256), Image.Resampling.BICUBIC), np.int16)
  diff = np.abs(out.astype(np.int16) - old)
  assert diff.mean() < 1.5 and diff.max() <= 16, (diff.mean(), diff.max())


def test_small_images_decode_as_before():
  """No reduction below 4x the output (2x REDUCING_GAP): the old full-size path, exactly."""
  source = _detailed(700, 500)
  for image, size in ((source, 256), (source.convert("P"), 128), (source.convert("L"), 200)):
    data = _png(image)
    old = images.to_rgb(images.open_image(data))
    old = old.resize(images.resized_size(*old.size, size), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(images.decode_resized(data, size), np.asarray(old))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_with_a_reduced_decode(orientation):
  source = _detailed(1203, 805)  # not a multiple of the reduction: partial last blocks
  exif = Image.Exif()
  exif[0x0112] = orientation
  data = _png(source, exif=exif.tobytes())
  out = images.decode_resized(data, 64)  # reduced 6x
  upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
  assert upright.size == ((805, 1203) if orientation != 3 else (1203, 805))
  old = np.asarray(upright.resize(images.resized_size(*upright.size, 64),
                                  Image.Resampling.BICUBIC), np.int16)
  assert out.shape == old.shape
  assert np.abs(out - old).mean() < 2.5  # measured 1.03; without the box: 6.6


def test_a_decompression_bomb_is_skipped_and_never_decoded(monkeypatch):
  bomb = _bilevel_png(20000, 20000)  # 400 MP: over twice PIL's MAX_IMAGE_PIXELS
  assert len(bomb) < 100_000
  with _never_decoded(monkeypatch):
    error, peak = peak_growth(lambda: images.decode_resized(bomb, 256))
  assert isinstance(error, images.SkippedImage) and error.reason == images.TOO_MANY_PIXELS
  assert peak < 2 * MiB, peak


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit_is_skipped_and_never_decoded(monkeypatch):
  # 100 MP: PIL only warns (it refuses at 179 MP) and would decode 100 MB; data.max_image_
  # pixels defaults to PIL's 89.5 MP, so this is skipped before decoding.
  large = _bilevel_png(10000, 10000)
  with _never_decoded(monkeypatch):
    error, peak = peak_growth(lambda: images.decode_resized(large, 256))
  assert isinstance(error, images.SkippedImage) and error.reason == images.TOO_MANY_PIXELS
  assert "100,000,000 pixels" in str(error) and "data.max_image_pixels=89,478,485" in str(error)
  assert peak < 2 * MiB, peak


def test_the_pixel_limit_counts_what_jpeg_decodes():
  """A JPEG decodes at 1/8 scale for a small output (`draft`): only those pixels count."""
  big = Image.new("RGB", (4000, 3000), (10, 120, 200))
  as_png, as_jpeg = _png(big), io.BytesIO()
  big.save(as_jpeg, format="JPEG")
  with pytest.raises(images.SkippedImage, match="12,000,000 pixels"):
    images.decode_resized(as_png, 64, max_image_pixels=1_000_000)
  out = images.decode_resized(as_jpeg.getvalue(), 64, max_image_pixels=1_000_000)
  assert out.shape == (64, 85, 3) and np.abs(out.astype(int) - (10, 120, 200)).max() <= 3


# --- pipeline --------------------------------------------------------------------------------

def _config(**overrides):
  from ldm_jax.data.spec import DataSpec
  config = dict(source="folder", path="", split="train", val_split="validation",
                image_size=16, batch_size=1, random_crop=False, random_flip=False,
                num_workers=0, seed=0)
  config.update(overrides)
  return DataSpec.from_config(ml_collections.ConfigDict(config))


@pytest.fixture
def bad_folder(tmp_path):
  """train/: one good image with its caption, a 4000x1 strip, a corrupt file, a GIF."""
  train = tmp_path / "train"
  os.makedirs(train)
  good = np.asarray(_detailed(24, 20))
  Image.fromarray(good).save(train / "good.png")
  (train / "good.txt").write_text("a caption: expected beside an image, not ignored")
  Image.new("RGB", (4000, 1)).save(train / "strip.png")
  (train / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
  Image.new("P", (8, 8)).save(train / "anim.gif")
  os.makedirs(tmp_path / "validation")
  Image.fromarray(good).save(tmp_path / "validation" / "v.png")
  return str(tmp_path), good


def test_pipeline_counts_skips_by_reason_and_ignored_files(bad_folder, caplog):
  root, good = bad_folder
  config = _config(path=root)
  sources.check_data(config, process_count=1)
  assert "ignored 1 file with other extensions (.gif 1)" in caplog.text
  expected = images.to_float(images.center_crop(images.decode_resized(good, 16), 16))
  before = pipeline.skipped_by_reason()
  batches = list(pipeline.eval_batches(config, "train", batch_size=1, process_index=0,
                                       process_count=1))
  assert [bool(b["mask"][0]) for b in batches].count(True) == 1  # good, strip, corrupt
  np.testing.assert_array_equal(next(b for b in batches if b["mask"][0])["image"][0], expected)
  after = pipeline.skipped_by_reason()
  assert {r: after[r] - before[r] for r in after} == {
      "undecodable": 1, "aspect ratio": 1, "too many pixels": 0}
  it = pipeline.train_iterator(config, global_batch_size=1, seed=0, process_index=0,
                               process_count=1)
  for _ in range(4):  # every epoch holds the good image and one skip of each kind
    batch = next(it)
    assert set(batch) == {"image"}
    np.testing.assert_array_equal(batch["image"][0], expected)
  trained = pipeline.skipped_by_reason()
  for reason in ("undecodable", "aspect ratio"):
    assert trained[reason] - after[reason] in (3, 4)
  assert pipeline.skipped_records() == sum(trained.values())
  for name, reason in (("strip.png", "aspect ratio"), ("corrupt.jpg", "undecodable")):
    assert len(re.findall(rf"skipping image \S*{name}: {reason}", caplog.text)) == 1  # once
  report = pipeline.data_report()
  assert re.search(r"skipped \d+ records \(undecodable \d+, aspect ratio \d+\)", report)
  assert re.search(r"ignored \d+ files? \(.*\.gif \d+", report)


def test_data_report_format(monkeypatch):
  monkeypatch.setattr(pipeline, "_skipped", dict.fromkeys(pipeline.REASONS, 0))
  monkeypatch.setattr(sources, "_ignored", {})
  assert pipeline.data_report() == ""
  pipeline._add_skipped(np.array([[1, 2, 0], [0, 0, 0]]))
  monkeypatch.setattr(sources, "_ignored", {"/d": {".txt": 2, ".gif": 3}, "/d/val": {".gif": 9},
                                            "/e": {".bmp": 1}})
  assert pipeline.data_report() == ("skipped 3 records (undecodable 1, aspect ratio 2); "
                                    "ignored 6 files (.gif 3, .txt 2, .bmp 1)")
  monkeypatch.setattr(sources, "_ignored", {"/e": {".bmp": 1}})
  assert pipeline.data_report().endswith("; ignored 1 file (.bmp 1)")


def test_folder_source_counts_ignored_files(tmp_path, caplog):
  os.makedirs(tmp_path / "sub")
  for name in ("a.png", "b.JPG", "b.txt", "notes.txt", "c.gif", "d.GIF", "README",
               ".hidden.bmp", "sub/e.webp", "sub/e.txt", "sub/f.bmp"):
    (tmp_path / name).write_bytes(b"")
  os.makedirs(tmp_path / ".cache")
  (tmp_path / ".cache" / "x.gif").write_bytes(b"")
  config = _config(path=str(tmp_path), val_fraction=0.4)
  for split in ("train", "validation", "train"):
    sources.make_source(config, split)
  assert caplog.text.count("ignored 5 files") == 1  # logged once per folder
  assert ("ignored 5 files with other extensions (.gif 2, (no extension) 1, .bmp 1, .txt 1); "
          "accepted: .jpg .jpeg .png .webp") in caplog.text
  assert sorted(os.path.basename(f) for f in sources.list_images(str(tmp_path))) == [
      "a.png", "b.JPG", "e.webp"]
  counts = sources.ignored_files()
  assert counts[".gif"] >= 2 and counts["(no extension)"] >= 1


def test_check_data_rejects_bad_bounds():
  for key, value in (("max_aspect_ratio", 0.5), ("max_image_pixels", 0)):
    with pytest.raises(ValueError, match=f"data.{key} must be"):
      sources.check_data(_config(source="builtin", **{key: value}), process_count=1)


def test_counts_by_reason_come_from_worker_processes(bad_folder):
  root, _ = bad_folder
  it = pipeline.train_iterator(_config(path=root, num_workers=1), global_batch_size=1, seed=0,
                               process_index=0, process_count=1)
  before = pipeline.skipped_by_reason()
  for _ in range(3):
    assert set(next(it)) == {"image"}
  after = pipeline.skipped_by_reason()
  it.close()
  for reason in ("undecodable", "aspect ratio"):
    assert after[reason] - before[reason] in (2, 3)  # counted in the worker, seen here
