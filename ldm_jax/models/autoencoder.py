"""First-stage autoencoders: CompVis Encoder/Decoder, AutoencoderKL and VQModel (NHWC).

Attribute names follow the CompVis modules (`encoder.down[i].block[j].conv1`, ...) so
that converting weights is a matter of renaming leaves, see `ldm_jax.convert`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ldm_jax.models.distributions import DiagonalGaussian
from ldm_jax.models.layers import Normalize, constrain, conv, swish
from ldm_jax.models.quantize import Quantized, VectorQuantizer

PAD_1 = ((1, 1), (1, 1))


@dataclasses.dataclass(frozen=True)
class AutoencoderSpec:
  """Architecture of a first-stage model (the `model` block of a config)."""

  kind: str = "kl"  # "kl" or "vq"
  resolution: int = 256
  in_channels: int = 3
  out_ch: int = 3
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = ()
  attn_type: str = "vanilla"  # "vanilla" or "none"
  dropout: float = 0.0
  z_channels: int = 4
  embed_dim: int = 4
  n_embed: int = 0  # VQ codebook size
  beta: float = 0.25
  legacy: bool = True
  remap: Any = None
  unknown_index: Any = "random"
  # The 1x1 convs around the latent and the mid-level attention are optional because
  # later VAEs drop them: SD3 and FLUX.1 have neither quant conv (their 16-channel encoder
  # output is the posterior's moments as is); some diffusers VAEs lack mid attention
  # (diffusers' `mid_block_add_attention`).
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_attention: bool = True  # only with attn_type="vanilla"
  # GroupNorm's groups (diffusers' `norm_num_groups`; CompVis fixes 32). At the published
  # ch=128 a group holds 4 channels; a narrow model with 32 groups normalizes each channel
  # on its own (instance norm), which leaves the decoder's last norm no way to carry an
  # image's mean colour: the reduced-width demos keep 4 channels per group instead.
  norm_num_groups: int = 32
  dtype: str = "float32"  # compute dtype; parameters are always float32
  remat: bool = False  # rematerialize each block in the backward pass

  def __post_init__(self):
    problems = []
    if self.kind not in ("kl", "vq"):
      problems.append(f"kind must be 'kl' or 'vq', got {self.kind!r}")
    if self.attn_type not in ("vanilla", "none"):
      problems.append(f"attn_type must be 'vanilla' or 'none', got {self.attn_type!r}")
    if self.kind == "vq" and self.n_embed <= 0:
      problems.append("a VQ model needs n_embed > 0 (the codebook size)")
    if not self.ch_mult or self.num_res_blocks < 1:
      problems.append("ch_mult must be non-empty and num_res_blocks >= 1")
    if self.norm_num_groups < 1:
      problems.append(f"norm_num_groups must be >= 1, got {self.norm_num_groups}")
    else:
      for width in sorted({self.ch * m for m in self.ch_mult}):
        if width % self.norm_num_groups:
          problems.append(f"channel width {width} (ch * ch_mult) is not a multiple of "
                          f"{self.norm_num_groups} (norm_num_groups), which GroupNorm needs")
    # Without a quant conv nothing maps between the encoder/decoder width (z_channels)
    # and the latent (embed_dim), so the two must agree.
    for flag, joins in (("use_quant_conv", "the encoder output straight to the latent"),
                        ("use_post_quant_conv", "the latent straight to the decoder")):
      if not getattr(self, flag) and self.embed_dim != self.z_channels:
        problems.append(f"{flag}=False feeds {joins}, so embed_dim ({self.embed_dim}) must "
                        f"equal z_channels ({self.z_channels})")
    if problems:
      raise ValueError("invalid autoencoder config: " + "; ".join(problems))

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | Any) -> "AutoencoderSpec":
    """Builds a spec from a config's `model` block (a ConfigDict or dict); unknown keys fail."""
    values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(names)}")
    for key in ("ch_mult", "attn_resolutions"):
      if key in values:
        values[key] = tuple(int(v) for v in values[key])
    return cls(**values)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


