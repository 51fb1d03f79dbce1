"""The one training loop: both stages hand it a `Stage`, it does the rest.

    config -> stage.setup (checks, loads, builds; writes nothing) -> restore -> loop
           -> checkpoints / metrics / periodic evaluation -> export

What the loop owns, for every stage alike: the workdir checks before anything is written
(`resume.prepare`), the orbax checkpoint with the data iterator (restore and periodic
save), the non-finite guard (read at the log interval and before every save), the
console line with ETA and learning rate, clu's writers and ReportProgress, the profiler's
step annotation, periodic actions at step 0 and every N steps, SIGTERM (a checkpoint at
an agreed step, then exit), and the final export. What a stage supplies: its initial
state and mesh, its data iterator, a step that reads its own batch, its periodic actions
(validation, sample grids, FID) and its export.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax import fs
from ldm_jax.data.pipeline import data_report, skipped_records
from ldm_jax.logs import compile_timer, line_notes
from ldm_jax.train import checkpoint, resume, workdir_lock
from ldm_jax import mesh as mesh_lib
from ldm_jax.train.guard import NonFiniteGuard, check_policy, guard_settings
from ldm_jax.train.preemption import PreemptionFlag

# (state, step, writer) -> scalars for the run's result (may be empty).
Action = Callable[[Any, int, Any], dict]

# The `train` keys the loop reads, for both stages (each stage adds its own).
TRAIN_KEYS = frozenset({
    "num_steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "seed", "mesh",
    "eval_examples", "on_nonfinite", "max_nonfinite", "eval_at_start", "preemption_every",
    "sharding_rules", "max_unsharded_fraction"})


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """The loop's side of the `train` block, read and checked once (the mesh, the sharding
  rules and max_unsharded_fraction are checked by mesh.Layout.from_config, when the mesh
  is made: that needs the devices). Runs saved before a key existed get its default."""

  num_steps: int
  log_every: int
  ckpt_every: int
  keep_checkpoints: int
  eval_at_start: bool = True
  preemption_every: int = 10
  on_nonfinite: str = "stop"
  max_nonfinite: int = 100

  @classmethod
  def from_config(cls, train: ml_collections.ConfigDict) -> "LoopSpec":
    for key in ("num_steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints",
                "preemption_every"):
      if key in train and int(train[key]) < 1:
        raise ValueError(f"train.{key}={train[key]} must be >= 1")
    policy, limit = guard_settings(train)
    check_policy(policy, limit)
    return cls(int(train.num_steps), int(train.log_every), int(train.ckpt_every),
               int(train.keep_checkpoints), bool(train.get("eval_at_start", True)),
               int(train.get("preemption_every", 10)), policy, limit)


@dataclasses.dataclass
class Started:
  """What a stage makes once the state is restored (it may depend on it)."""

  state: Any  # the state to train from (scale_by_std may have set the latent scale)
  # (state, step) -> (state, metrics): one update; `step` is the state's step on the host,
  # for stages whose program changes with it (the autoencoder's GAN start)
  train_step: Callable[[Any, int], tuple[Any, dict]]
  actions: list[tuple[int, Action]]  # (every N steps, action); also at step 0 and the end


@dataclasses.dataclass
class Stage:
  """A stage's side of the loop, built before anything is written to the workdir."""

  name: str  # for logs: "autoencoder", "LDM"
  layout: mesh_lib.Layout  # the mesh and the sharding rules
  state: Any  # the freshly initialized state (host or device), before any restore
  guarded: tuple[str, ...]  # the names the step's guard report encodes
  make_iterator: Callable[[], Any]  # the checkpointed data iterator
  images_per_step: int  # global images per update, for img/s
  learning_rate: Callable[[int], float]  # at a step, for the logs
  start: Callable[[Any, Any, Any], Started]  # (state, iterator, shardings) -> Started
  console_keys: tuple[str, ...] = ("loss",)  # the metrics the console line shows
  export: Callable[[Any], Any] | None = None  # at the end, on process 0
  export_exists: Callable[[], bool] = lambda: True  # else a finished run exports again


class RunStopped(Exception):
  """A run stopped early on request (SIGTERM, Ctrl-C) after saving; `signal` says which."""

  def __init__(self, message: str, signum: int | None):
    super().__init__(message)
    self.signal = signum


def train(config: ml_collections.ConfigDict, workdir: str,
          setup: Callable[[ml_collections.ConfigDict, str], Stage],
          export_target: Callable[[ml_collections.ConfigDict], str | None] = lambda c: None,
          ) -> dict:
  """Trains (or resumes) `setup`'s stage until config.train.num_steps; returns the last
  logged and evaluated scalars. `export_target(config)` is where the stage exports at the
  end (None: it exports nothing), so that a finished run is recognized before any work."""
  config = resume.prepare(config, workdir)  # refuses another run's workdir, writes nothing
  spec = LoopSpec.from_config(config.train)
  if _finished(workdir, spec.num_steps, export_target(config)):
    return {}
  workdir_lock.check_free(workdir)  # a held workdir is refused before the work of setup
  stage = setup(config, workdir)  # everything checked and loaded; still nothing written
  with workdir_lock.hold(workdir):  # one run per workdir, from its first write to its last
    return _train(config, workdir, stage, spec)


