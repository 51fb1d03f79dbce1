"""The frozen CLIP text towers Stable Diffusion conditions on (REFERENCE section 8), and
CLIP's ViT image tower, which only the CLIP score (eval.clip_score) uses.

SD1 feeds the UNet the last hidden states (after the final LayerNorm) of the openai
ViT-L/14 text tower; SD2 feeds it the output of the second-to-last block of OpenCLIP's
ViT-H/14 text tower, passed through the same final LayerNorm. Both are pre-norm causal
transformers with learned absolute positions; they differ in the MLP activation (quick
GELU for openai CLIP, exact GELU for OpenCLIP) and in which layer is read.

The attribute names are transformers' `CLIPTextModel(WithProjection)` names, so a
transformers state dict loads without renaming (convert.text_encoder maps OpenCLIP's).
With output_layer="penultimate" the last block is never built: nothing reads it, and
diffusers' SD2 `text_encoder/` (23 layers, read at the last layer) is the same network.

The pooled output is the final-LN hidden state at the end-of-text token of the layer the
spec reads. "argmax" takes the position of the largest id (the end-of-text id is the
largest in CLIP's vocabulary; what open_clip and transformers' legacy configs with
eos_token_id == 2 do), "eos" the first position of `eos_token_id` (transformers' newer
configs). `embeds` = pooled @ text_projection, CLIP's text embedding (for a CLIP score).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ldm_jax.models.layers import BLC, constrain, remat_call, torch_uniform_init

ACTIVATIONS = ("quick_gelu", "gelu")
OUTPUT_LAYERS = ("last", "penultimate")
POOLINGS = ("argmax", "eos")


@dataclasses.dataclass(frozen=True)
class CLIPTextSpec:
  """A CLIP text tower. `depth` counts the blocks of the source model (24 for ViT-H) even
  when output_layer="penultimate" leaves the last one out."""

  vocab_size: int = 49408
  max_positions: int = 77
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 0  # 0: no text_projection (SD1's CLIPTextModel has none)
  output_layer: str = "last"
  pooling: str = "argmax"
  eos_token_id: int = 49407  # read by pooling="eos" only
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "max_positions", "width", "depth", "heads", "mlp_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"CLIP text {name}={getattr(self, name)} must be >= 1")
    if self.width % self.heads:
      raise ValueError(f"CLIP text width {self.width} is not divisible by {self.heads} heads")
    if self.projection_dim < 0:
      raise ValueError(f"projection_dim={self.projection_dim} must be >= 0 (0: none)")
    for name, allowed in (("activation", ACTIVATIONS), ("output_layer", OUTPUT_LAYERS),
                          ("pooling", POOLINGS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"CLIP text {name}={getattr(self, name)!r}; choose one of {allowed}")
    if self.output_layer == "penultimate" and self.depth < 2:
      raise ValueError("output_layer='penultimate' needs depth >= 2")

  @property
  def computed_depth(self) -> int:
    """The blocks that are built and run."""
    return self.depth - 1 if self.output_layer == "penultimate" else self.depth


# openai CLIP ViT-L/14 text tower (SD1 `FrozenCLIPEmbedder`; transformers CLIPTextModel).
SD1_TEXT = CLIPTextSpec(width=768, depth=12, heads=12, mlp_dim=3072, activation="quick_gelu",
                        projection_dim=768, output_layer="last")
# OpenCLIP ViT-H/14 text tower (SD2 `FrozenOpenCLIPEmbedder`, layer="penultimate").
SD2_TEXT = CLIPTextSpec(width=1024, depth=24, heads=16, mlp_dim=4096, activation="gelu",
                        projection_dim=1024, output_layer="penultimate")


class TextEncoding(NamedTuple):
  context: jax.Array  # [B, L, width] float32: what the UNet cross-attends to
  pooled: jax.Array  # [B, width] float32: the end-of-text token of `context`
  embeds: jax.Array | None  # [B, projection_dim] float32, None without a projection


def _linear(d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype, use_bias: bool = True):
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=torch_uniform_init(d_in), bias_init=torch_uniform_init(d_in),
                    rngs=rngs)


def _layer_norm(spec, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance in float32, as torch's layer_norm computes it.
  return nnx.LayerNorm(spec.width, epsilon=spec.layer_norm_eps, dtype=jnp.float32,
                       use_fast_variance=False, rngs=rngs)


class _Attention(nnx.Module):
  """Shared by both towers: the text tower's is causal, the image tower's sees all patches."""

  def __init__(self, spec, *, causal: bool = True, rngs: nnx.Rngs):
    dtype = jnp.dtype(spec.dtype)
    self.heads = spec.heads
    self.causal = causal
    self.q_proj = _linear(spec.width, spec.width, dtype=dtype, rngs=rngs)
    self.k_proj = _linear(spec.width, spec.width, dtype=dtype, rngs=rngs)
    self.v_proj = _linear(spec.width, spec.width, dtype=dtype, rngs=rngs)
    self.out_proj = _linear(spec.width, spec.width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, width = x.shape
    split = lambda t: t.reshape(b, n, self.heads, width // self.heads)
    # XLA's implementation takes the logits and the softmax in float32 for bf16 inputs.
    out = jax.nn.dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                       split(self.v_proj(x)), is_causal=self.causal)
    return self.out_proj(out.reshape(b, n, width))


class _MLP(nnx.Module):

  def __init__(self, spec, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(spec.dtype)
    self.activation = spec.activation
    self.fc1 = _linear(spec.width, spec.mlp_dim, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(spec.mlp_dim, spec.width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.fc1(x)
    if self.activation == "quick_gelu":
      h = h * jax.nn.sigmoid(1.702 * h)
    else:  # flax's default is the tanh approximation; both references use exact GELU
      h = jax.nn.gelu(h, approximate=False)
    return self.fc2(h)


class _Layer(nnx.Module):

  def __init__(self, spec, *, causal: bool = True, rngs: nnx.Rngs):
    self.layer_norm1 = _layer_norm(spec, rngs)
    self.self_attn = _Attention(spec, causal=causal, rngs=rngs)
    self.layer_norm2 = _layer_norm(spec, rngs)
    self.mlp = _MLP(spec, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    # The residual stream stays float32; only the matmuls run in the compute dtype.
    x = x + self.self_attn(self.layer_norm1(x)).astype(jnp.float32)
    return x + self.mlp(self.layer_norm2(x)).astype(jnp.float32)


class _Embeddings(nnx.Module):

  def __init__(self, spec: CLIPTextSpec, *, rngs: nnx.Rngs):
    self.token_embedding = nnx.Embed(spec.vocab_size, spec.width,
                                     embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.position_embedding = nnx.Embed(spec.max_positions, spec.width,
                                        embedding_init=nnx.initializers.normal(0.01),
                                        rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    x = self.token_embedding(ids).astype(jnp.float32)
    return x + self.position_embedding.embedding[...][:ids.shape[1]]


class _Encoder(nnx.Module):

  def __init__(self, spec, *, causal: bool = True, rngs: nnx.Rngs):
    self.layers = nnx.List([_Layer(spec, causal=causal, rngs=rngs)
                            for _ in range(spec.computed_depth)])


class _TextModel(nnx.Module):

  def __init__(self, spec: CLIPTextSpec, *, rngs: nnx.Rngs):
    self.embeddings = _Embeddings(spec, rngs=rngs)
    self.encoder = _Encoder(spec, rngs=rngs)
    self.final_layer_norm = _layer_norm(spec, rngs)


class CLIPTextTransformer(nnx.Module):
  """Token ids [B, L] (L <= max_positions) -> `context` (`__call__`) or a `TextEncoding`
  (`encode`). Frozen in SD: nothing here draws dropout."""

  def __init__(self, spec: CLIPTextSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    self.text_model = _TextModel(spec, rngs=rngs)
    self.text_projection = nnx.data(
        _linear(spec.width, spec.projection_dim, use_bias=False, dtype=jnp.dtype(spec.dtype),
                rngs=rngs) if spec.projection_dim else None)

  def _hidden(self, ids: jax.Array) -> jax.Array:
    if ids.ndim != 2:
      raise ValueError(f"token ids must be [batch, length], got shape {ids.shape}")
    if ids.shape[1] > self.spec.max_positions:
      raise ValueError(f"{ids.shape[1]} tokens exceed the encoder's {self.spec.max_positions} "
                       "positions; tokenize with max_length <= max_positions")
    tm = self.text_model
    x = constrain(tm.embeddings(ids.astype(jnp.int32)), BLC)
    for layer in tm.encoder.layers:
      x = constrain(remat_call(layer, x) if self.spec.remat else layer(x), BLC)
    return constrain(tm.final_layer_norm(x), BLC)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return self._hidden(ids)

  def encode(self, ids: jax.Array) -> TextEncoding:
    ids = jnp.asarray(ids).astype(jnp.int32)
    context = self._hidden(ids)
    if self.spec.pooling == "argmax":
      where = jnp.argmax(ids, axis=-1)
    else:  # first occurrence; position 0 when a row has none (as transformers does)
      where = jnp.argmax(ids == self.spec.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(context, where[:, None, None], axis=1)[:, 0]
    embeds = None
    if self.text_projection is not None:
      embeds = self.text_projection(pooled).astype(jnp.float32)
    return TextEncoding(context, pooled, embeds)


@functools.lru_cache(maxsize=8)
def _abstract_template(spec: CLIPTextSpec) -> CLIPTextTransformer:
  return nnx.eval_shape(lambda: CLIPTextTransformer(spec, rngs=nnx.Rngs(0)))


def abstract_clip_text(spec: CLIPTextSpec) -> CLIPTextTransformer:
  """Shapes only, no memory: a target to load weights into (one traced template per spec)."""
  return nnx.clone(_abstract_template(spec))


# --- the image tower (for the CLIP score) ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class CLIPVisionSpec:
  """A CLIP ViT image tower (transformers' CLIPVisionConfig fields)."""

  image_size: int = 224
  patch_size: int = 32
  channels: int = 3
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 0  # 0: no visual_projection (a bare CLIPVisionModel)
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    for name in ("image_size", "patch_size", "channels", "width", "depth", "heads", "mlp_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"CLIP vision {name}={getattr(self, name)} must be >= 1")
    if self.image_size % self.patch_size:
      # transformers floors the patch grid; a conv over the rest would see a partial patch.
      raise ValueError(f"CLIP vision image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")
    if self.width % self.heads:
      raise ValueError(f"CLIP vision width {self.width} is not divisible by {self.heads} heads")
    if self.projection_dim < 0:
      raise ValueError(f"projection_dim={self.projection_dim} must be >= 0 (0: none)")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"CLIP vision activation={self.activation!r}; choose one of "
                       f"{ACTIVATIONS}")

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1  # the patches and the class token

  @property
  def computed_depth(self) -> int:  # what _Encoder builds; every block is read here
    return self.depth


# openai/clip-vit-large-patch14's image tower: the CLIP torchmetrics' CLIPScore defaults to.
OPENAI_VIT_L14_VISION = CLIPVisionSpec(image_size=224, patch_size=14, width=1024, depth=24,
                                       heads=16, mlp_dim=4096, projection_dim=768)


class VisionEncoding(NamedTuple):
  hidden: jax.Array  # [B, 1 + patches, width] float32: the last block's output (no final LN)
  pooled: jax.Array  # [B, width] float32: the class token after post_layernorm
  embeds: jax.Array | None  # [B, projection_dim] float32, None without a projection


class _VisionEmbeddings(nnx.Module):

  def __init__(self, spec: CLIPVisionSpec, *, rngs: nnx.Rngs):
    fan_in = spec.channels * spec.patch_size ** 2
    self.class_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (spec.width,), jnp.float32) * spec.width ** -0.5)
    patch = (spec.patch_size, spec.patch_size)
    self.patch_embedding = nnx.Conv(spec.channels, spec.width, patch, strides=patch,
                                    padding="VALID", use_bias=False,
                                    dtype=jnp.dtype(spec.dtype), param_dtype=jnp.float32,
                                    kernel_init=torch_uniform_init(fan_in), rngs=rngs)
    self.position_embedding = nnx.Embed(spec.num_positions, spec.width,
                                        embedding_init=nnx.initializers.normal(0.02),
                                        rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    b = pixels.shape[0]
    patches = self.patch_embedding(pixels).astype(jnp.float32)
    # Row-major over the patch grid, as torch's flatten(2) over (H, W) orders them.
    patches = patches.reshape(b, -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, patches.shape[-1]))
    return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...]


