"""The first-stage train state and its pure, jit-compiled update.

One call of the step is one optimizer update of both the autoencoder ("generator") and
the discriminator, over `accumulate_grad_batches` micro-batches inside the step.
The discriminator sees the reconstructions of the pre-update generator (the Lightning
reference recomputes them after the generator's step, one update later).

EQ-VAE (`loss.eq_vae_prob > 0`): each micro-batch draws from its key whether and how to
transform; a downscale changes every shape after the encoder, so the micro-step runs
inside a `lax.switch` with one branch per distinct scale (static shapes in each), and
each branch computes both players' gradients whole. The reconstruction that the
discriminator sees never leaves its branch, so no fixed-shape `xrec` is needed: D gets
tau(x) as real and decode(tau(z)) as fake at the transformed size, as in the paper's code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ldm_jax.losses.autoencoder import (LossConfig, discriminator_loss, eq_vae_draw,
                                        eq_vae_sizes, eq_vae_transform, generator_loss)
from ldm_jax.models.autoencoder import AutoencoderSpec, abstract_autoencoder
from ldm_jax.models.discriminator import ActNorm, BatchNorm, NLayerDiscriminator
from ldm_jax.models.distributions import DiagonalGaussian
from ldm_jax.train import guard
from ldm_jax import mesh as mesh_lib
from ldm_jax.train.optim import ema_update

sg = jax.lax.stop_gradient

# What the non-finite guard checks each step, in the order its report encodes them.
# "state": every updated array (parameters, Adam moments, EMA, discriminator statistics):
# a finite gradient can still overflow Adam's second moment.
GUARDED = ("total_loss", "disc_loss", "grad_norm", "disc_grad_norm", "state")

# Folded into a micro-batch's key for the draws that options add; the posterior sample
# keeps the key itself, so a run with the options off draws exactly what it always did.
EQ_VAE_SALT = 1
LPIPS_DROPOUT_SALT = 2


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
  # How micro-batches are accumulated: a `lax.scan` (one micro-batch's activations live at
  # a time) or a Python loop unrolled at trace time. XLA:CPU runs convolutions inside a
  # scan body many times slower (jax-ml/jax#12868), so CPU steps unroll; on GPU and TPU the
  # unrolled micro-batches are independent, the scheduler may overlap them, and the
  # temporaries grow with the count (sd_vae_ft_mse's 4 x 6 per device: 58.6 GiB unrolled).
  scan_micro_batches: bool = False
  # How EQ-VAE picks its branch: a `lax.switch` (only the drawn scale runs) or every
  # branch computed and the drawn one selected. XLA:CPU runs convolutions inside a
  # conditional's branches several times slower, as inside a scan (a tiny KL step always
  # at scale 0.5 took 2x the full-size step's time, for a quarter of the work), so CPU
  # steps compute all (1 + sum of scale^2 times the work: 1.81x for 0.5 and 0.75).
  eq_vae_switch: bool = True


def default_scan_micro_batches() -> bool:
  return jax.default_backend() != "cpu"


def default_eq_vae_switch() -> bool:
  return jax.default_backend() != "cpu"


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
                  decoder_only: bool, lpips_def=None,
                  scan_micro_batches: bool | None = None,
                  eq_vae_switch: bool | None = None) -> Programs:
  """`scan_micro_batches=None` and `eq_vae_switch=None` pick by backend
  (`default_scan_micro_batches`, `default_eq_vae_switch`)."""
  model_def = split_model(abstract_autoencoder(spec), decoder_only)[0]
  disc_def = nnx.split(nnx.eval_shape(lambda: build_discriminator(loss, spec.dtype, 0)))[0]
  if scan_micro_batches is None:
    scan_micro_batches = default_scan_micro_batches()
  if eq_vae_switch is None:
    eq_vae_switch = default_eq_vae_switch()
  return Programs(model_def, disc_def, lpips_def, tx, disc_tx, loss, ema_decay,
                  scan_micro_batches, eq_vae_switch)


def _generator_forward(model, x: jax.Array, key: jax.Array,
                       latent_transform: Callable | None = None):
  """Decoder features before conv_out, and the regularizer (posterior or codebook loss).

  `latent_transform` (EQ-VAE's tau) acts on the decoder's input: the posterior sample,
  or the quantized latent; the regularizer is always the untransformed image's, as the
  paper's code keeps the KL of the full-size posterior.
  """
  if model.spec.kind == "kl":
    posterior: DiagonalGaussian = model.encode(x)
    z = posterior.sample(key)
    if latent_transform is not None:
      z = latent_transform(z)
    return model.decoder.features(model.post_quant(z)), posterior
  quantized = model.quantize(model.encode(x), key)
  z_q = quantized.z_q if latent_transform is None else latent_transform(quantized.z_q)
  return model.decoder.features(model.post_quant(z_q)), quantized.loss


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


def generator_objective(programs: Programs, state: TrainState, lpips, x: jax.Array,
                        key: jax.Array, disc_rest, transform: tuple[float, Any] | None = None,
                        gan: bool = True):
  """`(loss_fn, target)`: the generator's `loss_fn(params) -> (loss, (metrics, xrec))` on
  one micro-batch, and the image its reconstruction is compared with.

  `transform=(scale, turns)` is EQ-VAE's tau (`scale` static, `turns` may be traced): the
  reconstruction terms compare decode(tau(z)) with `target` = tau(x); None is the plain
  loss (`target` is `x`). `gan=False` leaves the GAN term out (see `make_train_step`).
  """
  cfg = programs.loss
  target, latent_transform = x, None
  if transform is not None:
    scale, turns = transform
    latent_transform = lambda z: eq_vae_transform(z, scale, turns)
    target = eq_vae_transform(x, scale, turns)
  lpips_fn = lpips
  if lpips is not None and cfg.lpips_dropout:
    dropout_key = jax.random.fold_in(key, LPIPS_DROPOUT_SALT)
    lpips_fn = lambda a, b: lpips(a, b, dropout_key=dropout_key)

  def loss_fn(params):
    model = merge(programs.model_def, params, state.frozen, state.rest)
    features, regularizer = _generator_forward(model, x, key, latent_transform)
    return generator_loss(
        cfg, x=target, features=features, last_kernel=model.decoder.conv_out.kernel[...],
        to_image=lambda k, f: model.decoder.to_image(f, k), regularizer=regularizer,
        discriminator=(_pure_discriminator(programs, state.disc_params, disc_rest)
                       if gan else None),
        lpips=lpips_fn, step=state.step)

  return loss_fn, target


def micro_batch_grads(programs: Programs, state: TrainState, lpips, x: jax.Array,
                      key: jax.Array, disc_rest, transform: tuple[float, Any] | None = None,
                      gan: bool = True):
  """Gradients of both players on one micro-batch, their metrics, and the discriminator's
  statistics after it: `((g_grads, d_grads, metrics), disc_rest)`. With an EQ-VAE
  `transform` the discriminator sees the transformed pair (see `generator_objective`).
  `gan=False`: the discriminator does not run; its gradients are zeros, as the reference's
  are before `disc_start`, and its metrics read 0."""
  cfg = programs.loss
  loss_fn, target = generator_objective(programs, state, lpips, x, key, disc_rest, transform,
                                        gan)
  (_, (g_metrics, xrec)), g_grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if not gan:
    zero = jnp.zeros((), jnp.float32)
    d_metrics = {"disc_loss": zero, "logits_real": zero, "logits_fake": zero}
    d_grads = jax.tree.map(jnp.zeros_like, state.disc_params)
    return (g_grads, d_grads, {**g_metrics, **d_metrics}), disc_rest

  def disc_loss_fn(disc_params):
    disc = merge(programs.disc_def, disc_params, disc_rest)
    logits_real, logits_fake = discriminate_pair(disc, sg(target), sg(xrec))
    loss, d_metrics = discriminator_loss(cfg, logits_real, logits_fake, state.step)
    return loss, (d_metrics, nnx.state(disc, nnx.Not(nnx.Param)))

  (_, (d_metrics, disc_rest)), d_grads = jax.value_and_grad(
      disc_loss_fn, has_aux=True)(state.disc_params)
  return (g_grads, d_grads, {**g_metrics, **d_metrics}), disc_rest


def make_train_step(programs: Programs, gan: bool = True) -> Callable:
  """step(state, batch, lpips_state) -> (state, metrics); batch["image"] is [A, B, H, W, 3].

  `gan=False` is the step for `losses.autoencoder.gan_active(...)` False (before
  `disc_start`): the reference runs the discriminator there and multiplies its terms by 0,
  this step does not run it (bench/README.md: the full GAN step costs 1.55x the
  autoencoder-only step at the kl-f8 demo's sizes, so roughly a third of its time). The update is
  the same: zero discriminator gradients still go through its Adam (whose step count, and
  so its bias correction at `disc_start`, stay the reference's); only BatchNorm's running
  averages, which nothing in training reads, start moving at `disc_start` instead.
  """
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
      run = lambda rest, transform=None: micro_batch_grads(
          programs, state, lpips, x, key, rest, transform, gan)
      if cfg.eq_vae_prob <= 0:
        return run(disc_rest)
      # One branch per scale, each at its own static shapes; only the drawn one runs.
      # Scale 1.0 (branch 0) with 0 turns is the untransformed loss.
      sizes = eq_vae_sizes(cfg)
      size_index, turns, applied = eq_vae_draw(cfg, jax.random.fold_in(key, EQ_VAE_SALT))
      branches = [functools.partial(lambda s, rest, t: run(rest, (s, t)), s) for s in sizes]
      if programs.eq_vae_switch:
        out = jax.lax.switch(size_index, branches, disc_rest, turns)
      else:  # a select, not a weighted sum: a non-finite unused branch cannot leak in
        outs = [branch(disc_rest, turns) for branch in branches]
        out = jax.tree.map(lambda *xs: jax.lax.select_n(size_index, *xs), *outs)
      (g_grads, d_grads, metrics), disc_rest = out
      metrics = {**metrics, "eq_vae_applied": applied.astype(jnp.float32),
                 "eq_vae_scale": jnp.asarray(sizes, jnp.float32)[size_index]}
      return (g_grads, d_grads, metrics), disc_rest

    images = batch["image"]
    accumulate = images.shape[0]
    # The first micro-batch outside the loop gives the totals their structure; the
    # discriminator's statistics thread through the micro-batches in order either way.
    totals, disc_rest = micro_step(images[0], 0, state.disc_rest)
    if programs.scan_micro_batches and accumulate > 1:
      def body(carry, inputs):
        totals, disc_rest = carry
        summed, disc_rest = micro_step(inputs[0], inputs[1], disc_rest)
        return (jax.tree.map(jnp.add, totals, summed), disc_rest), None
      (totals, disc_rest), _ = jax.lax.scan(
          body, (totals, disc_rest), (images[1:], jnp.arange(1, accumulate)))
    else:
      for index in range(1, accumulate):
        summed, disc_rest = micro_step(images[index], index, disc_rest)
        totals = jax.tree.map(jnp.add, totals, summed)
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
                   lpips_state=None, gan: bool = True):
  """The step compiled over `layout`'s mesh: state sharded by its rules and donated, batch
  split along its second axis ([A, B, H, W, 3]), activations constrained at the models'
  block boundaries, LPIPS replicated. `gan`: see `make_train_step`."""
  replicated = mesh_lib.replicated(layout.mesh)
  batch = {"image": layout.batch_sharding(leading_dims=1)}
  lpips = jax.tree.map(lambda _: replicated, lpips_state)
  return jax.jit(layout.constrained(make_train_step(programs, gan)),
                 in_shardings=(state_shardings, batch, lpips),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def eval_model(programs: Programs, state: TrainState, use_ema: bool = True):
  """The autoencoder with the weights evaluation and export should use (EMA if present)."""
  params = state.ema if (use_ema and state.ema is not None) else state.params
  return merge(programs.model_def, params, state.frozen, state.rest)


def reconstruct_fn(programs: Programs, tile: int = 0, overlap: float = 0.25):
  """`reconstruct(state, x, key) -> (xrec, sample or None)` for the reconstruction
  evaluator, with the evaluation weights. With `tile` (pixels) the model encodes and
  decodes in overlapping tiles (models.tiling): that function walks tiles on the host, so
  it is not for jax.jit."""

  def reconstruct(state, x, key):
    model = eval_model(programs, state)
    if not tile:
      return model.reconstructions(x, key)
    from ldm_jax.models.tiling import tiled_decode, tiled_encode
    return model.reconstructions(
        x, key, encode=functools.partial(tiled_encode, model, tile=tile, overlap=overlap),
        decode=functools.partial(tiled_decode, model, tile=tile, overlap=overlap))

  return reconstruct
