"""The LDM train state and its jit-compiled update.

What trains: the UNet, the condition encoder (class embedder or text transformer, trained
jointly as in the paper; a Stable Diffusion fine-tune's CLIP encoder only with
cond.train_text_encoder, its weights otherwise in `rest`) and, with learn_logvar, the
per-timestep log-variance. The first
stage is frozen and passed to the step as a separate, replicated argument; the latent
`scale_factor` lives in the state, so a resumed run keeps the one scale_by_std chose.
Concat inputs (`cond.concat`: low-res images, inpainting masks) are made inside the step
from the batch, so they follow the state's RNG and a resumed run draws the same masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ldm_jax.diffusion.schedules import Schedule
from ldm_jax.losses.diffusion import DiffusionLossConfig, diffusion_loss, drop_conditions
from ldm_jax.models.ldm import LatentDiffusion
from ldm_jax.train import concat as concat_lib
from ldm_jax.train import first_stage, guard
from ldm_jax import mesh as mesh_lib
from ldm_jax.train.autoencoder_step import merge
from ldm_jax.train.optim import ema_update

sg = jax.lax.stop_gradient

# What the non-finite guard checks each step, in the order its report encodes them.
# "state": every updated array (parameters, AdamW moments, EMA): a finite gradient can still
# overflow the second moment.
GUARDED = ("loss", "grad_norm", "state")


@struct.dataclass
class LDMState:
  step: jax.Array
  params: nnx.State
  rest: nnx.State
  opt_state: Any
  ema: nnx.State | None
  scale_factor: jax.Array  # float32 scalar; scale_by_std sets it from the first batch
  rng: jax.Array
  # The diffusion model sees (z - shift_factor) * scale_factor (first_stage.normalize).
  shift_factor: jax.Array  # float32 scalar; 0 for the CompVis VAEs, SD3 / FLUX have one
  # Checkpoints written before the shift existed restore with shift 0 (checkpoint._restore).
  ADDED_FIELDS = {"shift_factor": 0.0}

  @property
  def latent_norm(self) -> tuple[jax.Array, jax.Array]:
    return self.scale_factor, self.shift_factor


@dataclasses.dataclass(frozen=True)
class LDMPrograms:
  model_def: nnx.GraphDef
  first_stage_def: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: Schedule
  loss: DiffusionLossConfig
  cond_fields: tuple[str, ...]
  concat: concat_lib.ConcatSpec
  cond_dropout: float
  ema_decay: float


def lr_schedule(optim, lr: float):
  """The learning rate by step: a linear warm-up from 1e-6 * lr over optim.warmup_steps
  (the reference's LambdaLinearScheduler with f_start 1e-6), then constant."""
  warmup = int(optim.get("warmup_steps", 0))
  if warmup <= 0:
    return optax.constant_schedule(lr)
  return optax.join_schedules([optax.linear_schedule(lr * 1e-6, lr, warmup),
                               optax.constant_schedule(lr)], [warmup])


def adamw(optim, lr: float) -> optax.GradientTransformation:
  """AdamW with torch's defaults unless configured, `lr_schedule`, optional global-norm
  clipping."""
  schedule = lr_schedule(optim, lr)
  if int(optim.get("warmup_steps", 0)) <= 0:
    schedule = lr  # a constant: the same optimizer state as before schedules were logged
  tx = optax.adamw(schedule, b1=float(optim.get("b1", 0.9)), b2=float(optim.get("b2", 0.999)),
                   eps=float(optim.get("eps", 1e-8)),
                   weight_decay=float(optim.get("weight_decay", 0.01)))
  clip = float(optim.get("grad_clip_norm", 0.0) or 0.0)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def new_state(model: LatentDiffusion, programs: LDMPrograms, scale_factor: float,
              seed: int, shift_factor: float = 0.0) -> LDMState:
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return LDMState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                  opt_state=programs.tx.init(params),
                  ema=jax.tree.map(jnp.copy, params) if programs.ema_decay > 0 else None,
                  scale_factor=jnp.asarray(scale_factor, jnp.float32),
                  rng=jax.random.key_data(jax.random.key(seed)),
                  shift_factor=jnp.asarray(shift_factor, jnp.float32))


