"""LPIPS (VGG variant) in NNX, NHWC, inputs in [-1, 1].

The perceptual term of the first-stage losses and an evaluation metric. The weights are
ImageNet VGG16 plus the LPIPS v0.1 linear heads; neither can be trained here, so they come
from one safetensors file in the PyTorch layout (`features.{i}.weight/bias` as in
torchvision, `lin{k}.model.1.weight` as in LPIPS), made once by
`ldm_jax.convert.lpips_weights`. Attribute names mirror those keys, so loading is
`import_state` and nothing else.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax.convert.files import write_safetensors
from ldm_jax.convert.torch_layout import export_state, import_state
from ldm_jax.models.layers import conv

# torchvision VGG16 `features`: (index, in, out) of each 3x3 conv, ReLU after each. A 2x2
# max-pool precedes every block but the first; a tap is taken after each block's last ReLU
# (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = torchvision indices 3, 8, 15, 22, 29).
VGG_BLOCKS = (
    ((0, 3, 64), (2, 64, 64)),
    ((5, 64, 128), (7, 128, 128)),
    ((10, 128, 256), (12, 256, 256), (14, 256, 256)),
    ((17, 256, 512), (19, 512, 512), (21, 512, 512)),
    ((24, 512, 512), (26, 512, 512), (28, 512, 512)),
)
TAP_CHANNELS = tuple(block[-1][2] for block in VGG_BLOCKS)  # 64, 128, 256, 512, 512

# LPIPS ScalingLayer: maps [-1, 1] images to ImageNet-normalised inputs. Constants, not
# weights: the LPIPS checkpoints store them as buffers we do not need to read.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

CONVERT_COMMAND = ("python -m ldm_jax.convert.lpips_weights --vgg16=vgg16-397923af.pth "
                   "--lin=vgg.pth --out=lpips_vgg.safetensors")


def torch_shapes() -> dict[str, tuple[int, ...]]:
  """Every key of an LPIPS weights file with its PyTorch shape (what the converter checks)."""
  shapes = {}
  for block in VGG_BLOCKS:
    for idx, cin, cout in block:
      shapes[f"features.{idx}.weight"] = (cout, cin, 3, 3)
      shapes[f"features.{idx}.bias"] = (cout,)
  for k, c in enumerate(TAP_CHANNELS):
    shapes[f"lin{k}.model.1.weight"] = (1, c, 1, 1)
  return shapes


# The heads' nn.Dropout() in the reference: PyTorch's default p.
DROPOUT_RATE = 0.5


class LinHead(nnx.Module):
  """LPIPS NetLinLayer: Sequential(Dropout, Conv1x1 C->1, no bias). Only the conv has
  weights, kept at index "1" for the `lin{k}.model.1.weight` key; the dropout is a
  function of an optional key, so the module's state and graph are the same either way."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.model = nnx.Dict({"1": conv(channels, 1, 1, use_bias=False, padding="VALID",
                                     rngs=rngs)})

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    if dropout_key is not None:
      # Inverted dropout per element, as torch.nn.Dropout in train mode: the expectation
      # over keys is the deterministic distance.
      keep = jax.random.bernoulli(dropout_key, 1.0 - DROPOUT_RATE, x.shape)
      x = jnp.where(keep, x / (1.0 - DROPOUT_RATE), 0.0)
    return self.model["1"](x)


def normalize_channels(f: jax.Array) -> jax.Array:
  """f / (|f|_c + eps), with a gradient of 0, not NaN, where a location's features are all 0.

  d sqrt(s)/ds is infinite at s = 0, and 0 * inf = NaN in the backward pass. Today
  `jax.nn.relu`'s select-based gradient happens to drop that NaN before it reaches the
  image; a multiplicative ReLU or a rewrite of the taps would not. The forward value is the
  reference's exactly (0 / eps = 0 either way).
  """
  s = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  positive = s > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)
  return f / (norm + EPS)


