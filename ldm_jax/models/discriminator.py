"""PatchGAN discriminator (taming-transformers' `NLayerDiscriminator`), NHWC.

Layers sit in `main`, numbered as in the reference's `nn.Sequential`, so PyTorch keys are
`main.{idx}.*` and weights convert by renaming leaves only. Parameter-free LeakyReLUs keep
their slots for that reason.

The reference runs its norms in training mode in both the generator and the discriminator
steps, so `__call__` defaults to `train=True` and *mutates state* on every call:
BatchNorm's running statistics and `num_batches_tracked`, and ActNorm's data-dependent
initialization (which writes `loc`/`scale` Params and the `initialized` Buffer on the first
training batch). A trainer must carry that state out of its jitted steps, the generator
step included: with `nnx.jit`/`nnx.grad` pass the discriminator in explicitly; with plain
`jax.jit` return its updated `nnx.state` and merge it.

Batch statistics are taken over the whole (global) batch, like SyncBatchNorm, which differs
from per-replica BatchNorm under PyTorch DDP; the single-device reference is what is matched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax.convert.torch_layout import LeafRule, register_leaf_rules
from ldm_jax.models.layers import Buffer, conv

PAD_1 = ((1, 1), (1, 1))
_KERNEL = 4


class LeakyReLU(nnx.Module):
  """Parameter-free; exists so that it occupies its index in `main` as in the reference."""

  def __init__(self, negative_slope: float = 0.2):
    self.negative_slope = negative_slope

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, self.negative_slope)


def _normal(mean: float, std: float):
  return lambda key, shape, dtype=jnp.float32: mean + std * jax.random.normal(key, shape, dtype)


class BatchNorm(nnx.BatchNorm):
  """`torch.nn.BatchNorm2d` semantics on NHWC input, computed in float32.

  Reuses nnx.BatchNorm's variables (and so its PyTorch names) but has its own forward:
  flax updates the running variance with the biased batch variance where PyTorch uses
  the unbiased one, and flax has no `num_batches_tracked`, which strict `load_state_dict`
  requires. Torch's momentum 0.1 is flax's 0.9.
  """

  def __init__(self, num_features: int, *, rngs: nnx.Rngs, momentum: float = 0.9,
               epsilon: float = 1e-5):
    super().__init__(num_features, momentum=momentum, epsilon=epsilon, dtype=jnp.float32,
                     param_dtype=jnp.float32, use_fast_variance=False,
                     scale_init=_normal(1.0, 0.02), rngs=rngs)
    self.num_batches_tracked = Buffer(jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:  # pytype: disable=signature-mismatch
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    if train:
      mean = jnp.mean(x, axis=axes)
      var = jnp.mean(jnp.square(x - mean), axis=axes)  # biased: used to normalize
      n = x.size // x.shape[-1]
      sg = jax.lax.stop_gradient
      unbiased = sg(var) * (n / max(n - 1, 1))
      self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * sg(mean)
      self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * unbiased
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    else:
      mean, var = self.mean[...], self.var[...]
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    return y * self.scale[...] + self.bias[...]


class ActNorm(nnx.Module):
  """taming's ActNorm (no logdet): `scale * (x + loc)`, initialized from the first batch.

  On the first training call loc = -mean and scale = 1/(std + 1e-6) per channel (unbiased
  std, as torch's default), then `initialized` is set to 1. The choice is made with
  `jnp.where` on the flag, so it also works under `jit`. As in the reference (which
  initializes under `no_grad` and then uses the Parameters), the forward sees the new
  values while gradients flow to `loc`/`scale` as Parameters, not through the batch
  statistics.
  """

  def __init__(self, num_features: int, *, eps: float = 1e-6):
    self.eps = eps
    self.loc = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.initialized = Buffer(jnp.zeros((), jnp.uint8))

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = x.astype(jnp.float32)
    loc, scale = self.loc[...], self.scale[...]
    if train:
      sg = jax.lax.stop_gradient
      axes = tuple(range(x.ndim - 1))
      fresh = self.initialized[...] == 0
      new_loc = jnp.where(fresh, -jnp.mean(sg(x), axis=axes), sg(loc))
      new_scale = jnp.where(fresh, 1.0 / (jnp.std(sg(x), axis=axes, ddof=1) + self.eps),
                            sg(scale))
      # Straight-through: the value of the (possibly new) init, the gradient of the Param.
      loc = loc + (new_loc - sg(loc))
      scale = scale + (new_scale - sg(scale))
      self.loc[...] = new_loc
      self.scale[...] = new_scale
      self.initialized[...] = jnp.ones((), jnp.uint8)
    return scale * (x + loc)


class NLayerDiscriminator(nnx.Module):
  """PatchGAN: a (B, H', W', 1) map of real/fake logits; 256x256 -> 30x30 with 3 layers.

  Norm layers (BatchNorm, or ActNorm with `use_actnorm`) take `train`; see the module
  docstring for the state they update. Convs compute in `dtype`, norms in float32, and
  the logits are returned in float32 for the loss.
  """

  def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3,
               use_actnorm: bool = False, *, rngs: nnx.Rngs, dtype=jnp.float32):
    use_bias = use_actnorm  # BatchNorm's shift makes a conv bias redundant.
    w_init = _normal(0.0, 0.02)

    def layer(c_in, c_out, stride, bias):
      return conv(c_in, c_out, _KERNEL, stride=stride, padding=PAD_1, use_bias=bias,
                  dtype=dtype, kernel_init=w_init, rngs=rngs)

    def norm(c):
      return ActNorm(c) if use_actnorm else BatchNorm(c, rngs=rngs)

    layers = [layer(input_nc, ndf, 2, True), LeakyReLU(0.2)]
    mult = 1
    for n in range(1, n_layers):
      prev, mult = mult, min(2**n, 8)
      layers += [layer(ndf * prev, ndf * mult, 2, use_bias), norm(ndf * mult), LeakyReLU(0.2)]
    prev, mult = mult, min(2**n_layers, 8)
    layers += [layer(ndf * prev, ndf * mult, 1, use_bias), norm(ndf * mult), LeakyReLU(0.2)]
    layers.append(layer(ndf * mult, 1, 1, True))
    self.main = nnx.List(layers)

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    for module in self.main:
      x = module(x, train=train) if isinstance(module, (BatchNorm, ActNorm)) else module(x)
    return x.astype(jnp.float32)


def _to_torch_channels(a: np.ndarray) -> np.ndarray:
  return a.reshape(1, -1, 1, 1)


register_leaf_rules(BatchNorm, {
    "scale": LeafRule("weight"), "bias": LeafRule("bias"),
    "mean": LeafRule("running_mean"), "var": LeafRule("running_var"),
    # torch keeps an int64 counter; JAX (without x64) an int32 one.
    "num_batches_tracked": LeafRule("num_batches_tracked", lambda a: a.astype(np.int64),
                                    lambda a: a.astype(np.int32)),
})
register_leaf_rules(ActNorm, {
    "loc": LeafRule("loc", _to_torch_channels, lambda a: a.reshape(-1)),
    "scale": LeafRule("scale", _to_torch_channels, lambda a: a.reshape(-1)),
    "initialized": LeafRule("initialized", lambda a: a.astype(np.uint8).reshape(()),
                            lambda a: a.astype(np.uint8).reshape(())),
})
