"""The FID Inception network (InceptionV3, TF 2015-12-05 graph) in NNX, NHWC.

FID and IS are only comparable across papers when computed with this exact network: the
TensorFlow graph as ported by pytorch-fid and torch-fidelity, which differs from
torchvision's InceptionV3 in its pooling (average pools in the A, C and first E blocks
ignore the padding; the last E block max-pools) and in its 1008-class head. Preprocessing
follows torch-fidelity: 8-bit images, TF1 bilinear resize to 299, (x - 128) / 128.

Weights come from one safetensors file in the PyTorch layout of those projects
(`Mixed_5b.branch1x1.conv.weight`, `...bn.running_mean`, `fc.weight`, ...), made once by
`ldm_jax.convert.inception_weights`. Attribute names mirror the keys.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax.convert.files import write_safetensors
from ldm_jax.convert.torch_layout import export_state, import_state, torch_leaves

SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008
CONVERT_COMMAND = ("python -m ldm_jax.convert.inception_weights "
                   "--src=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.safetensors")
PRECISION = jax.lax.Precision.HIGHEST  # FID moves with bf16 matmuls: keep float32 on TPU


class BasicConv2d(nnx.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0, *,
               rngs: nnx.Rngs):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.conv = nnx.Conv(cin, cout, (kh, kw), strides=(stride, stride),
                         padding=((ph, ph), (pw, pw)), use_bias=False, precision=PRECISION,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(cout, epsilon=1e-3, use_running_average=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average over the valid pixels only (TF's padding, count_include_pad=False)."""
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


def _max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nnx.Module):

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate(
        [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_same(x))], axis=-1)


class InceptionB(nnx.Module):

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):

  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, **row, rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, **col, rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col, rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row, rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col, rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    return jnp.concatenate(
        [self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_same(x))], axis=-1)


class InceptionD(nnx.Module):

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
  """`max_pool=True` for the last block (Mixed_7c), as in the TF graph."""

  def __init__(self, cin: int, max_pool: bool, *, rngs: nnx.Rngs):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, **row, rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, **col, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, **row, rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, **col, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool_same(x)
    return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


@functools.lru_cache(maxsize=8)
def _tf1_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of TF1's bilinear resize (align_corners=False, no half-pixel
  centres): output i samples the input at i * n_in / n_out."""
  src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  w = np.zeros((n_out, n_in), np.float64)
  w[np.arange(n_out), lo] += 1.0 - frac
  w[np.arange(n_out), hi] += frac
  return w.astype(np.float32)


def preprocess(images: jax.Array, quantize: bool = True) -> jax.Array:
  """[-1, 1] NHWC images of any size -> the network's 299x299 input.

  The reference network sees 8-bit images, so values are rounded to the 256 levels first
  (`quantize`), as they would be in saved PNGs; then TF1 bilinear resize, (x - 128) / 128.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Inception needs NHWC RGB images, got shape {images.shape}")
  x = jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
  if quantize:
    x = jnp.round(x)
  rows = jnp.asarray(_tf1_resize_matrix(x.shape[1], SIZE))
  cols = jnp.asarray(_tf1_resize_matrix(x.shape[2], SIZE))
  x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=PRECISION)
  x = jnp.einsum("pw,nowc->nopc", cols, x, precision=PRECISION)
  return (x - 128.0) / 128.0


class InceptionV3(nnx.Module):
  """`model(images)` -> {"pool": [B, 2048], "logits": [B, 1008], "logits_unbiased": ...}.

  Images are NHWC in [-1, 1], any size. "pool" is the FID feature; "logits_unbiased"
  (pool @ fc.weight, no bias) is what the original IS code and torch-fidelity score.
  The constructor's init only gives shapes; build one with `make_inception`.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, max_pool=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool=True, rngs=rngs)
    self.fc = nnx.Linear(POOL_DIM, NUM_CLASSES, precision=PRECISION, rngs=rngs)

  def __call__(self, images: jax.Array, quantize: bool = True) -> dict[str, jax.Array]:
    x = preprocess(images, quantize)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool(x, 2)
    x = _max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    pool = jnp.mean(x, axis=(1, 2))
    unbiased = jnp.matmul(pool, self.fc.kernel[...], precision=PRECISION)
    return {"pool": pool, "logits_unbiased": unbiased, "logits": unbiased + self.fc.bias[...]}


@functools.cache
def _abstract_template() -> InceptionV3:
  return nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))


def _abstract() -> InceptionV3:
  """Shapes only; tracing the constructor takes seconds, so one template is kept and
  copied (each load fills its own copy)."""
  return nnx.clone(_abstract_template())


def torch_shapes() -> dict[str, tuple[int, ...]]:
  """Every key of an Inception weights file with its PyTorch shape."""
  return {k: leaf.shape for k, leaf in torch_leaves(_abstract()).items()}


def random_state(seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights in the file layout, for tests: He-normal convs and BatchNorms with
  non-trivial running statistics, so every layer's arithmetic is exercised at a sane scale."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in torch_shapes().items():
    if key.endswith("conv.weight") or key == "fc.weight":
      out[key] = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif key.endswith("running_var"):
      out[key] = rng.uniform(0.5, 1.5, shape)
    elif key.endswith("bn.weight"):
      out[key] = rng.uniform(0.8, 1.2, shape)
    else:  # BN bias and running mean, fc bias
      out[key] = rng.normal(0.0, 0.1, shape)
  return {k: v.astype(np.float32) for k, v in out.items()}


def inception_from_state(tensors: dict[str, np.ndarray], source: str) -> InceptionV3:
  """An InceptionV3 holding `tensors` (PyTorch layout); one error lists every mismatch."""
  model = _abstract()
  import_state(model, tensors, source,
               hint=f"An Inception weights file is made by: {CONVERT_COMMAND}")
  return model


def _missing_weights_message(path) -> str:
  where = (f"Inception weights file {path!r} does not exist." if path
           else "No Inception weights file configured.")
  return (f"{where} FID and IS need the FID InceptionV3 weights. Download "
          "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release) or "
          "weights-inception-2015-12-05-6726825d.pth (torch-fidelity's, the same tensors) "
          f"once, on a machine with network access, then convert it:\n  {CONVERT_COMMAND}\n"
          "and set config.eval.inception_weights=PATH (or pass --inception_weights=PATH).")


def make_inception(weights_path: str | os.PathLike | None) -> InceptionV3:
  """The FID network from a safetensors file (local or gs://); a missing file says how to
  make it."""
  from ldm_jax import fs  # pylint: disable=import-outside-toplevel
  if not weights_path or not fs.exists(weights_path):
    raise FileNotFoundError(_missing_weights_message(weights_path))
  from ldm_jax.convert.files import read_tensors  # pylint: disable=import-outside-toplevel
  return inception_from_state(read_tensors(weights_path), os.fspath(weights_path))


def save_inception(model: InceptionV3, path: str | os.PathLike) -> None:
  write_safetensors(export_state(model), path)