class LPIPS(nnx.Module):
  """LPIPS-VGG distance. `model(x0, x1)` -> shape (B,): one distance per image pair.

  Inputs are NHWC images in [-1, 1], any dtype; everything is computed in float32. Both
  images go through VGG in one batch. Without `dropout_key` (evaluation, and the default
  loss) the heads' dropout is off; with one it is on, as in the reference's training runs,
  where Lightning's train mode reaches the loss's LPIPS too (`loss.lpips_dropout`).
  The constructor's PyTorch-default init only gives shapes; build one with `make_lpips`.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    self.features = nnx.Dict({
        str(idx): conv(cin, cout, 3, padding=((1, 1), (1, 1)), rngs=rngs)
        for block in VGG_BLOCKS for idx, cin, cout in block})
    for k, c in enumerate(TAP_CHANNELS):
      setattr(self, f"lin{k}", LinHead(c, rngs=rngs))

  def taps(self, x: jax.Array) -> list[jax.Array]:
    """The five VGG16 activations (relu1_2 ... relu5_3) of images in [-1, 1]."""
    shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
    h = (x.astype(jnp.float32) - shift) / scale
    out = []
    for b, block in enumerate(VGG_BLOCKS):
      if b:
        h = nnx.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
      for idx, _, _ in block:
        h = jax.nn.relu(self.features[str(idx)](h))
      out.append(h)
    return out

  def __call__(self, x0: jax.Array, x1: jax.Array,
               dropout_key: jax.Array | None = None) -> jax.Array:
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
      raise ValueError(f"LPIPS needs two NHWC RGB batches of one shape, got {x0.shape} "
                       f"and {x1.shape}")
    batch = x0.shape[0]
    total = jnp.zeros((batch,), jnp.float32)
    # One VGG pass over both batches, interleaved ([B, 2] -> 2B) rather than concatenated:
    # on a batch-split mesh each device then holds both images of its own rows, where a
    # concatenation would move half of every feature map between devices.
    pair = jnp.stack([x0, x1], axis=1).reshape((2 * batch,) + x0.shape[1:])
    for k, f in enumerate(self.taps(pair)):
      f = normalize_channels(f).reshape((batch, 2) + f.shape[1:])
      diff = jnp.square(f[:, 0] - f[:, 1])
      head_key = None if dropout_key is None else jax.random.fold_in(dropout_key, k)
      total = total + jnp.mean(getattr(self, f"lin{k}")(diff, head_key), axis=(1, 2, 3))
    return total


def _missing_weights_message(path) -> str:
  where = f"LPIPS weights file {path!r} does not exist." if path else (
      "No LPIPS weights file configured.")
  return (f"{where} Create it once, on a machine with network access, from the torchvision "
          "ImageNet VGG16 checkpoint (vgg16-397923af.pth) and the LPIPS v0.1 linear "
          "weights (vgg.pth from the richzhang/PerceptualSimilarity repository):\n"
          f"  {CONVERT_COMMAND}\n"
          "then set config.loss.lpips_weights=PATH (or pass random_init=True in tests).")


def random_state(seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights in the file layout, for tests: He-normal VGG convs keep deep activations
  at scale, and positive heads (as the real ones are) keep distances meaningful. Drawn with
  NumPy, which is much faster than compiling a JAX initializer per weight shape on CPU."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in torch_shapes().items():
    if key.startswith("lin"):
      out[key] = rng.uniform(0.0, 1.0, shape)
    elif key.endswith(".weight"):
      out[key] = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    else:
      out[key] = np.zeros(shape)
  return {k: v.astype(np.float32) for k, v in out.items()}


def lpips_from_state(tensors: dict[str, np.ndarray], source: str) -> LPIPS:
  """An LPIPS module holding `tensors` (PyTorch layout); one error lists every mismatch."""
  model = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0)))
  import_state(model, tensors, source, hint=f"An LPIPS weights file is made by: {CONVERT_COMMAND}")
  return model


def load_lpips(path: str | os.PathLike) -> LPIPS:
  """An LPIPS module with the weights of one safetensors file in the PyTorch layout."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from ldm_jax import fs  # pylint: disable=import-outside-toplevel
  with fs.local_file(path) as local:  # a gs:// file is read from a local copy
    return lpips_from_state(load_file(local), os.fspath(path))


def make_lpips(weights_path: str | os.PathLike | None, random_init: bool = False,
               *, seed: int = 0) -> LPIPS:
  """The loss/metric's LPIPS: real weights from `weights_path`, or random ones for tests.

  Without weights LPIPS is meaningless, so a missing file is an error that says how to make
  it, never a silent fallback to random weights.
  """
  if random_init:
    return lpips_from_state(random_state(seed), f"random_state({seed})")
  from ldm_jax import fs  # pylint: disable=import-outside-toplevel
  if not weights_path or not fs.exists(weights_path):
    raise FileNotFoundError(_missing_weights_message(weights_path))
  return load_lpips(weights_path)


def save_lpips(model: LPIPS, path: str | os.PathLike) -> None:
  """Saves `model` in the layout `load_lpips` reads (and the converter writes)."""
  write_safetensors(export_state(model), path)
