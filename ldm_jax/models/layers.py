"""Layers shared by the first-stage models.

Convolutions compute in the configured dtype (bfloat16 on accelerators) with float32
parameters; group norms always compute in float32, as the references do.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


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
