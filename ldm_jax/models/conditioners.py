"""Condition encoders of the LDM: class labels and text, both trained with the UNet.

Both return a context sequence [B, L, D] for the UNet's cross-attention:

- `ClassEmbedder`: one learned vector per class, L = 1 (the cin256 model, 1001 classes of
  which the last is the "no class" id used by classifier-free guidance).
- `TextEncoder`: the LDM txt2img model's text transformer: token and learned absolute
  position embeddings, pre-norm blocks (LayerNorm, multi-head self-attention with bias-free
  q/k/v, LayerNorm, GELU MLP x4) and a final LayerNorm; every token attends to every
  other (no padding mask, as in the reference). Trained jointly with the UNet.

`Conditioner` picks one by `cond.kind` and knows the null condition classifier-free
guidance needs: the last class id, or the tokens of the empty caption.

kind "clip" is Stable Diffusion's text encoder (`models.clip.CLIPTextTransformer`, loaded
from a pipeline), frozen unless trained: frozen, its weights are `Buffer`s, so they sit
in the state's non-trained part (checkpointed, never optimized or averaged) and no
gradient reaches them. A batch may carry the encoder's output already ("context", from a
latent cache) instead of "tokens"; its null condition is then the empty prompt's context,
`null_context`, computed once from the frozen weights (`set_null_context`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax.models.layers import BLC, constrain, remat_call, torch_uniform_init


def _linear(d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool = True,
            dtype=jnp.float32) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=torch_uniform_init(d_in), bias_init=torch_uniform_init(d_in),
                    rngs=rngs)


class ClassEmbedder(nnx.Module):
  """Class id -> [B, 1, embed_dim]; `null_class` is the id guidance uses for "no class"."""

  def __init__(self, num_classes: int, embed_dim: int, *, rngs: nnx.Rngs):
    if num_classes < 2:
      raise ValueError(f"num_classes={num_classes}: need at least one class plus the null "
                       "class used by classifier-free guidance")
    self.num_classes = num_classes
    self.embedding = nnx.Embed(num_classes, embed_dim, embedding_init=nnx.initializers.normal(1.0),
                               rngs=rngs)

  @property
  def null_class(self) -> int:
    return self.num_classes - 1

  def __call__(self, labels: jax.Array) -> jax.Array:
    return constrain(self.embedding(labels.astype(jnp.int32))[:, None, :], BLC)


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
  """The txt2img-1p4B encoder is vocab 30522, width 1280, depth 32, 8 heads of 64 (REFERENCE)."""

  vocab_size: int = 30522
  max_length: int = 77
  width: int = 1280
  depth: int = 32
  heads: int = 8
  head_dim: int = 64
  mlp_mult: int = 4
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "max_length", "width", "depth", "heads", "head_dim",
                 "mlp_mult"):
      if getattr(self, name) < 1:
        raise ValueError(f"text encoder {name}={getattr(self, name)} must be >= 1")


class _SelfAttention(nnx.Module):

  def __init__(self, spec: TextEncoderSpec, *, rngs: nnx.Rngs):
    inner, dtype = spec.heads * spec.head_dim, jnp.dtype(spec.dtype)
    self.heads, self.head_dim = spec.heads, spec.head_dim
    self.to_q = _linear(spec.width, inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.to_k = _linear(spec.width, inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.to_v = _linear(spec.width, inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.to_out = _linear(inner, spec.width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    split = lambda t: t.reshape(b, n, self.heads, self.head_dim)
    out = jax.nn.dot_product_attention(split(self.to_q(x)), split(self.to_k(x)),
                                       split(self.to_v(x)), scale=self.head_dim**-0.5)
    return self.to_out(out.reshape(b, n, self.heads * self.head_dim))


class _Block(nnx.Module):

  def __init__(self, spec: TextEncoderSpec, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(spec.dtype)
    self.norm1 = nnx.LayerNorm(spec.width, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
    self.attn = _SelfAttention(spec, rngs=rngs)
    self.norm2 = nnx.LayerNorm(spec.width, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
    hidden = spec.width * spec.mlp_mult
    self.fc1 = _linear(spec.width, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden, spec.width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x)).astype(jnp.float32)
    h = jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False)
    return x + self.fc2(h).astype(jnp.float32)


class TextEncoder(nnx.Module):
  """Token ids [B, L] -> context [B, L, width] in float32 (the residual stream stays fp32)."""

  def __init__(self, spec: TextEncoderSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    init = nnx.initializers.normal(0.02)
    self.token_embedding = nnx.Embed(spec.vocab_size, spec.width, embedding_init=init,
                                     rngs=rngs)
    self.position_embedding = nnx.Param(init(rngs.params(), (spec.max_length, spec.width)))
    self.blocks = nnx.List([_Block(spec, rngs=rngs) for _ in range(spec.depth)])
    self.final_norm = nnx.LayerNorm(spec.width, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[1]
    if length > self.spec.max_length:
      raise ValueError(f"{length} tokens exceed the encoder's max_length "
                       f"{self.spec.max_length}; tokenize with the same max_length")
    x = self.token_embedding(tokens.astype(jnp.int32)).astype(jnp.float32)
    x = constrain(x + self.position_embedding[...][:length], BLC)
    for block in self.blocks:  # batch-split between blocks (layers.constrain)
      x = constrain(remat_call(block, x) if self.spec.remat else block(x), BLC)
    return constrain(self.final_norm(x), BLC)


KINDS = ("none", "class", "text", "clip")
FIELDS = {"none": (), "class": ("label",), "text": ("tokens",), "clip": ("tokens",)}


def freeze(module: nnx.Module) -> nnx.Module:
  """`module` with every Param turned into a Buffer: kept and saved, never trained."""
  from ldm_jax.models.layers import Buffer
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  frozen = jax.tree.map(lambda v: Buffer(v[...]), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, frozen, rest)


class Conditioner(nnx.Module):
  """Trained with the UNet; `null_fields` gives the unconditional input of the same shape."""

  def __init__(self, kind: str, *, rngs: nnx.Rngs, num_classes: int = 0, embed_dim: int = 0,
               text: TextEncoderSpec | None = None, null_tokens: np.ndarray | None = None,
               clip=None, train_text_encoder: bool = False):
    if kind not in KINDS:
      raise ValueError(f"cond.kind={kind!r} is not supported; choose one of {KINDS}")
    self.kind = kind
    encoder = None
    if kind == "class":
      encoder = ClassEmbedder(num_classes, embed_dim, rngs=rngs)
    elif kind == "text":
      if text is None or null_tokens is None:
        raise ValueError("a text conditioner needs the encoder spec and the empty caption's "
                         "tokens")
      encoder = TextEncoder(text, rngs=rngs)
      self.null_tokens = tuple(int(t) for t in np.asarray(null_tokens).reshape(-1))
    elif kind == "clip":
      from ldm_jax.models.clip import CLIPTextTransformer
      if clip is None or null_tokens is None:
        raise ValueError("a clip conditioner needs the CLIPTextSpec and the empty prompt's "
                         "tokens")
      encoder = CLIPTextTransformer(clip, rngs=rngs)
      if not train_text_encoder:
        encoder = freeze(encoder)
      self.null_tokens = tuple(int(t) for t in np.asarray(null_tokens).reshape(-1))
      from ldm_jax.models.layers import Buffer
      self.null_context = Buffer(jnp.zeros((1, len(self.null_tokens), clip.width),
                                           jnp.float32))
    self.encoder = nnx.data(encoder)  # None for unconditional models

  @property
  def fields(self) -> tuple[str, ...]:
    return FIELDS[self.kind]

  def set_null_context(self) -> None:
    """The empty prompt's context from the (frozen) encoder, for batches that carry
    contexts instead of tokens: the cached run's caption dropout and guidance."""
    tokens = jnp.asarray(self.null_tokens, jnp.int32)[None]
    self.null_context[...] = jax.lax.stop_gradient(self.encoder(tokens)).astype(jnp.float32)

  def null_fields(self, batch_size: int, keys=()) -> dict:
    """The unconditional input; `keys` (the conditional side's fields) says whether a clip
    model's batch carries tokens or encoded contexts."""
    if self.kind == "class":
      return {"label": jnp.full((batch_size,), self.encoder.null_class, jnp.int32)}
    if self.kind == "clip" and "context" in keys:
      context = self.null_context[...]
      return {"context": jnp.broadcast_to(context, (batch_size,) + context.shape[1:])}
    if self.kind in ("text", "clip"):
      return {"tokens": jnp.broadcast_to(jnp.asarray(self.null_tokens, jnp.int32),
                                         (batch_size, len(self.null_tokens)))}
    return {}

  def __call__(self, fields: dict) -> jax.Array | None:
    """The context for the UNet, or None when unconditional."""
    if self.kind == "class":
      return self.encoder(fields["label"])
    if self.kind == "text":
      return self.encoder(fields["tokens"])
    if self.kind == "clip":
      if "context" in fields:  # encoded when the latent cache was written
        return fields["context"].astype(jnp.float32)
      return self.encoder(fields["tokens"])
    return None

