"""How well an autoencoder keeps each image's colour: `python bench/demo_colour.py PATH`.

PATH is anything `load_autoencoder` reads (the demo's export,
`workdir/kl_f8_demo/export/autoencoder`, or the shipped starting point
`ldm_jax/assets/kl_f8_demo_base.safetensors`). On the center 64-pixel crop of every
128-pixel tile of every built-in photo (`ldm_jax.data.builtin`, training and validation
photos alike), it reconstructs from the posterior mean and prints:

- PSNR of the reconstruction, and of a flat image of each crop's own mean colour (the
  level below which an autoencoder has learnt nothing but the colour), and the gap;
- the mean colour error: |mean RGB of the reconstruction - mean RGB of the input|,
  averaged over channels and crops, in 1/255 (the demo's cat came out orange at 7.6/255);
- the same per photo, worst first.

Not a test: it checks nothing, it measures (the README's demo figures come from it).
"""

from __future__ import annotations

import collections

import numpy as np
from absl import app

from ldm_jax.convert import load_autoencoder
from ldm_jax.data import builtin

CROP = 64


def center_crops() -> tuple[np.ndarray, list[str]]:
  """Every tile's center crop as float32 NHWC in [-1, 1], and its photo's name."""
  crops, photos = [], []
  for split in builtin.SPLITS:
    for tile, photo in zip(builtin.load_tiles(split), builtin.tile_photos(split)):
      top = (tile.shape[0] - CROP) // 2
      crops.append(tile[top:top + CROP, top:top + CROP])
      photos.append(photo)
  return np.stack(crops).astype(np.float32) / 127.5 - 1.0, photos


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per image, images in [-1, 1] (peak-to-peak 2)."""
  mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
  return 10 * np.log10(4.0 / np.maximum(mse, 1e-12))


def measure(path: str, batch: int = 11) -> dict:
  model = load_autoencoder(path)
  x, photos = center_crops()
  rec = np.concatenate([np.clip(np.asarray(model.decode(model.encode(x[i:i + batch]).mode())),
                                -1, 1) for i in range(0, len(x), batch)])
  mean = x.mean(axis=(1, 2), keepdims=True)
  colour_error = np.abs(rec.mean(axis=(1, 2)) - mean[:, 0, 0]).mean(axis=1) * 127.5
  per_photo = collections.defaultdict(list)
  for i, photo in enumerate(photos):
    per_photo[photo].append(i)
  rec_psnr, flat_psnr = psnr(rec, x), psnr(np.broadcast_to(mean, x.shape), x)
  return {"crops": len(x), "psnr": rec_psnr.mean(), "flat_psnr": flat_psnr.mean(),
          "colour_error": colour_error.mean(),
          "per_photo": sorted(((photo, rec_psnr[i].mean(), flat_psnr[i].mean(),
                                colour_error[i].mean()) for photo, i in per_photo.items()),
                              key=lambda r: -r[3])}


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python bench/demo_colour.py PATH (an autoencoder)")
  r = measure(argv[1])
  print(f"{argv[1]}: {r['crops']} center crops of {CROP} px")
  print(f"PSNR {r['psnr']:.2f} dB; flat mean colour {r['flat_psnr']:.2f} dB; gap "
        f"{r['psnr'] - r['flat_psnr']:+.2f} dB; mean colour error {r['colour_error']:.2f}/255")
  print("| photo | PSNR | flat | colour error /255 |\n|---|---|---|---|")
  for photo, p, f, c in r["per_photo"]:
    print(f"| {photo} | {p:.2f} | {f:.2f} | {c:.2f} |")


if __name__ == "__main__":
  app.run(main)