def latents_of(programs: LDMPrograms, batch: dict, first_stage_state, key) -> jax.Array:
  """Unscaled latents: from cached moments when the batch has them, else encoded."""
  return first_stage.batch_latents(merge(programs.first_stage_def, first_stage_state), batch,
                                   key)


def concat_input(programs: LDMPrograms, fields: dict, latent_shape: tuple, first_stage_state,
                 latent_norm) -> jax.Array | None:
  """The concat conditioning input for latents of `latent_shape` (None without one)."""
  if programs.concat.kind == "none":
    return None
  encode_mean = lambda x: first_stage.encode_mean(
      merge(programs.first_stage_def, first_stage_state), x)
  return sg(concat_lib.concat_input(programs.concat, fields, latent_shape, encode_mean,
                                    latent_norm))


def make_train_step(programs: LDMPrograms) -> Callable:
  """step(state, batch, first_stage_state) -> (state, metrics)."""

  def step_fn(state: LDMState, batch: dict, first_stage_state) -> tuple[LDMState, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    latent_key, drop_key, loss_key, concat_key = jax.random.split(key, 4)
    z = first_stage.normalize(sg(latents_of(programs, batch, first_stage_state, latent_key)),
                              state.latent_norm)
    fields = {name: batch[name] for name in programs.cond_fields}
    concat = concat_input(programs, concat_lib.training_fields(programs.concat, batch,
                                                               concat_key),
                          z.shape, first_stage_state, state.latent_norm)

    def loss_fn(params):
      model = merge(programs.model_def, params, state.rest)
      used = drop_conditions(fields, model.cond.null_fields(z.shape[0], tuple(fields)),
                             programs.cond_dropout, drop_key)
      conditions = model.encode_conditions(used, concat)
      apply = lambda x_t, t: model.denoise(x_t, t, conditions)
      return diffusion_loss(programs.loss, programs.schedule, apply, z, loss_key,
                            model.logvar[...])

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = programs.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = ema_update(ema, params, programs.ema_decay, state.step + 1)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
               "latent_std": jnp.std(z), "latent_mean": jnp.mean(z)}
    new_state = state.replace(params=params, opt_state=opt_state, ema=ema)
    ok, report = guard.check({"loss": jnp.isfinite(metrics["loss"]),
                              "grad_norm": jnp.isfinite(metrics["grad_norm"]),
                              "state": guard.tree_finite(new_state)}, state.step)
    # A non-finite update is dropped (parameters, optimizer, EMA); the step moves on.
    new_state = guard.keep_if(ok, new_state, state).replace(step=state.step + 1)
    return new_state, {**metrics, "guard": report}

  return step_fn


def jit_train_step(programs: LDMPrograms, layout: mesh_lib.Layout, state_shardings,
                   batch_spec: dict, first_stage_state):
  """The step over `layout`'s mesh: state sharded by its rules and donated, every batch
  field split along its first axis, activations constrained at the UNet's block
  boundaries, the first stage replicated."""
  replicated = mesh_lib.replicated(layout.mesh)
  batch = {k: layout.batch_sharding() for k in batch_spec}
  frozen = jax.tree.map(lambda _: replicated, first_stage_state)
  return jax.jit(layout.constrained(make_train_step(programs)),
                 in_shardings=(state_shardings, batch, frozen),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def eval_model(programs: LDMPrograms, state: LDMState, use_ema: bool = True) -> LatentDiffusion:
  params = state.ema if (use_ema and state.ema is not None) else state.params
  return merge(programs.model_def, params, state.rest)


def scale_by_std(programs: LDMPrograms, batch: dict, first_stage_state, rng,
                 shift: bool = False) -> tuple[jax.Array, jax.Array]:
  """(scale, shift) from the first batch's latents (drawn as the reference draws them):
  `first_stage.scale_by_std`, which an autoencoder run also uses for its export."""
  return first_stage.scale_by_std(merge(programs.first_stage_def, first_stage_state), batch,
                                  rng, shift)


def describe(programs: LDMPrograms) -> str:
  conditions = list(programs.cond_fields) + [f"concat:{programs.concat.kind}"
                                             ] * (programs.concat.kind != "none")
  return (f"{programs.schedule.timesteps} timesteps, {programs.loss.parameterization} "
          f"prediction, {programs.loss.loss_type} loss, conditioned on "
          f"{conditions or 'nothing'}")

