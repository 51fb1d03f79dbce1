"""The LDM denoiser: CompVis openaimodel's UNet with cross-attention, NHWC, in Flax NNX.

The architecture is latent-diffusion's (`UNetModel`): a sinusoidal timestep embedding
(cos first) through a two-layer SiLU MLP, ResBlocks taking that embedding (added, or as a
scale and shift of the second norm), attention at the downsampling factors listed in
`attention_resolutions` (the legacy single-tensor `qkv` AttentionBlock, or a
SpatialTransformer with cross-attention on a context), a symmetric-pad stride-2 conv to go
down, nearest x2 and a conv to go up, and skip connections from every input block.

Module names follow diffusers' UNet2DConditionModel (`down_blocks.i.resnets.j.norm1`,
`mid_block`, `up_blocks`, `time_embedding.linear_1`, ...), so a diffusers state dict maps
onto this tree leaf for leaf; the CompVis layout is a key map away
(`ldm_jax.convert.unet`). The legacy AttentionBlock, which diffusers' conditional UNet
lacks, keeps its CompVis names (`norm`, `qkv`, `proj_out`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ldm_jax.models.layers import BC, BLC, Normalize, constrain, conv, remat_call, torch_uniform_init

PAD_1 = ((1, 1), (1, 1))


@dataclasses.dataclass(frozen=True)
class UNetSpec:
  """The UNet's architecture, with CompVis `UNetModel` argument names."""

  in_channels: int = 4
  out_channels: int = 4
  model_channels: int = 320
  attention_resolutions: tuple[int, ...] = (4, 2, 1)
  num_res_blocks: int = 2
  channel_mult: tuple[int, ...] = (1, 2, 4, 4)
  dropout: float = 0.0
  conv_resample: bool = True
  num_heads: int = 8
  num_head_channels: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_spatial_transformer: bool = False
  transformer_depth: int = 1
  context_dim: int = 0
  use_linear_in_transformer: bool = False
  num_classes: int = 0
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    problems = []
    if self.num_heads == -1 and self.num_head_channels == -1:
      problems.append("set num_heads or num_head_channels")
    if self.use_spatial_transformer and self.context_dim <= 0:
      problems.append("use_spatial_transformer needs context_dim > 0")
    if not self.channel_mult or self.num_res_blocks < 1:
      problems.append("channel_mult must be non-empty and num_res_blocks >= 1")
    for mult in self.channel_mult:
      if (self.model_channels * mult) % 32:
        problems.append(f"model_channels * {mult} is not a multiple of 32 (GroupNorm32)")
    attended = {self.model_channels * self.channel_mult[-1]} | {
        self.model_channels * m for i, m in enumerate(self.channel_mult)
        if 2**i in self.attention_resolutions}
    split = self.num_heads if self.num_head_channels == -1 else self.num_head_channels
    if split > 0 and any(width % split for width in attended):
      problems.append(f"attention widths {sorted(attended)} are not all divisible by "
                      f"{'num_heads' if self.num_head_channels == -1 else 'num_head_channels'}"
                      f"={split}")
    if problems:
      raise ValueError("invalid UNet config: " + "; ".join(problems))

  @classmethod
  def from_config(cls, config: Any) -> "UNetSpec":
    known = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(config).items() if k in known}
    unknown = sorted(set(dict(config)) - known)
    if unknown:
      raise ValueError(f"unknown unet config keys {unknown}; valid: {sorted(known)}")
    for name in ("attention_resolutions", "channel_mult"):
      if name in values:
        values[name] = tuple(int(v) for v in values[name])
    return cls(**values)

  def heads(self, channels: int) -> tuple[int, int]:
    """(number of heads, channels per head) of an attention layer over `channels`."""
    if self.num_head_channels == -1:
      return self.num_heads, channels // self.num_heads
    return channels // self.num_head_channels, self.num_head_channels

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """[cos(t f), sin(t f)] with f = max_period^(-i / half), float32, shape [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _linear(d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool = True,
            dtype=jnp.float32) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=torch_uniform_init(d_in), bias_init=torch_uniform_init(d_in),
                    rngs=rngs)


def _silu(x: jax.Array) -> jax.Array:
  return jax.nn.silu(x)


def _dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  if rate <= 0 or rngs is None:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _zeroed(module: nnx.Module) -> nnx.Module:
  """CompVis `zero_module`: a residual branch or the output starts at exactly zero, so a
  fresh UNet begins as a stack of identities and predicts zero."""
  params = nnx.state(module, nnx.Param)
  nnx.update(module, jax.tree.map(jnp.zeros_like, params))
  return module


class Identity(nnx.Module):
  """A parameterless slot, so indices in module lists line up with the reference's."""

  def __call__(self, x):
    return x