@dataclasses.dataclass(frozen=True)
class LatentNormalization:
  """What a first stage states about its latents, under diffusers' config.json names.

  A diffusion model sees `(z - shift_factor) * scaling_factor` (SD: scale only; SD3,
  FLUX.1: both); `latents_mean` / `latents_std` are per-channel statistics some VAEs
  state instead; `force_upcast` says the VAE overflows in float16. None: the source does
  not say (CompVis files), and a writer uses its format's default. The model carries one
  (`latent_normalization`) from load to save, so a round trip keeps what the source said.
  """

  scaling_factor: float | None = None
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool | None = None

  def __post_init__(self):
    # JSON gives lists; a model's static attributes must be hashable (nnx graph defs).
    for name in ("latents_mean", "latents_std"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, tuple(float(v) for v in value))

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "LatentNormalization":
    """The fields a config.json (or a workdir's latent_scaling.json) states; other keys
    are ignored."""
    return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})

  def stated(self) -> dict[str, Any]:
    """The fields that are set, as JSON values."""
    return {name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(self).items() if value is not None}


class ResnetBlock(nnx.Module):
  """GN-swish-conv twice with a residual; 1x1 `nin_shortcut` when channels change."""

  def __init__(self, in_ch: int, out_ch: int, *, dropout: float, dtype, rngs: nnx.Rngs,
               groups: int = 32):
    self.norm1 = Normalize(in_ch, rngs=rngs, num_groups=groups)
    self.conv1 = conv(in_ch, out_ch, 3, padding=PAD_1, dtype=dtype, rngs=rngs)
    self.norm2 = Normalize(out_ch, rngs=rngs, num_groups=groups)
    self.dropout = nnx.Dropout(dropout) if dropout > 0 else None
    self.conv2 = conv(out_ch, out_ch, 3, padding=PAD_1, dtype=dtype, rngs=rngs)
    self.nin_shortcut = (conv(in_ch, out_ch, 1, padding="VALID", dtype=dtype, rngs=rngs)
                         if in_ch != out_ch else None)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    h = self.conv1(swish(self.norm1(x)))
    h = swish(self.norm2(h))
    if self.dropout is not None:
      h = self.dropout(h, deterministic=rngs is None, rngs=rngs)
    h = self.conv2(h)
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x.astype(h.dtype) + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over all H*W positions with 1x1-conv projections."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs, groups: int = 32):
    self.norm = Normalize(channels, rngs=rngs, num_groups=groups)
    self.q = conv(channels, channels, 1, padding="VALID", dtype=dtype, rngs=rngs)
    self.k = conv(channels, channels, 1, padding="VALID", dtype=dtype, rngs=rngs)
    self.v = conv(channels, channels, 1, padding="VALID", dtype=dtype, rngs=rngs)
    self.proj_out = conv(channels, channels, 1, padding="VALID", dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    hn = self.norm(x)
    tokens = lambda t: t.reshape(b, h * w, 1, c)  # (batch, tokens, heads=1, channels)
    # jax.nn.dot_product_attention takes its softmax in float32 and picks cuDNN on GPU.
    out = jax.nn.dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)),
                                       tokens(self.v(hn)), scale=c**-0.5)
    return x.astype(out.dtype) + self.proj_out(out.reshape(b, h, w, c))