class _VisionModel(nnx.Module):

  def __init__(self, spec: CLIPVisionSpec, *, rngs: nnx.Rngs):
    self.embeddings = _VisionEmbeddings(spec, rngs=rngs)
    self.pre_layrnorm = _layer_norm(spec, rngs)  # transformers' spelling, for its keys
    self.encoder = _Encoder(spec, causal=False, rngs=rngs)
    self.post_layernorm = _layer_norm(spec, rngs)


class CLIPVisionTransformer(nnx.Module):
  """Normalized pixels [B, S, S, C] (S = spec.image_size; positions are not interpolated,
  as transformers does by default) -> `VisionEncoding`. Frozen: no dropout."""

  def __init__(self, spec: CLIPVisionSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    self.vision_model = _VisionModel(spec, rngs=rngs)
    self.visual_projection = nnx.data(
        _linear(spec.width, spec.projection_dim, use_bias=False, dtype=jnp.dtype(spec.dtype),
                rngs=rngs) if spec.projection_dim else None)

  def encode(self, pixels: jax.Array) -> VisionEncoding:
    s, c = self.spec.image_size, self.spec.channels
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (s, s, c):
      raise ValueError(f"the CLIP image tower takes [batch, {s}, {s}, {c}] pixels, got shape "
                       f"{pixels.shape}; resize and crop them first (eval.clip_score)")
    vm = self.vision_model
    x = vm.pre_layrnorm(vm.embeddings(pixels))
    for layer in vm.encoder.layers:
      x = constrain(remat_call(layer, x) if self.spec.remat else layer(x), BLC)
    pooled = vm.post_layernorm(x[:, 0])
    embeds = None
    if self.visual_projection is not None:
      embeds = self.visual_projection(pooled).astype(jnp.float32)
    return VisionEncoding(x, pooled, embeds)

  def __call__(self, pixels: jax.Array) -> VisionEncoding:
    return self.encode(pixels)


@functools.lru_cache(maxsize=8)
def _abstract_vision_template(spec: CLIPVisionSpec) -> CLIPVisionTransformer:
  return nnx.eval_shape(lambda: CLIPVisionTransformer(spec, rngs=nnx.Rngs(0)))


def abstract_clip_vision(spec: CLIPVisionSpec) -> CLIPVisionTransformer:
  """Shapes only, no memory: a target to load weights into."""
  return nnx.clone(_abstract_vision_template(spec))
