"""Layers shared by the first-stage models.

Convolutions compute in the configured dtype (bfloat16 on accelerators) with float32
parameters; group norms always compute in float32, as the references do.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


# Logical names of activations, resolved to mesh axes by the rules of
# ldm_jax.mesh (models know names, never meshes).
NHWC = ("batch", "height", "width", "channels")
BLC = ("batch", "length", "channels")
BC = ("batch", "channels")  # vectors per example: time embeddings, pooled text

# Set by ldm_jax.mesh.activation_sharding: (names, shape) -> a Sharding, or None to
# leave the array alone. Read at trace time, so it holds inside jit, remat and scan.
ACTIVATION_SHARDING: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "ldm_jax_activation_sharding", default=None)


def constrain(x: jax.Array, names: Sequence[str | None] = NHWC) -> jax.Array:
  """`with_sharding_constraint` by logical names at a block boundary.

  A no-op outside a mesh context (tests, conversion, single-device runs), so the numbers
  never depend on it; inside one it pins the batch split so XLA's propagation cannot
  wander into a layout that needs all-to-alls or whole-tensor rematerialization.
  """
  resolve = ACTIVATION_SHARDING.get()
  if resolve is None or x.ndim != len(names):
    return x
  sharding = resolve(tuple(names), tuple(x.shape))
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class Buffer(nnx.Variable):
  """Non-trainable state that PyTorch keeps as a registered buffer (saved, not optimized)."""


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


def torch_uniform_init(fan_in: int):
  """PyTorch's default conv/linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def conv(in_ch: int, out_ch: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1,
         padding: Any = "SAME", use_bias: bool = True, dtype=jnp.float32,
         kernel_init=None) -> nnx.Conv:
  """A 2D conv initialised like PyTorch's (kaiming-uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)))."""
  fan_in = in_ch * kernel * kernel
  return nnx.Conv(
      in_ch, out_ch, (kernel, kernel), strides=(stride, stride), padding=padding,
      use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=kernel_init or torch_uniform_init(fan_in),
      bias_init=torch_uniform_init(fan_in), rngs=rngs)


class Normalize(nnx.GroupNorm):
  """GroupNorm(32 groups) computed in float32 (CompVis `Normalize`); output is float32."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, eps: float = 1e-6,
               num_groups: int = 32):
    if channels % num_groups:
      raise ValueError(f"GroupNorm needs channels divisible by {num_groups}, got {channels}; "
                       "choose ch and ch_mult so every width is a multiple of 32")
    super().__init__(channels, num_groups=num_groups, epsilon=eps, dtype=jnp.float32,
                     use_fast_variance=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # pytype: disable=signature-mismatch
    return super().__call__(x.astype(jnp.float32))


def remat_call(module: nnx.Module, *args, rngs: nnx.Rngs | None = None):
  """`module(*args[, rngs])`, rematerialized in the backward pass.

  A pure jax.checkpoint over the module's split state rather than nnx.remat, so it also
  works on modules created outside the current trace (e.g. inside a sampler's scan).
  A dropout key is drawn outside and handed in, so the caller's Rngs still advance.
  """
  graphdef, state = nnx.split(module)
  key = rngs.dropout() if rngs is not None else None

  def run(state, key, *args):
    inner = nnx.merge(graphdef, state)
    return inner(*args, nnx.Rngs(dropout=key)) if key is not None else inner(*args)

  return jax.checkpoint(run)(state, key, *args)