def _finished(workdir: str, num_steps: int, export: str | None) -> bool:
  """True (having said so) when `workdir` saved step num_steps and its export exists."""
  steps = checkpoint.saved_steps(workdir)
  if not steps or steps[-1] < num_steps or (export is not None and not fs.exists(export)):
    return False
  where = f"; its export is {export}" if export else ""
  logging.info("%s finished at step %d%s. Nothing to do: raise --config.train.num_steps to "
               "train further", workdir, steps[-1], where)
  return True


def _train(config, workdir: str, stage: Stage, spec: LoopSpec) -> dict:
  nonfinite = NonFiniteGuard(stage.guarded, spec.on_nonfinite, spec.max_nonfinite)
  fs.makedirs(workdir)
  shardings = stage.layout.state_shardings(stage.state)
  logging.info("%s: %s", stage.name, stage.layout.check(stage.state, shardings))
  state = jax.device_put(stage.state, shardings)
  iterator = stage.make_iterator()
  manager = checkpoint.make_manager(workdir, spec.keep_checkpoints)
  last_saved = manager.latest_step()
  if last_saved is not None:
    logging.info("resuming from the checkpoint at step %d (%s)", last_saved,
                 checkpoint.checkpoint_dir(workdir))
    state = checkpoint.restore(manager, last_saved, checkpoint.abstract_with_shardings(
        state, shardings), iterator)
  else:
    logging.info("starting at step 0: %s holds no complete checkpoint", workdir)
  resume.write_config(config, workdir)  # only now: the restore succeeded
  started = stage.start(state, iterator, shardings)
  state = started.state

  from clu import periodic_actions  # imports TensorFlow: not for a run that has no work
  writer = fs.metric_writer(workdir, just_logging=jax.process_index() > 0)
  num_steps, log_every, ckpt_every = spec.num_steps, spec.log_every, spec.ckpt_every
  progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                             every_steps=log_every)
  preemption = PreemptionFlag(every=spec.preemption_every)
  saves = checkpoint.SaveTracker(workdir, manager, last_saved)
  step = first_step = int(jax.device_get(state.step))
  results: dict = {}
  totals, count, t_log = None, 0, time.time()

  def run_actions(step: int, final: bool) -> None:
    for every, action in started.actions:
      if final or step % every == 0:
        results.update(action(state, step, writer) or {})

  if step == 0 and spec.eval_at_start:
    run_actions(0, final=False)
  try:
    while step < num_steps:
      with (jax.profiler.StepTraceAnnotation("train", step_num=step),
            compile_timer("the train step", first=step == first_step)):
        state, metrics = started.train_step(state, step)
      step += 1
      nonfinite.add(metrics.pop("guard"))
      totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
      count += 1
      progress(step)
      final = step == num_steps
      log_due = final or step % log_every == 0
      save_due = final or step % ckpt_every == 0
      preempted = preemption.requested(step)
      if log_due or save_due or preempted:  # the loop syncs here anyway
        nonfinite.check(step, saves.last_saved)  # before a bad state is saved/exported
      if log_due:
        elapsed = time.time() - t_log
        scalars = {f"train/{k}": float(v) / count for k, v in jax.device_get(totals).items()}
        scalars.update({"train/learning_rate": stage.learning_rate(step),
                        "train/skipped_nonfinite": nonfinite.skipped,
                        "data/skipped_records": skipped_records()})
        writer.write_scalars(step, scalars)
        results.update(scalars)
        _console_line(step, num_steps, count / elapsed, count * stage.images_per_step / elapsed,
                      scalars, stage.console_keys,
                      line_notes(nonfinite.note(), data_report()))
        totals, count, t_log = None, 0, time.time()
      run_actions(step, final)
      saved = saves.save(step, state, iterator) if save_due else False
      if preempted:
        if not saved:
          saves.save(step, state, iterator, force=True)
        saves.wait()
        why = "interrupted" if preemption.signal == signal.SIGINT else "preempted"
        raise RunStopped(f"{why}: checkpoint saved at step {step} in "
                         f"{checkpoint.checkpoint_dir(workdir)}; rerun the same command to "
                         f"resume", preemption.signal)
    saves.wait()
  except Exception as e:  # pylint: disable=broad-except  # re-raised, or named
    error = saves.blame(e)
    if error is None:
      raise
    raise error from e
  finally:
    failing = sys.exc_info()[0] is not None
    preemption.restore()
    saves.wait(quiet=True)  # never hides the exception that brought us here
    try:
      writer.flush()
    except Exception as e:  # pylint: disable=broad-except  # a full disk, say
      if not failing:
        raise
      logging.error("could not flush the metrics writer: %s", str(e).splitlines()[0])
  if stage.export is not None and (step > first_step or not stage.export_exists()):
    host_state = _on_host(state)  # every process takes part: the state may span hosts
    if jax.process_index() == 0:
      stage.export(host_state)
  return results


def _on_host(tree):
  """The global values of a (possibly multi-host sharded) state as numpy arrays. Arrays
  split across processes are all-gathered, a collective every process must join."""
  if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def _console_line(step, num_steps, steps_per_s, images_per_s, scalars, keys, notes):
  eta = (num_steps - step) / max(steps_per_s, 1e-9)
  losses = " ".join(f"{k}={scalars[f'train/{k}']:.4g}" for k in keys
                    if f"train/{k}" in scalars)
  logging.info("step %d/%d | %.2f steps/s | %.1f img/s | ETA %s | lr %.3g | %s%s", step,
               num_steps, steps_per_s, images_per_s,
               time.strftime("%H:%M:%S", time.gmtime(eta)), scalars["train/learning_rate"],
               losses, notes)