class Downsample(nnx.Module):
  """Pad right and bottom by one, then a stride-2 3x3 VALID conv (CompVis asymmetric pad)."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, stride=2, padding="VALID", dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, padding=PAD_1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """One resolution of the encoder or decoder: res blocks, optional attention, resampling."""

  def __init__(self, blocks: list, attns: list, resample_name: str | None, resample):
    self.block = nnx.List(blocks)
    self.attn = nnx.List(attns)
    if resample_name is not None:
      setattr(self, resample_name, resample)
    self._resample_name = resample_name

  def __call__(self, x: jax.Array, rngs, remat: bool) -> jax.Array:
    x = constrain(x)  # batch-split at every level's input and output (layers.constrain)
    for i, block in enumerate(self.block):
      x = _run(block, x, rngs, remat)
      if len(self.attn):
        x = _run(self.attn[i], x, None, remat)
    if self._resample_name is not None:
      x = getattr(self, self._resample_name)(x)
    return constrain(x)


class Mid(nnx.Module):
  def __init__(self, channels: int, *, spec: AutoencoderSpec, rngs: nnx.Rngs):
    dtype, groups = spec.compute_dtype, spec.norm_num_groups
    self.block_1 = ResnetBlock(channels, channels, dropout=spec.dropout, dtype=dtype, rngs=rngs,
                               groups=groups)
    self.attn_1 = (AttnBlock(channels, dtype=dtype, rngs=rngs, groups=groups)
                   if spec.attn_type == "vanilla" and spec.mid_block_attention else None)
    self.block_2 = ResnetBlock(channels, channels, dropout=spec.dropout, dtype=dtype, rngs=rngs,
                               groups=groups)

  def __call__(self, x: jax.Array, rngs, remat: bool) -> jax.Array:
    x = _run(self.block_1, constrain(x), rngs, remat)
    if self.attn_1 is not None:
      x = _run(self.attn_1, x, None, remat)
    return constrain(_run(self.block_2, x, rngs, remat))


def _run(block: nnx.Module, x: jax.Array, rngs, remat: bool) -> jax.Array:
  """Calls a block, rematerialized in the backward pass when asked."""
  if not isinstance(block, ResnetBlock):
    return nnx.remat(lambda m, h: m(h))(block, x) if remat else block(x)
  # rngs goes in as an argument: a closure would mutate it from inside the remat trace.
  return nnx.remat(lambda m, h, r: m(h, r))(block, x, rngs) if remat else block(x, rngs)


def _attn_levels(spec: AutoencoderSpec) -> list[bool]:
  """Whether level i (resolution / 2**i) has attention blocks."""
  return [spec.attn_type == "vanilla" and (spec.resolution // 2**i) in spec.attn_resolutions
          for i in range(len(spec.ch_mult))]


class Encoder(nnx.Module):
  def __init__(self, spec: AutoencoderSpec, *, double_z: bool, rngs: nnx.Rngs):
    dtype, ch = spec.compute_dtype, spec.ch
    self.remat = spec.remat
    self.conv_in = conv(spec.in_channels, ch, 3, padding=PAD_1, dtype=dtype, rngs=rngs)
    in_mult = (1,) + tuple(spec.ch_mult)
    levels = []
    for i, (with_attn, mult) in enumerate(zip(_attn_levels(spec), spec.ch_mult)):
      blocks, attns = [], []
      block_in = ch * in_mult[i]
      for _ in range(spec.num_res_blocks):
        blocks.append(ResnetBlock(block_in, ch * mult, dropout=spec.dropout, dtype=dtype,
                                  rngs=rngs, groups=spec.norm_num_groups))
        block_in = ch * mult
        if with_attn:
          attns.append(AttnBlock(block_in, dtype=dtype, rngs=rngs, groups=spec.norm_num_groups))
      last = i == len(spec.ch_mult) - 1
      levels.append(Level(blocks, attns, None if last else "downsample",
                          None if last else Downsample(block_in, dtype=dtype, rngs=rngs)))
    self.down = nnx.List(levels)
    block_in = ch * spec.ch_mult[-1]
    self.mid = Mid(block_in, spec=spec, rngs=rngs)
    self.norm_out = Normalize(block_in, rngs=rngs, num_groups=spec.norm_num_groups)
    out = 2 * spec.z_channels if double_z else spec.z_channels
    self.conv_out = conv(block_in, out, 3, padding=PAD_1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    h = self.conv_in(constrain(x))
    for level in self.down:
      h = level(h, rngs, self.remat)
    h = self.mid(h, rngs, self.remat)
    return constrain(self.conv_out(swish(self.norm_out(h))))


class Decoder(nnx.Module):
  """`up[0]` is the highest resolution, as in CompVis (built there with insert(0, ...))."""

  def __init__(self, spec: AutoencoderSpec, *, rngs: nnx.Rngs):
    dtype, ch = spec.compute_dtype, spec.ch
    self.remat = spec.remat
    block_in = ch * spec.ch_mult[-1]
    self.conv_in = conv(spec.z_channels, block_in, 3, padding=PAD_1, dtype=dtype, rngs=rngs)
    self.mid = Mid(block_in, spec=spec, rngs=rngs)
    attn_levels = _attn_levels(spec)
    levels = {}
    for i in reversed(range(len(spec.ch_mult))):
      blocks, attns = [], []
      for _ in range(spec.num_res_blocks + 1):
        blocks.append(ResnetBlock(block_in, ch * spec.ch_mult[i], dropout=spec.dropout,
                                  dtype=dtype, rngs=rngs, groups=spec.norm_num_groups))
        block_in = ch * spec.ch_mult[i]
        if attn_levels[i]:
          attns.append(AttnBlock(block_in, dtype=dtype, rngs=rngs, groups=spec.norm_num_groups))
      levels[i] = Level(blocks, attns, "upsample" if i else None,
                        Upsample(block_in, dtype=dtype, rngs=rngs) if i else None)
    self.up = nnx.List([levels[i] for i in range(len(spec.ch_mult))])
    self.norm_out = Normalize(block_in, rngs=rngs, num_groups=spec.norm_num_groups)
    self.conv_out = conv(block_in, spec.out_ch, 3, padding=PAD_1, dtype=dtype, rngs=rngs)

  def features(self, z: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Everything before `conv_out` (the GAN's adaptive weight differentiates past it)."""
    h = self.mid(self.conv_in(constrain(z)), rngs, self.remat)
    for level in reversed(self.up):
      h = level(h, rngs, self.remat)
    return constrain(swish(self.norm_out(h)))

  def to_image(self, features: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
    """`conv_out`, optionally with a replacement kernel; float32 output."""
    if kernel is None:
      return self.conv_out(features).astype(jnp.float32)
    dtype = self.conv_out.dtype or jnp.float32
    out = jax.lax.conv_general_dilated(
        features.astype(dtype), kernel.astype(dtype), (1, 1), PAD_1,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (out + self.conv_out.bias[...].astype(dtype)).astype(jnp.float32)

  def __call__(self, z: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.to_image(self.features(z, rngs))


class AutoencoderKL(nnx.Module):
  """KL-regularized autoencoder: `encode` gives a DiagonalGaussian, `decode` an image."""

  def __init__(self, spec: AutoencoderSpec, *, rngs: nnx.Rngs):
    if spec.kind != "kl":
      raise ValueError(f"AutoencoderKL needs kind='kl', got {spec.kind!r}")
    self.spec = spec
    self.latent_normalization = LatentNormalization()  # a loader sets the source's
    dtype = spec.compute_dtype
    self.encoder = Encoder(spec, double_z=True, rngs=rngs)
    self.decoder = Decoder(spec, rngs=rngs)
    # Absent (None) when off, so the state holds exactly the tensors the weights have.
    self.quant_conv = (conv(2 * spec.z_channels, 2 * spec.embed_dim, 1, padding="VALID",
                            dtype=dtype, rngs=rngs) if spec.use_quant_conv else None)
    self.post_quant_conv = _post_quant_conv(spec, rngs)

  def encode(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> DiagonalGaussian:
    h = self.encoder(x, rngs)
    return DiagonalGaussian.from_moments(h if self.quant_conv is None else self.quant_conv(h))

  def post_quant(self, z: jax.Array) -> jax.Array:
    """The latent as the decoder takes it (through post_quant_conv when there is one)."""
    return z if self.post_quant_conv is None else self.post_quant_conv(z)

  def decode(self, z: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.decoder(self.post_quant(z), rngs)

  def __call__(self, x: jax.Array, key: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, DiagonalGaussian]:
    """Reconstruction from a posterior sample (or its mode when `key` is None)."""
    posterior = self.encode(x, rngs)
    z = posterior.sample(key) if key is not None else posterior.mode()
    return self.decode(z, rngs), posterior

  def reconstructions(self, x: jax.Array, key: jax.Array, encode=None, decode=None):
    """(decoded posterior mode, decoded posterior sample): what evaluation scores and
    shows. `encode` / `decode` replace the plain calls (tiled ones, models.tiling)."""
    posterior = (encode or self.encode)(x)
    decode = decode or self.decode
    return decode(posterior.mode()), decode(posterior.sample(key))

  @property
  def last_layer(self) -> nnx.Param:
    """The decoder's output conv kernel: the adaptive GAN weight is computed from it."""
    return self.decoder.conv_out.kernel


class VQModel(nnx.Module):
  """VQ-regularized autoencoder with the LDM interface.

  `encode` returns the pre-quantization latent and `decode` quantizes it first, as the
  latent-diffusion `VQModelInterface` does; `__call__` is the training forward pass.
  """

  def __init__(self, spec: AutoencoderSpec, *, rngs: nnx.Rngs):
    if spec.kind != "vq":
      raise ValueError(f"VQModel needs kind='vq', got {spec.kind!r}")
    self.spec = spec
    self.latent_normalization = LatentNormalization()  # a loader sets the source's
    dtype = spec.compute_dtype
    self.encoder = Encoder(spec, double_z=False, rngs=rngs)
    self.decoder = Decoder(spec, rngs=rngs)
    self.quantize = VectorQuantizer(spec.n_embed, spec.embed_dim, beta=spec.beta,
                                    legacy=spec.legacy, remap=spec.remap,
                                    unknown_index=spec.unknown_index, rngs=rngs)
    self.quant_conv = (conv(spec.z_channels, spec.embed_dim, 1, padding="VALID", dtype=dtype,
                            rngs=rngs) if spec.use_quant_conv else None)
    self.post_quant_conv = _post_quant_conv(spec, rngs)

  def encode(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    h = self.encoder(x, rngs)
    return (h if self.quant_conv is None else self.quant_conv(h)).astype(jnp.float32)

  def post_quant(self, z_q: jax.Array) -> jax.Array:
    """The quantized latent as the decoder takes it."""
    return z_q if self.post_quant_conv is None else self.post_quant_conv(z_q)

  def decode(self, h: jax.Array, force_not_quantize: bool = False,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    if not force_not_quantize:
      h = self.quantize(h, remap=False).z_q
    return self.decoder(self.post_quant(h), rngs)

  def decode_code(self, indices: jax.Array) -> jax.Array:
    """Images from (B, H, W) code indices."""
    return self.decode(self.quantize.lookup(indices), force_not_quantize=True)

  def __call__(self, x: jax.Array, key: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, Quantized]:
    quantized = self.quantize(self.encode(x, rngs), key)
    return self.decode(quantized.z_q, force_not_quantize=True, rngs=rngs), quantized

  def reconstructions(self, x: jax.Array, key: jax.Array, encode=None, decode=None):
    """(reconstruction, None): a VQ code has no posterior to sample (see AutoencoderKL)."""
    del key
    return (decode or self.decode)((encode or self.encode)(x)), None

  @property
  def last_layer(self) -> nnx.Param:
    return self.decoder.conv_out.kernel


def _post_quant_conv(spec: AutoencoderSpec, rngs: nnx.Rngs):
  """latent (embed_dim) -> decoder input (z_channels), or None when the spec has none."""
  if not spec.use_post_quant_conv:
    return None
  return conv(spec.embed_dim, spec.z_channels, 1, padding="VALID", dtype=spec.compute_dtype,
              rngs=rngs)


def build_autoencoder(spec: AutoencoderSpec, rngs: nnx.Rngs | None = None):
  """AutoencoderKL or VQModel for `spec`, randomly initialised."""
  rngs = rngs or nnx.Rngs(0)
  return (AutoencoderKL if spec.kind == "kl" else VQModel)(spec, rngs=rngs)


@functools.lru_cache(maxsize=8)
def _abstract_parts(spec: AutoencoderSpec):
  return nnx.split(nnx.eval_shape(lambda: build_autoencoder(spec)))


def abstract_autoencoder(spec: AutoencoderSpec):
  """The model with shapes only, no memory: a target to load weights into. Tracing every
  layer's init takes seconds, so it happens once per spec and process; each call gets
  its own copy."""
  try:
    hash(spec)
  except TypeError:  # a field given as a list (a remap read from file): trace it afresh
    return nnx.eval_shape(lambda: build_autoencoder(spec))
  return nnx.merge(*_abstract_parts(spec), copy=True)