class TimestepEmbedding(nnx.Module):

  def __init__(self, channels: int, dim: int, *, rngs: nnx.Rngs):
    self.linear_1 = _linear(channels, dim, rngs=rngs)
    self.linear_2 = _linear(dim, dim, rngs=rngs)

  def __call__(self, emb: jax.Array) -> jax.Array:
    # [B, C] activations batch-split (layers.constrain): left free, XLA lays them out by
    # the fsdp-split kernels and moves them with all-to-alls (bench/README.md).
    hidden = constrain(self.linear_1(constrain(emb, BC)), BC)
    return constrain(self.linear_2(_silu(hidden)), BC)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv with padding 1 on every side (not the autoencoder's asymmetric pad)."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, stride=2, padding=PAD_1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return constrain(self.conv(x))  # batch-split, as ResBlock's convolutions


class Upsample(nnx.Module):

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, padding=PAD_1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return constrain(self.conv(_nearest_x2(x)))  # batch-split, as ResBlock's convolutions


def _nearest_x2(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool_x2(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nnx.Module):
  """GN-SiLU-conv, plus the time embedding (added, or scale/shift of the second GN),
  GN-SiLU-dropout-conv, and a 1x1 shortcut when the width changes. `resample` "up" or
  "down" resizes both paths after the first norm (resblock_updown)."""

  def __init__(self, channels: int, emb_dim: int, out_channels: int, spec: UNetSpec, *,
               rngs: nnx.Rngs, resample: str | None = None):
    dtype = spec.compute_dtype
    self.scale_shift = spec.use_scale_shift_norm
    self.dropout = spec.dropout
    self.resample = resample
    self.norm1 = Normalize(channels, eps=1e-5, rngs=rngs)
    self.conv1 = conv(channels, out_channels, 3, padding=PAD_1, dtype=dtype, rngs=rngs)
    self.time_emb_proj = _linear(emb_dim, 2 * out_channels if self.scale_shift else out_channels,
                                 dtype=dtype, rngs=rngs)
    self.norm2 = Normalize(out_channels, eps=1e-5, rngs=rngs)
    self.conv2 = _zeroed(conv(out_channels, out_channels, 3, padding=PAD_1, dtype=dtype,
                              rngs=rngs))
    self.conv_shortcut = nnx.data(
        conv(channels, out_channels, 1, padding="VALID", dtype=dtype, rngs=rngs)
        if channels != out_channels else None)

  def _resize(self, x: jax.Array) -> jax.Array:
    if self.resample == "up":
      return _nearest_x2(x)
    if self.resample == "down":
      return _avg_pool_x2(x)
    return x

  def __call__(self, x: jax.Array, emb: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    h = _silu(self.norm1(x))
    h, x = self._resize(h), self._resize(x)
    # The convolutions' outputs batch-split (layers.constrain): with the kernels' output
    # channels fsdp-split, XLA otherwise leaves them channel-split into the GroupNorm's
    # group reshape and the residual sum, and re-lays them out there (all-to-alls).
    h = constrain(self.conv1(h))
    e = constrain(self.time_emb_proj(_silu(emb)), BC).astype(jnp.float32)[:, None, None, :]
    if self.scale_shift:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = self.norm2(h) * (1.0 + scale) + shift
    else:
      h = self.norm2(h + e)
    h = constrain(self.conv2(_dropout(_silu(h), self.dropout, rngs)))
    skip = constrain(self.conv_shortcut(x)) if self.conv_shortcut is not None else x
    return skip.astype(h.dtype) + h


class LegacyAttention(nnx.Module):
  """CompVis AttentionBlock: one 1x1 `qkv` projection whose output interleaves each head's
  q, k and v ([q_h, k_h, v_h] per head), self-attention over all positions, `proj_out`."""

  def __init__(self, channels: int, spec: UNetSpec, *, rngs: nnx.Rngs):
    dtype = spec.compute_dtype
    self.num_heads, self.head_dim = spec.heads(channels)
    self.norm = Normalize(channels, eps=1e-5, rngs=rngs)
    self.qkv = nnx.Conv(channels, 3 * channels, (1,), dtype=dtype, param_dtype=jnp.float32,
                        kernel_init=torch_uniform_init(channels),
                        bias_init=torch_uniform_init(channels), rngs=rngs)
    self.proj_out = _zeroed(nnx.Conv(channels, channels, (1,), dtype=dtype,
                                     param_dtype=jnp.float32, rngs=rngs))

  def __call__(self, x: jax.Array, context=None, rngs=None) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.norm(x).reshape(b, h * w, c)
    # Batch-split (layers.constrain): else the qkv kernel's fsdp split propagates into the
    # activation and its gradient, and XLA rematerializes whole tensors to undo it.
    qkv = constrain(self.qkv(constrain(tokens, BLC)), BLC)
    qkv = qkv.reshape(b, h * w, self.num_heads, 3, self.head_dim)
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    out = jax.nn.dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
    out = constrain(self.proj_out(constrain(out.reshape(b, h * w, c), BLC)), BLC)
    return x.astype(out.dtype) + out.reshape(b, h, w, c)


class Attention(nnx.Module):
  """Multi-head (cross-)attention: bias-free q/k/v, output projection with bias."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, context_dim: int | None = None,
               dtype, rngs: nnx.Rngs):
    inner = heads * head_dim
    self.heads, self.head_dim = heads, head_dim
    self.to_q = _linear(dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.to_k = _linear(context_dim or dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.to_v = _linear(context_dim or dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.to_out = nnx.List([_linear(inner, dim, dtype=dtype, rngs=rngs), Identity()])

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    b, n, _ = x.shape
    # Projections batch-split (layers.constrain), as in LegacyAttention.
    split = lambda t: constrain(t, BLC).reshape(b, t.shape[1], self.heads, self.head_dim)
    out = jax.nn.dot_product_attention(split(self.to_q(x)), split(self.to_k(context)),
                                       split(self.to_v(context)), scale=self.head_dim**-0.5)
    out = constrain(out.reshape(b, n, self.heads * self.head_dim), BLC)
    return constrain(self.to_out[0](out), BLC)


class GEGLU(nnx.Module):

  def __init__(self, dim: int, inner: int, *, dtype, rngs: nnx.Rngs):
    self.proj = _linear(dim, 2 * inner, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    # Batch-split before the split into halves: with the kernel's output dimension
    # fsdp-split, XLA otherwise re-lays the halves out with all-to-alls.
    value, gate = jnp.split(constrain(self.proj(x), BLC), 2, axis=-1)
    gated = value * jax.nn.gelu(gate.astype(jnp.float32), approximate=False).astype(value.dtype)
    return constrain(gated, BLC)


class FeedForward(nnx.Module):

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs, mult: int = 4):
    self.net = nnx.List([GEGLU(dim, dim * mult, dtype=dtype, rngs=rngs), Identity(),
                         _linear(dim * mult, dim, dtype=dtype, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    return constrain(self.net[2](self.net[0](x)), BLC)


class TransformerBlock(nnx.Module):
  """x += attn1(LN(x)); x += attn2(LN(x), context); x += GEGLU-FF(LN(x)), in float32."""

  def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, *, dtype,
               rngs: nnx.Rngs):
    ln = lambda: nnx.LayerNorm(dim, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
    self.norm1, self.norm2, self.norm3 = ln(), ln(), ln()
    self.attn1 = Attention(dim, heads, head_dim, dtype=dtype, rngs=rngs)
    self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, dtype=dtype,
                           rngs=rngs)
    self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
    x = x + self.attn1(self.norm1(x)).astype(jnp.float32)
    x = x + self.attn2(self.norm2(x), context).astype(jnp.float32)
    return x + self.ff(self.norm3(x)).astype(jnp.float32)


class SpatialTransformer(nnx.Module):
  """GN, projection in (1x1 conv, or linear), transformer blocks, projection out, residual.

  No dropout: CompVis builds its transformers without the UNet's dropout rate.
  """

  def __init__(self, channels: int, spec: UNetSpec, *, rngs: nnx.Rngs):
    dtype = spec.compute_dtype
    heads, head_dim = spec.heads(channels)
    inner = heads * head_dim
    self.linear = spec.use_linear_in_transformer
    self.norm = Normalize(channels, eps=1e-6, rngs=rngs)
    if self.linear:
      self.proj_in = _linear(channels, inner, dtype=dtype, rngs=rngs)
      self.proj_out = _zeroed(_linear(inner, channels, dtype=dtype, rngs=rngs))
    else:
      self.proj_in = conv(channels, inner, 1, padding="VALID", dtype=dtype, rngs=rngs)
      self.proj_out = _zeroed(conv(inner, channels, 1, padding="VALID", dtype=dtype,
                                   rngs=rngs))
    self.transformer_blocks = nnx.List([
        TransformerBlock(inner, heads, head_dim, spec.context_dim, dtype=dtype, rngs=rngs)
        for _ in range(spec.transformer_depth)])

  def __call__(self, x: jax.Array, context: jax.Array | None = None, rngs=None) -> jax.Array:
    b, h, w, c = x.shape
    # The input batch-split, and so its gradient, into which the residual and the
    # projection's input gradient sum.
    x = constrain(x)
    hidden = self.norm(x)
    # The projections' outputs batch-split before any reshape (layers.constrain), as
    # ResBlock's convolutions: a channel-split output meets the reshape or the residual
    # sum in another layout otherwise.
    if self.linear:  # constrained just below, after the cast
      hidden = self.proj_in(hidden.reshape(b, h * w, c))
    else:
      hidden = constrain(self.proj_in(hidden))
      hidden = hidden.reshape(b, h * w, hidden.shape[-1])
    hidden = constrain(hidden.astype(jnp.float32), BLC)
    for block in self.transformer_blocks:
      hidden = constrain(block(hidden, context), BLC)
    if self.linear:
      hidden = constrain(self.proj_out(hidden), BLC).reshape(b, h, w, c)
    else:
      hidden = constrain(self.proj_out(hidden.reshape(b, h, w, -1)))
    return x.astype(hidden.dtype) + hidden


def _attention(channels: int, spec: UNetSpec, rngs: nnx.Rngs) -> nnx.Module:
  if spec.use_spatial_transformer:
    return SpatialTransformer(channels, spec, rngs=rngs)
  return LegacyAttention(channels, spec, rngs=rngs)


def _resampler(channels: int, emb_dim: int, spec: UNetSpec, rngs: nnx.Rngs, direction: str):
  if spec.resblock_updown:
    return ResBlock(channels, emb_dim, channels, spec, rngs=rngs, resample=direction)
  if not spec.conv_resample:
    return Identity()  # pooling / nearest without a conv: see _resample
  cls = Downsample if direction == "down" else Upsample
  return cls(channels, dtype=spec.compute_dtype, rngs=rngs)


class Level(nnx.Module):
  """One resolution of the down or up path: ResBlocks, their attention, a resampler."""

  def __init__(self, resnets: list, attentions: list, resampler, direction: str):
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List(attentions)
    name = "downsamplers" if direction == "down" else "upsamplers"
    setattr(self, name, nnx.List([resampler] if resampler is not None else []))
    self.direction = direction

  @property
  def resamplers(self):
    return self.downsamplers if self.direction == "down" else self.upsamplers


class UNetModel(nnx.Module):
  """`model(x, timesteps, context=None, y=None) -> output` (NHWC, same size as x).

  `context` [B, L, context_dim] feeds the cross-attention; `y` [B] class ids (with
  `num_classes`) add a label embedding to the time embedding.
  """

  def __init__(self, spec: UNetSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    dtype = spec.compute_dtype
    mc = spec.model_channels
    emb_dim = 4 * mc
    self.time_embedding = TimestepEmbedding(mc, emb_dim, rngs=rngs)
    self.class_embedding = nnx.data(
        nnx.Embed(spec.num_classes, emb_dim, embedding_init=nnx.initializers.normal(1.0),
                  rngs=rngs) if spec.num_classes else None)
    self.conv_in = conv(spec.in_channels, mc, 3, padding=PAD_1, dtype=dtype, rngs=rngs)
    skips, ch, ds = [mc], mc, 1
    down = []
    for level, mult in enumerate(spec.channel_mult):
      resnets, attentions = [], []
      for _ in range(spec.num_res_blocks):
        resnets.append(ResBlock(ch, emb_dim, mult * mc, spec, rngs=rngs))
        ch = mult * mc
        if ds in spec.attention_resolutions:
          attentions.append(_attention(ch, spec, rngs))
        skips.append(ch)
      resampler = None
      if level != len(spec.channel_mult) - 1:
        resampler = _resampler(ch, emb_dim, spec, rngs, "down")
        skips.append(ch)
        ds *= 2
      down.append(Level(resnets, attentions, resampler, "down"))
    self.down_blocks = nnx.List(down)
    self.mid_block = Level([ResBlock(ch, emb_dim, ch, spec, rngs=rngs),
                            ResBlock(ch, emb_dim, ch, spec, rngs=rngs)],
                           [_attention(ch, spec, rngs)], None, "mid")
    up = []
    for level, mult in reversed(list(enumerate(spec.channel_mult))):
      resnets, attentions = [], []
      for _ in range(spec.num_res_blocks + 1):
        resnets.append(ResBlock(ch + skips.pop(), emb_dim, mult * mc, spec, rngs=rngs))
        ch = mult * mc
        if ds in spec.attention_resolutions:
          attentions.append(_attention(ch, spec, rngs))
      resampler = None
      if level:
        resampler = _resampler(ch, emb_dim, spec, rngs, "up")
        ds //= 2
      up.append(Level(resnets, attentions, resampler, "up"))
    self.up_blocks = nnx.List(up)
    self.conv_norm_out = Normalize(ch, eps=1e-5, rngs=rngs)
    self.conv_out = _zeroed(conv(ch, spec.out_channels, 3, padding=PAD_1, dtype=dtype,
                                 rngs=rngs))

  def _block(self, module, x, extra, rngs):
    """Calls a block, rematerialized in the backward pass when the spec asks."""
    if self.spec.remat:
      return remat_call(module, x, extra, rngs=rngs)
    return module(x, extra, rngs)

  def _resample(self, module, x, emb, rngs, direction):
    if isinstance(module, ResBlock):
      return self._block(module, x, emb, rngs)
    if isinstance(module, Identity):
      return _avg_pool_x2(x) if direction == "down" else _nearest_x2(x)
    return module(x)

  def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array | None = None,
               y: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
    if (y is not None) != (self.class_embedding is not None):
      raise ValueError("pass class ids y exactly when the UNet has num_classes > 0")
    if self.spec.use_spatial_transformer and context is None:
      raise ValueError("this UNet cross-attends: pass context [B, L, context_dim]")
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (x.shape[0],))
    emb = self.time_embedding(timestep_embedding(timesteps, self.spec.model_channels))
    if self.class_embedding is not None:
      emb = emb + constrain(self.class_embedding(y.astype(jnp.int32)), BC).astype(emb.dtype)
    # Batch-split activations at every level's input and output, the time embedding and
    # the context (layers.constrain: a no-op outside a mesh context).
    emb = constrain(emb, BC)
    if context is not None:
      context = constrain(context, BLC)
    h = constrain(self.conv_in(constrain(x).astype(self.spec.compute_dtype)))
    skips = [h]
    for level in self.down_blocks:
      for i, resnet in enumerate(level.resnets):
        h = self._block(resnet, h, emb, rngs)
        if len(level.attentions):
          h = self._block(level.attentions[i], h, context, rngs)
        skips.append(h)
      for resampler in level.downsamplers:
        h = self._resample(resampler, h, emb, rngs, "down")
        skips.append(h)
      h = skips[-1] = constrain(h)
    h = self._block(self.mid_block.resnets[0], h, emb, rngs)
    h = self._block(self.mid_block.attentions[0], h, context, rngs)
    h = constrain(self._block(self.mid_block.resnets[1], h, emb, rngs))
    for level in self.up_blocks:
      for i, resnet in enumerate(level.resnets):
        skip = skips.pop()
        # The concatenation batch-split, and so its gradient, which is split back in two
        # along channels: left free, XLA re-lays those halves out with all-to-alls.
        h = self._block(resnet, constrain(jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)),
                        emb, rngs)
        if len(level.attentions):
          h = self._block(level.attentions[i], h, context, rngs)
      for resampler in level.upsamplers:
        h = self._resample(resampler, h, emb, rngs, "up")
      h = constrain(h)
    return constrain(self.conv_out(_silu(self.conv_norm_out(h))).astype(jnp.float32))



@functools.lru_cache(maxsize=8)
def _abstract_template(spec: UNetSpec) -> UNetModel:
  return nnx.eval_shape(lambda: UNetModel(spec, rngs=nnx.Rngs(0)))


def abstract_unet(spec: UNetSpec) -> UNetModel:
  """The model with shapes only, no memory: a target to load weights into. Tracing the
  constructor takes seconds, so one template per spec is kept and copied."""
  return nnx.clone(_abstract_template(spec))
