"""The first-stage train state and its pure, jit-compiled update.

One call of the step is one optimizer update of both the autoencoder ("generator") and
the discriminator, over `accumulate_grad_batches` micro-batches inside the step.
The discriminator sees the reconstructions of the pre-update generator (the Lightning
reference recomputes them after the generator's step, one update later).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ldm_jax.losses.autoencoder import LossConfig, discriminator_loss, generator_loss
from ldm_jax.models.autoencoder import AutoencoderSpec, abstract_autoencoder
from ldm_jax.models.discriminator import ActNorm, BatchNorm, NLayerDiscriminator
from ldm_jax.models.distributions import DiagonalGaussian
from ldm_jax.train import guard
from ldm_jax.train import mesh as mesh_lib
from ldm_jax.train.optim import ema_update

sg = jax.lax.stop_gradient

# What the non-finite guard checks each step, in the order its report encodes them.
# "state": every updated array (parameters, Adam moments, EMA, discriminator statistics):
# a finite gradient can still overflow Adam's second moment.
GUARDED = ("total_loss", "disc_loss", "grad_norm", "disc_grad_norm", "state")


def merge(graphdef, *states):
  """nnx.merge with fresh Variables, so modules built inside a trace may mutate them."""
  return nnx.merge(graphdef, *states, copy=True)


@struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # trained autoencoder parameters
  frozen: nnx.State  # autoencoder parameters held fixed (decoder-only fine-tuning)
  rest: nnx.State  # other autoencoder variables (buffers)
  opt_state: Any
  disc_params: nnx.State
  disc_rest: nnx.State  # BatchNorm statistics, ActNorm flags
  disc_opt_state: Any
  ema: nnx.State | None  # LitEma shadow of `params`
  rng: jax.Array  # raw uint32 key data


@dataclasses.dataclass(frozen=True)
class Programs:
  """Static structure the step needs: module graphs and optimizers."""

  model_def: nnx.GraphDef
  disc_def: nnx.GraphDef
  lpips_def: nnx.GraphDef | None
  tx: optax.GradientTransformation
  disc_tx: optax.GradientTransformation
  loss: LossConfig
  ema_decay: float


def trainable_filter(decoder_only: bool):
  """Decoder-only fine-tuning trains decoder and post_quant_conv, so latents do not move."""
  if decoder_only:
    return nnx.All(nnx.Param, nnx.Any(nnx.PathContains("decoder"),
                                      nnx.PathContains("post_quant_conv")))
  return nnx.Param


def split_model(model, decoder_only: bool):
  return nnx.split(model, trainable_filter(decoder_only), nnx.Param, ...)


def build_discriminator(loss: LossConfig, dtype: str, seed: int) -> NLayerDiscriminator:
  return NLayerDiscriminator(input_nc=loss.disc_in_channels, ndf=loss.disc_ndf,
                             n_layers=loss.disc_num_layers, use_actnorm=loss.use_actnorm,
                             dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed + 1))


def new_state(model, disc, programs: Programs, decoder_only: bool, seed: int) -> TrainState:
  _, params, frozen, rest = split_model(model, decoder_only)
  _, disc_params, disc_rest = nnx.split(disc, nnx.Param, ...)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, rest=rest,
      opt_state=programs.tx.init(params), disc_params=disc_params, disc_rest=disc_rest,
      disc_opt_state=programs.disc_tx.init(disc_params),
      ema=jax.tree.map(jnp.copy, params) if programs.ema_decay > 0 else None,
      rng=jax.random.key_data(jax.random.key(seed)))


def make_programs(spec: AutoencoderSpec, loss: LossConfig, tx, disc_tx, ema_decay: float,
                  decoder_only: bool, lpips_def=None) -> Programs:
  model_def = split_model(abstract_autoencoder(spec), decoder_only)[0]
  disc_def = nnx.split(nnx.eval_shape(lambda: build_discriminator(loss, spec.dtype, 0)))[0]
  return Programs(model_def, disc_def, lpips_def, tx, disc_tx, loss, ema_decay)


def _generator_forward(model, x: jax.Array, key: jax.Array):
  """Decoder features before conv_out, and the regularizer (posterior or codebook loss)."""
  if model.spec.kind == "kl":
    posterior: DiagonalGaussian = model.encode(x)
    z = posterior.sample(key)
    return model.decoder.features(model.post_quant(z)), posterior
  quantized = model.quantize(model.encode(x), key)
  return model.decoder.features(model.post_quant(quantized.z_q)), quantized.loss


def actnorm_pending(disc_rest) -> jax.Array:
  """True while some ActNorm of the discriminator has not seen its first batch."""
  flags = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(disc_rest)
           if "initialized" in jax.tree_util.keystr(path)]
  if not flags:
    return jnp.zeros((), bool)
  return jnp.any(jnp.stack([flag == 0 for flag in flags]))


def initialize_actnorm(programs: Programs, state: TrainState, x: jax.Array,
                       key: jax.Array) -> TrainState:
  """Data-dependent ActNorm init on the reconstructions of `x`, as the reference does in
  its first generator step, kept in the state (inside a loss function the new Param values
  would be lost to the gradient transform)."""
  model = merge(programs.model_def, state.params, state.frozen, state.rest)
  features, _ = _generator_forward(model, x, key)
  xrec = model.decoder.to_image(features)
  disc = merge(programs.disc_def, state.disc_params, state.disc_rest)
  disc(sg(xrec), train=True)
  _, disc_params, disc_rest = nnx.split(disc, nnx.Param, ...)
  return state.replace(disc_params=disc_params, disc_rest=disc_rest)


def _pure_discriminator(programs: Programs, disc_params, disc_rest) -> Callable:
  """D as a pure function for the generator's loss: batch statistics as in training, and
  the running statistics it would update dropped (only an eval-mode D would read them)."""
  def discriminator(image):
    return merge(programs.disc_def, disc_params, disc_rest)(image, train=True)
  return discriminator


def discriminate_pair(disc: NLayerDiscriminator, real: jax.Array, fake: jax.Array):
  """`(disc(real, train=True), disc(fake, train=True))`, the reference's two calls, with
  each convolution run once over both batches.

  Two calls make two weight-gradient convolutions per layer, each contracting over the
  batch; on a batch-split mesh GSPMD all-reduces each one's partial sums where it is made,
  so the discriminator's gradients crossed the network twice per micro-batch (1.35x the
  gradient bytes for the whole kl-f8 step; XLA:CPU has no pass that would turn
  ar(a) + ar(b) into ar(a + b)). Here the convolutions see one batch of 2B, so each
  layer's weight gradient is one reduction and one all-reduce. The two batches are
  interleaved ([B, 2] -> 2B, B major) rather than concatenated: every device then holds
  the real and fake rows of its own shard, and no layout change moves images between
  devices. Norm layers still see real and fake apart, in the reference's order, so the
  batch statistics, BatchNorm's running averages and ActNorm's init are the two calls'.
  """
  b = real.shape[0]
  pair = lambda r, f: jnp.stack([r, f], axis=1).reshape((2 * b,) + r.shape[1:])
  x = pair(real, fake.astype(real.dtype))
  for module in disc.main:
    if isinstance(module, (BatchNorm, ActNorm)):
      halves = x.reshape((b, 2) + x.shape[1:])
      r = module(halves[:, 0], train=True)
      f = module(halves[:, 1], train=True)
      x = pair(r, f)
    else:
      x = module(x)
  halves = x.astype(jnp.float32).reshape((b, 2) + x.shape[1:])
  return halves[:, 0], halves[:, 1]


def make_train_step(programs: Programs) -> Callable:
  """step(state, batch, lpips_state) -> (state, metrics); batch["image"] is [A, B, H, W, 3]."""
  cfg = programs.loss

  def step_fn(state: TrainState, batch: dict, lpips_state) -> tuple[TrainState, dict]:
    lpips = (merge(programs.lpips_def, lpips_state)
             if programs.lpips_def is not None else None)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if cfg.use_actnorm:  # one branch runs: the init costs nothing after the first step
      state = jax.lax.cond(
          actnorm_pending(state.disc_rest),
          lambda s: initialize_actnorm(programs, s, batch["image"][0],
                                       jax.random.fold_in(step_key, 0)),
          lambda s: s, state)

    def micro_step(x, index, disc_rest):
      """Gradients of both players on one micro-batch."""
      key = jax.random.fold_in(step_key, index)

      def loss_fn(params):
        model = merge(programs.model_def, params, state.frozen, state.rest)
        features, regularizer = _generator_forward(model, x, key)
        return generator_loss(
            cfg, x=x, features=features, last_kernel=model.decoder.conv_out.kernel[...],
            to_image=lambda k, f: model.decoder.to_image(f, k), regularizer=regularizer,
            discriminator=_pure_discriminator(programs, state.disc_params, disc_rest),
            lpips=lpips, step=state.step)

      (_, (g_metrics, xrec)), g_grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)

      def disc_loss_fn(disc_params):
        disc = merge(programs.disc_def, disc_params, disc_rest)
        logits_real, logits_fake = discriminate_pair(disc, sg(x), sg(xrec))
        loss, d_metrics = discriminator_loss(cfg, logits_real, logits_fake, state.step)
        return loss, (d_metrics, nnx.state(disc, nnx.Not(nnx.Param)))

      (_, (d_metrics, disc_rest)), d_grads = jax.value_and_grad(
          disc_loss_fn, has_aux=True)(state.disc_params)
      return (g_grads, d_grads, {**g_metrics, **d_metrics}), disc_rest

    # A Python loop, unrolled at trace time: XLA:CPU runs convolutions inside a scan body
    # many times slower (jax-ml/jax#12868), and accumulation counts are small.
    images = batch["image"]
    accumulate = images.shape[0]
    disc_rest, totals = state.disc_rest, None
    for index in range(accumulate):
      summed, disc_rest = micro_step(images[index], index, disc_rest)
      totals = summed if totals is None else jax.tree.map(jnp.add, totals, summed)
    grads, disc_grads, metrics = jax.tree.map(lambda g: g / accumulate, totals)

    updates, opt_state = programs.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    disc_updates, disc_opt_state = programs.disc_tx.update(
        disc_grads, state.disc_opt_state, state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, disc_updates)
    ema = state.ema
    if ema is not None:
      ema = ema_update(ema, params, programs.ema_decay, state.step + 1)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
               "disc_grad_norm": optax.tree.norm(disc_grads)}
    new_state = state.replace(params=params, opt_state=opt_state, disc_params=disc_params,
                              disc_rest=disc_rest, disc_opt_state=disc_opt_state, ema=ema)
    finite = {name: jnp.isfinite(metrics[name]) for name in GUARDED[:-1]}
    finite["state"] = guard.tree_finite(new_state)
    ok, report = guard.check(finite, state.step)
    # A non-finite update is dropped whole (both players, statistics, EMA); the step moves on.
    new_state = guard.keep_if(ok, new_state, state).replace(step=state.step + 1)
    return new_state, {**metrics, "guard": report}

  return step_fn


def jit_train_step(programs: Programs, layout: mesh_lib.Layout, state_shardings,
                   lpips_state=None):
  """The step compiled over `layout`'s mesh: state sharded by its rules and donated, batch
  split along its second axis ([A, B, H, W, 3]), activations constrained at the models'
  block boundaries, LPIPS replicated."""
  replicated = mesh_lib.replicated(layout.mesh)
  batch = {"image": layout.batch_sharding(leading_dims=1)}
  lpips = jax.tree.map(lambda _: replicated, lpips_state)
  return jax.jit(layout.constrained(make_train_step(programs)),
                 in_shardings=(state_shardings, batch, lpips),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def eval_model(programs: Programs, state: TrainState, use_ema: bool = True):
  """The autoencoder with the weights evaluation and export should use (EMA if present)."""
  params = state.ema if (use_ema and state.ema is not None) else state.params
  return merge(programs.model_def, params, state.frozen, state.rest)
